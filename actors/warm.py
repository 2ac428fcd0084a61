"""A warm call runner: one Python child kept alive between the ``call`` items of a task.

Starting a Python interpreter for every ``call`` item costs tens of milliseconds; a
runner that stays up answers a no-op call in well under one. It is held to the item's
limits as a cold child is, for as long as it lives: it starts inside its own cgroup
(or under rlimits and the watchdog), the watchdog samples it while a call runs, and a
call that crosses a limit, times out, is canceled, dies or leaves processes behind ends
the runner with its whole tree. The next call starts a fresh one.

The executor keeps one runner, for one task and one set of limits at a time: call items
of different tasks never share a process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from schemas.base import utcnow
from schemas.work import LimitHit

from .limits import Limits, TreeCage, child_argv
from .sandbox import (
    _CALLRUNNER,
    LIMIT_SAMPLE_INTERVAL_S,
    MARKER_ENV,
    ChildOutcome,
    _kill,
    _kill_and_wait,
    _marked,
    _open_cage,
    _Tail,
    _Watch,
    _watch_every,
)

log = structlog.get_logger("hivebus.warm")

_MB = 1024 * 1024
#: How long a runner may take to start (an interpreter start on a loaded machine).
_START_S = 30.0
#: A runner's capture folder in the executor's scratch folder starts with this.
WARM_PREFIX = "warm-"


class RunnerGone(Exception):
    """The runner could not be started (a sentence says why)."""


@dataclass(frozen=True)
class WarmKey:
    """What a runner is for: calls with another key get another runner."""

    task_id: str
    cwd: str
    limits: Limits


class WarmRunner:
    """One warm call runner process; ``call`` one call at a time, ``close`` when done."""

    def __init__(self, key: WarmKey, *, scratch_dir: str, sample_interval_s: float = 0.1):
        self.key = key
        self.limits = key.limits
        self.token = uuid.uuid4().hex
        self.capture_dir = os.path.join(scratch_dir, f"{WARM_PREFIX}{self.token[:12]}")
        self.sample_interval_s = sample_interval_s
        if self.limits.memory_mb is not None or self.limits.cpu is not None:
            self.sample_interval_s = min(sample_interval_s, LIMIT_SAMPLE_INTERVAL_S)
        self.calls = 0
        self._cage: TreeCage | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._protocol: _RunnerProtocol | None = None
        self._watch: _Watch | None = None
        self.pid: int | None = None

    @property
    def alive(self) -> bool:
        return self._protocol is not None and not self._protocol.exited.done()

    async def start(self, env: Mapping[str, str]) -> None:
        """Start the runner in ``key.cwd`` with ``env``; raises RunnerGone if it cannot."""
        os.makedirs(self.capture_dir, exist_ok=True)
        self._cage = _open_cage(self.limits)
        argv = child_argv([sys.executable, _CALLRUNNER, "--serve", self.capture_dir],
                          self.limits, self._cage)
        loop = asyncio.get_running_loop()
        try:
            self._transport, self._protocol = await loop.subprocess_exec(
                _RunnerProtocol, *argv, cwd=self.key.cwd, env={**env, MARKER_ENV: self.token},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            await self.close()
            raise RunnerGone(f"cannot start the call runner: {exc.strerror or exc}") from None
        self.pid = self._transport.get_pid()
        self._watch = _Watch(self.pid, self.limits, self._cage)
        ready = self._protocol.expect_reply()
        done, _ = await asyncio.wait({ready, self._protocol.exited}, timeout=_START_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            why = self._protocol.stderr.text().strip().splitlines()
            await self.close()
            raise RunnerGone("the call runner did not start"
                             + (f": {why[-1]}" if why else f" within {_START_S:g} s"))

    async def call(self, *, target: str, args: Mapping[str, Any], env: Mapping[str, str],
                   timeout_s: float | None, cancel: asyncio.Event | None = None,
                   ) -> tuple[ChildOutcome, Any]:
        """Run one call; (what was observed, the returned value when it returned)."""
        assert self._transport is not None and self._protocol is not None and self._watch is not None
        protocol, watch = self._protocol, self._watch
        started_at, t0 = utcnow(), time.monotonic()
        self.calls += 1
        watch.peak_rss, watch.peak_rss_at = 0, None
        body = json.dumps({"target": target, "args": dict(args), "cwd": self.key.cwd,
                           "env": {**env, MARKER_ENV: self.token}}).encode()
        reply = protocol.expect_reply()
        stdin = self._transport.get_pipe_transport(0)
        assert stdin is not None
        stdin.write(len(body).to_bytes(4, "big") + body)  # type: ignore[attr-defined]
        # A no-op call is over before the watchdog's first sample.
        sampler = asyncio.ensure_future(_watch_every(watch, self.sample_interval_s, first_after=True))
        canceled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
        waits = [f for f in (reply, protocol.exited, sampler, canceled) if f is not None]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.close()
            raise
        finally:
            sampler.cancel()
            if canceled is not None:
                canceled.cancel()
        duration = time.monotonic() - t0
        hit: LimitHit | None = None
        if reply in done and not reply.exception():
            answer = json.loads(reply.result())
            if answer["children"]:
                # A call's processes may not outlive it: they go with the runner.
                await self.close()
            peak = max(watch.peak_rss, answer["rss_bytes"])
            if watch.peak_rss_at is None or peak > watch.peak_rss:
                watch.peak_rss_at = utcnow()
            outcome = ChildOutcome(
                exit_code=answer["code"], stdout_tail=answer["stdout"], stderr_tail=answer["stderr"],
                started_at=started_at, finished_at=utcnow(), duration_s=duration,
                peak_rss_mb=peak / _MB, peak_rss_at=watch.peak_rss_at,
                cpu_seconds=answer["cpu_seconds"], timed_out=False, canceled=False, error=None,
            )
            return outcome, answer["result"] if answer["code"] == 0 else None
        timed_out = not done
        if sampler in done and not sampler.cancelled():
            hit = sampler.result()
        elif timed_out:
            assert timeout_s is not None
            now = utcnow()
            hit = LimitHit(limit="timeout", limit_value=timeout_s,
                           peak_value=round(duration, 3), mechanism="watchdog",
                           crossed_at=now, killed_at=now)
        stdout, stderr = self._read_capture("stdout"), self._read_capture("stderr")
        cpu = watch.cpu_seconds()  # the runner's whole life: the call's share is not known
        if hit is None and protocol.exited.done():
            # It died by itself: the kernel may have killed it for a limit (read before
            # its cgroup goes).
            hit = watch.after_exit(self._transport.get_returncode())
        exit_code = await self.close()
        if not stderr and protocol.stderr.text():
            stderr = protocol.stderr.text()  # the runner failed before its first call
        outcome = ChildOutcome(
            exit_code=exit_code, stdout_tail=stdout, stderr_tail=stderr,
            started_at=started_at, finished_at=utcnow(), duration_s=time.monotonic() - t0,
            peak_rss_mb=watch.peak_rss / _MB, peak_rss_at=watch.peak_rss_at,
            cpu_seconds=cpu,
            timed_out=timed_out, canceled=canceled is not None and canceled in done,
            error=None, limit=hit,
        )
        return outcome, None

    def _read_capture(self, name: str) -> str:
        tail = _Tail()
        with contextlib.suppress(OSError):
            with open(os.path.join(self.capture_dir, name), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - 4 * 4000 - 4))
                tail.feed(f.read())
        return tail.text()

    async def close(self) -> int | None:
        """Kill the runner's tree, wait for it, remove its cgroup and files; its exit code."""
        transport, protocol, watch = self._transport, self._protocol, self._watch
        exit_code: int | None = None
        try:
            if transport is not None and protocol is not None and watch is not None:
                stdin = transport.get_pipe_transport(0)
                if stdin is not None:
                    stdin.close()  # an idle runner exits on EOF by itself
                if not protocol.exited.done():
                    await _kill_and_wait(watch, transport.get_pid(), self.token)
                else:
                    # The root is gone; what it started may not be.
                    _kill(None, [*watch.members(), *(_marked(self.token) if self._cage is None else [])])
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(protocol.exited), 5.0)
                transport.close()
                exit_code = transport.get_returncode()
        finally:
            self._transport = None
            if self._cage is not None and (left := self._cage.remove()):
                log.warning("cgroup directories could not be removed", directories=left)
            shutil.rmtree(self.capture_dir, ignore_errors=True)
        return exit_code


class _RunnerProtocol(asyncio.SubprocessProtocol):
    """Cuts the runner's stdout into length-prefixed replies; keeps its own stderr."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._buf = bytearray()
        self._waiter: asyncio.Future[bytes] | None = None
        self.stderr = _Tail()
        self.exited: asyncio.Future[None] = loop.create_future()

    def expect_reply(self) -> asyncio.Future[bytes]:
        self._waiter = self._loop.create_future()
        return self._waiter

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            self.stderr.feed(data)
            return
        self._buf += data
        while len(self._buf) >= 4:
            size = int.from_bytes(self._buf[:4], "big")
            if len(self._buf) < 4 + size:
                break
            frame = bytes(self._buf[4:4 + size])
            del self._buf[:4 + size]
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(frame)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def warm_key(task_id: str, cwd: str, limits: Limits) -> WarmKey:
    """The key of a call: the task, its directory, and its limits but for the timeout,
    which each call enforces on its own."""
    return WarmKey(task_id=task_id, cwd=cwd, limits=replace(limits, timeout_s=None))


__all__ = ["WarmRunner", "WarmKey", "RunnerGone", "WARM_PREFIX", "warm_key"]
