"""Run one child process tree, observe its memory and CPU, and never leave it behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import psutil

from schemas.base import utcnow
from schemas.work import TAIL_CHARS

#: Set to a fresh token in every child's environment. Descendants inherit it, so a
#: process that double-forked out of the tree (and out of its process group) can still
#: be found and killed; Jenkins' ProcessTreeKiller uses the same trick.
MARKER_ENV = "HIVEBUS_SANDBOX_TOKEN"

_MB = 1024 * 1024
_SKIP_DIRS = frozenset({".git", "__pycache__", ".hivebus", "node_modules", ".venv"})
#: How long to wait for killed processes to die and for the pipes to reach EOF.
_SETTLE_S = 5.0
_CALLRUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_callrunner.py")


@dataclass(frozen=True)
class ChildSpec:
    """What to run: argv in cwd with exactly env (nothing is inherited implicitly)."""

    argv: Sequence[str]
    cwd: str
    env: Mapping[str, str]
    timeout_s: float | None = None
    stdin: bytes | None = None


@dataclass(frozen=True)
class ChildOutcome:
    """What was observed. ``error`` is a sentence when the child could not be started."""

    exit_code: int | None
    stdout_tail: str
    stderr_tail: str
    started_at: datetime
    finished_at: datetime
    duration_s: float
    peak_rss_mb: float
    cpu_seconds: float
    timed_out: bool
    canceled: bool
    error: str | None


def shell_argv(command: str) -> list[str]:
    """The argv that runs ``command`` with the POSIX shell."""
    return ["/bin/sh", "-c", command]


def call_argv(target: str) -> list[str]:
    """The argv that calls ``package.module:function``; its kwargs go as JSON on stdin."""
    # The runner is started as a file, not with -m: ``-m actors._callrunner`` would first
    # import the actors package, and with it Ray, in every call item.
    return [sys.executable, _CALLRUNNER, target]


def kill_tree(pid: int, pgid: int | None = None, extra_pids: Iterable[int] = ()) -> None:
    """SIGKILL ``pid`` and its descendants, the process group ``pgid`` and ``extra_pids``.

    Processes that are already gone are skipped. Raises ValueError for our own group.
    """
    procs: list[psutil.Process] = []
    for each in (pid, *extra_pids):
        try:
            proc = psutil.Process(each)
            # List descendants before killing: a killed parent's children are
            # re-parented and can no longer be found from it.
            procs += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    _kill(pgid, procs)


def snapshot_files(root: str, *, limit: int = 20000) -> dict[str, tuple[int, int]]:
    """Relative path -> (mtime_ns, size) of the files under ``root``, at most ``limit``.

    Skips .git, __pycache__, .hivebus, node_modules and .venv directories.
    """
    snap: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted, so that two snapshots cut off by `limit` cover the same files.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:  # removed while we walked
                continue
            snap[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
            if len(snap) >= limit:
                return snap
    return snap


def changed_files(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]
) -> list[str]:
    """Sorted relative paths that were added, modified or deleted between two snapshots."""
    return sorted(
        path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
    )


async def run_child(
    spec: ChildSpec,
    *,
    cancel: asyncio.Event | None = None,
    sample_interval_s: float = 0.1,
) -> ChildOutcome:
    """Run ``spec`` in its own session, sample its tree, and kill whatever is left of it.

    On a timeout, on ``cancel`` and when this coroutine is cancelled the whole tree is
    killed; on return no process of the tree is alive.
    """
    started_at = utcnow()
    if not spec.argv:
        return _not_started(started_at, "nothing to run: the command line is empty")
    if not os.path.isdir(spec.cwd):
        return _not_started(
            started_at, f"working directory {spec.cwd} does not exist or is not a directory"
        )
    token = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        transport, protocol = await loop.subprocess_exec(
            _Protocol,
            *spec.argv,
            cwd=spec.cwd,
            env={**spec.env, MARKER_ENV: token},
            stdin=subprocess.DEVNULL if spec.stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        return _not_started(started_at, f"cannot start {spec.argv[0]}: no such file or command")
    except PermissionError:
        return _not_started(started_at, f"cannot start {spec.argv[0]}: permission denied")
    except OSError as exc:
        return _not_started(started_at, f"cannot start {spec.argv[0]}: {exc.strerror or exc}")

    pid = transport.get_pid()
    tree = _Tree(pid)
    sampler = asyncio.create_task(_sample_every(tree, sample_interval_s))
    if spec.stdin is not None:
        stdin = transport.get_pipe_transport(0)
        # A child that exits without reading it all only makes the transport drop the rest.
        stdin.write(spec.stdin)
        stdin.close()
    settled = False
    try:
        reason = await _wait_exit(protocol.exited, spec.timeout_s, cancel)
        await _kill_and_wait(tree, pid, token)
        await protocol.exited
        # EOF on both pipes; only a holder we could not find would keep them open.
        await asyncio.wait([protocol.closed], timeout=_SETTLE_S)
        settled = True
    finally:
        sampler.cancel()
        if not settled:  # this coroutine was cancelled, or failed: the tree goes first
            _kill(pid, [*tree.members(), *_marked(token)])
            # Closing the transport before the child watcher has seen the root exit
            # would reap the root behind the watcher's back.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(protocol.exited), _SETTLE_S)
        transport.close()
    return ChildOutcome(
        exit_code=transport.get_returncode(),
        stdout_tail=protocol.stdout.text(),
        stderr_tail=protocol.stderr.text(),
        started_at=started_at,
        finished_at=utcnow(),
        duration_s=time.monotonic() - t0,
        peak_rss_mb=tree.peak_rss / _MB,
        cpu_seconds=sum(tree.cpu.values()),
        timed_out=reason == "timeout",
        canceled=reason == "canceled",
        error=None,
    )


def _not_started(started_at: datetime, error: str) -> ChildOutcome:
    return ChildOutcome(
        exit_code=None, stdout_tail="", stderr_tail="", started_at=started_at,
        finished_at=utcnow(), duration_s=0.0, peak_rss_mb=0.0, cpu_seconds=0.0,
        timed_out=False, canceled=False, error=error,
    )


async def _wait_exit(
    exited: asyncio.Future[None], timeout_s: float | None, cancel: asyncio.Event | None
) -> str | None:
    """None when the root exited by itself, else "timeout" or "canceled"."""
    canceled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    try:
        done, _ = await asyncio.wait(
            [f for f in (exited, canceled) if f is not None],
            timeout=timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        if canceled is not None:
            canceled.cancel()
    if exited in done:
        return None
    return "canceled" if canceled in done else "timeout"


class _Protocol(asyncio.SubprocessProtocol):
    """Keeps the output tails and tells the root's exit apart from the pipes' EOF.

    Process.wait() would not do: before Python 3.12 it returns only after every pipe
    is closed, which a grandchild holding stdout can put off forever.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.stdout, self.stderr = _Tail(), _Tail()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        (self.stdout if fd == 1 else self.stderr).feed(data)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Tail:
    """The last TAIL_CHARS characters of a byte stream, holding a bounded number of bytes."""

    def __init__(self, chars: int = TAIL_CHARS):
        self._chars = chars
        self._limit = 4 * chars + 4  # utf-8 needs at most 4 bytes per character
        self._buf = bytearray()
        self._cut = False

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self._limit:
            del self._buf[: len(self._buf) - self._limit]
            self._cut = True

    def text(self) -> str:
        data = bytes(self._buf)
        if self._cut:  # drop the continuation bytes of a character cut in half
            data = data.lstrip(bytes(range(0x80, 0xC0)))
        return data.decode("utf-8", errors="replace")[-self._chars :]


class _Tree:
    """What the sampler has seen of one child's process tree."""

    def __init__(self, root_pid: int):
        try:
            self._root: psutil.Process | None = psutil.Process(root_pid)
        except psutil.Error:
            self._root = None
        # psutil.Process compares by pid and creation time, so a reused pid is a new key.
        self.seen: set[psutil.Process] = set()
        self.cpu: dict[psutil.Process, float] = {}
        self.peak_rss = 0

    def sample(self) -> None:
        if self._root is None:
            return
        try:
            members = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        rss = 0
        for proc in members:
            try:
                with proc.oneshot():
                    mem = proc.memory_info().rss
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            self.seen.add(proc)
            self.cpu[proc] = times.user + times.system
            rss += mem
        self.peak_rss = max(self.peak_rss, rss)

    def members(self) -> list[psutil.Process]:
        """Every process seen in the tree that is still alive, after a fresh sample."""
        self.sample()
        return [proc for proc in self.seen if _alive(proc)]


async def _sample_every(tree: _Tree, interval_s: float) -> None:
    while True:
        tree.sample()
        await asyncio.sleep(interval_s)


def _marked(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries this run's marker."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(MARKER_ENV) == token:
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or not ours to read
            continue
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(pgid: int | None, procs: Iterable[psutil.Process]) -> None:
    if pgid is not None:
        if pgid == os.getpgrp():
            raise ValueError(f"refusing to kill process group {pgid}: it is our own")
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is empty (some systems say EPERM when only zombies remain)
    for proc in procs:
        if proc.pid == os.getpid():
            continue
        try:
            proc.kill()
        except psutil.Error:
            continue


async def _kill_and_wait(tree: _Tree, pgid: int, token: str) -> None:
    # A few rounds, because a process that forked while we killed may have a child
    # we had not seen yet; its marker finds it in the next round.
    for _ in range(3):
        victims = [*tree.members(), *_marked(token)]
        _kill(pgid, victims)
        if not victims:
            return
        deadline = time.monotonic() + _SETTLE_S
        while any(_alive(proc) for proc in victims) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
