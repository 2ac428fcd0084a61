"""Run one child process tree, observe its memory and CPU, enforce its limits, and never
leave it behind.

The sampler of run_child is also the watchdog: it reads the tree's RSS, CPU seconds and
process count every sample, kills the whole tree when one of them goes over its limit,
and notices when the kernel (a cgroup, an rlimit) acted first. See actors/limits.py for
which mechanism enforces what.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import psutil
import structlog

from schemas.base import utcnow
from schemas.work import TAIL_CHARS, LimitHit, LimitKind, Mechanism

from .limits import Limits, TreeCage, child_argv, choose_mechanism

#: Set to a fresh token in every child's environment. Descendants inherit it, so a
#: process that double-forked out of the tree (and out of its process group) can still
#: be found and killed; Jenkins' ProcessTreeKiller uses the same trick.
MARKER_ENV = "HIVEBUS_SANDBOX_TOKEN"

_MB = 1024 * 1024
_SKIP_DIRS = frozenset({".git", "__pycache__", ".hivebus", "node_modules", ".venv"})
#: How long to wait for killed processes to die and for the pipes to reach EOF.
_SETTLE_S = 5.0
_CALLRUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_callrunner.py")
#: The sample interval when memory or cores are capped: the watchdog alone must catch a
#: memory bomb well within a second, and the duty cycle of a CPU cap needs a fine grain.
LIMIT_SAMPLE_INTERVAL_S = 0.05
#: CPU seconds a duty-cycled tree may run ahead of its cap, per core of the cap.
_BURST_S = 0.2

log = structlog.get_logger("hivebus.sandbox")


@dataclass(frozen=True)
class ChildSpec:
    """What to run: argv in cwd with exactly env (nothing is inherited implicitly).

    ``limits`` apply to the whole tree; the earlier of ``timeout_s`` and
    ``limits.timeout_s`` is its wall-time limit.
    """

    argv: Sequence[str]
    cwd: str
    env: Mapping[str, str]
    timeout_s: float | None = None
    stdin: bytes | None = None
    limits: Limits = Limits()


@dataclass(frozen=True)
class ChildOutcome:
    """What was observed. ``error`` is a sentence when the child could not be started;
    ``limit`` says which limit the tree was killed for (a timeout is one too)."""

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
    limit: LimitHit | None = None
    peak_rss_at: datetime | None = None


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

    On a timeout, on a limit, on ``cancel`` and when this coroutine is cancelled the
    whole tree is killed; on return no process of the tree is alive and its cgroup, if
    it had one, is gone.
    """
    started_at = utcnow()
    if not spec.argv:
        return _not_started(started_at, "nothing to run: the command line is empty")
    if not os.path.isdir(spec.cwd):
        return _not_started(
            started_at, f"working directory {spec.cwd} does not exist or is not a directory"
        )
    limits = spec.limits
    if limits.memory_mb is not None or limits.cpu is not None:
        sample_interval_s = min(sample_interval_s, LIMIT_SAMPLE_INTERVAL_S)
    cage = _open_cage(limits)
    try:
        return await _run(spec, cage, started_at, cancel, sample_interval_s)
    finally:
        if cage is not None and (left := cage.remove()):
            log.warning("cgroup directories could not be removed", directories=left)


def _open_cage(limits: Limits) -> TreeCage | None:
    support = choose_mechanism()
    if support is None:
        return None
    try:
        return TreeCage(support, limits)
    except OSError as exc:
        # The cgroups that were writable when probed refuse a group now: the watchdog
        # still enforces every limit, and a hit says "watchdog".
        log.warning("no cgroup for a child; the watchdog alone enforces its limits",
                    mechanism=support.version, error=str(exc))
        return None


async def _run(
    spec: ChildSpec,
    cage: TreeCage | None,
    started_at: datetime,
    cancel: asyncio.Event | None,
    sample_interval_s: float,
) -> ChildOutcome:
    timeouts = [t for t in (spec.timeout_s, spec.limits.timeout_s) if t is not None]
    timeout_s = min(timeouts) if timeouts else None
    token = uuid.uuid4().hex
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    argv = child_argv(spec.argv, spec.limits, cage)
    if argv[0] != spec.argv[0] and shutil.which(spec.argv[0], path=spec.env.get("PATH")) is None:
        # Started through the cage's sh, a missing program would only be its exit code 127.
        return _not_started(started_at, f"cannot start {spec.argv[0]}: no such file or command")
    try:
        transport, protocol = await loop.subprocess_exec(
            _Protocol,
            *argv,
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
    watch = _Watch(pid, spec.limits, cage)
    # Once now, after exec: a child that is done before the sampler's first turn still
    # has its peak RSS.
    watch.sample()
    sampler = asyncio.create_task(_watch_every(watch, sample_interval_s, first_after=True))
    if spec.stdin is not None:
        stdin = transport.get_pipe_transport(0)
        # A child that exits without reading it all only makes the transport drop the rest.
        stdin.write(spec.stdin)
        stdin.close()
    settled = False
    hit: LimitHit | None = None
    try:
        reason = await _wait_exit(protocol.exited, sampler, timeout_s, cancel)
        if reason == "timeout":
            assert timeout_s is not None
            now = utcnow()
            hit = LimitHit(limit="timeout", limit_value=timeout_s,
                           peak_value=round(time.monotonic() - t0, 3), mechanism="watchdog",
                           crossed_at=now, killed_at=now)
        await _kill_and_wait(watch, pid, token)
        await protocol.exited
        # EOF on both pipes; only a holder we could not find would keep them open.
        await asyncio.wait([protocol.closed], timeout=_SETTLE_S)
        sampler.cancel()
        await asyncio.wait([sampler])
        if not sampler.cancelled():
            hit = hit or sampler.result()  # a failed sampler raises here
        settled = True
    finally:
        sampler.cancel()
        if not settled:  # this coroutine was cancelled, or failed: the tree goes first
            _kill(pid, [*watch.members(), *_marked(token)])
            if cage is not None:
                cage.kill()
            # Closing the transport before the child watcher has seen the root exit
            # would reap the root behind the watcher's back.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(protocol.exited), _SETTLE_S)
        transport.close()
    exit_code = transport.get_returncode()
    return ChildOutcome(
        exit_code=exit_code,
        stdout_tail=protocol.stdout.text(),
        stderr_tail=protocol.stderr.text(),
        started_at=started_at,
        finished_at=utcnow(),
        duration_s=time.monotonic() - t0,
        peak_rss_mb=watch.peak_rss / _MB,
        peak_rss_at=watch.peak_rss_at,
        cpu_seconds=watch.cpu_seconds(),
        timed_out=reason == "timeout",
        canceled=reason == "canceled",
        error=None,
        limit=hit or watch.after_exit(exit_code),
    )


def _not_started(started_at: datetime, error: str) -> ChildOutcome:
    return ChildOutcome(
        exit_code=None, stdout_tail="", stderr_tail="", started_at=started_at,
        finished_at=utcnow(), duration_s=0.0, peak_rss_mb=0.0, cpu_seconds=0.0,
        timed_out=False, canceled=False, error=error,
    )


async def _wait_exit(
    exited: asyncio.Future[None],
    sampler: asyncio.Task[LimitHit],
    timeout_s: float | None,
    cancel: asyncio.Event | None,
) -> str | None:
    """None when the root exited by itself, else "limit", "timeout" or "canceled"."""
    canceled = asyncio.ensure_future(cancel.wait()) if cancel is not None else None
    try:
        done, _ = await asyncio.wait(
            [f for f in (exited, sampler, canceled) if f is not None],
            timeout=timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        if canceled is not None:
            canceled.cancel()
    if sampler in done:
        return "limit"
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


class _Watch:
    """The sampler and watchdog of one child's tree: usage, peaks, limits, the CPU duty
    cycle when no cgroup caps the cores, and the kill."""

    def __init__(self, root_pid: int, limits: Limits, cage: TreeCage | None):
        self.limits = limits
        self.cage = cage
        self._pgid = root_pid
        try:
            self._root: psutil.Process | None = psutil.Process(root_pid)
        except psutil.Error:
            self._root = None
        # psutil.Process compares by pid and creation time, so a reused pid is a new key.
        self.seen: set[psutil.Process] = set()
        self.cpu: dict[psutil.Process, float] = {}
        self._by_pid: dict[int, psutil.Process] = {}
        self.rss = 0
        self.procs = 0
        self.peak_rss = 0
        self.peak_rss_at: datetime | None = None
        self.peak_procs = 0
        # Without a cgroup's CPU quota the cores are capped by stopping the tree
        # whenever it has used more than its share (a token bucket of CPU seconds).
        cap = limits.cpu
        self._duty_cycle = cap is not None and cage is None and cap < (os.cpu_count() or 1)
        self._tokens = (cap or 0.0) * _BURST_S
        self._last = (time.monotonic(), 0.0)
        self.stopped = False

    def _members(self) -> list[psutil.Process]:
        if self._root is None:
            return []
        if self.cage is None:
            try:
                return [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return [self._root]
        # The group holds the whole tree, double-forked daemons included, and reading it
        # is cheaper than psutil's walk over every process of the machine.
        found = [self._root]
        for pid in self.cage.pids():
            if pid == self._root.pid:
                continue
            if pid not in self._by_pid:
                try:
                    self._by_pid[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue
            found.append(self._by_pid[pid])
        return found

    def sample(self) -> None:
        rss = count = 0
        for proc in self._members():
            try:
                with proc.oneshot():
                    mem = proc.memory_info().rss
                    times = proc.cpu_times()
            except psutil.Error:
                self._by_pid.pop(proc.pid, None)
                continue
            self.seen.add(proc)
            self.cpu[proc] = times.user + times.system
            rss += mem
            count += 1
        self.rss, self.procs = rss, count
        if rss > self.peak_rss:
            self.peak_rss, self.peak_rss_at = rss, utcnow()
        self.peak_procs = max(self.peak_procs, count)

    def members(self) -> list[psutil.Process]:
        """Every process seen in the tree that is still alive, after a fresh sample."""
        self.sample()
        return [proc for proc in self.seen if _alive(proc)]

    def cpu_seconds(self) -> float:
        """The tree's CPU time: exact from the cgroup, else summed over sampled processes."""
        if self.cage is not None and (exact := self.cage.cpu_seconds()) is not None:
            return exact
        return sum(self.cpu.values())

    def check(self) -> LimitHit | None:
        """After a sample: kill the tree and say why if a limit was crossed.

        A limit the kernel enforced is crossed at the sample that saw it: the kernel
        acts at the crossing itself, and no sample can see the usage above its limit.
        """
        limits, cage = self.limits, self.cage
        if cage is not None:
            kernel = cage.kernel_hit()
            if kernel is not None:
                return self._trip(kernel, *self._kernel_peak(kernel), cage.mechanism)
        if (limits.memory_mb is not None and cage is None
                and self.rss / _MB > limits.memory_mb):
            return self._trip("memory", limits.memory_mb, self.rss / _MB, "watchdog")
        cpu = self.cpu_seconds()
        if limits.cpu_seconds is not None and cpu > limits.cpu_seconds:
            return self._trip("cpu_seconds", limits.cpu_seconds, cpu, "watchdog")
        if limits.max_procs is not None and self.procs > limits.max_procs:
            return self._trip("max_procs", limits.max_procs, self.procs, "watchdog")
        return None

    def after_exit(self, exit_code: int | None) -> LimitHit | None:
        """A limit the kernel enforced that no sample saw: the tree is already gone."""
        if self.cage is not None and (kernel := self.cage.kernel_hit()) is not None:
            limit, peak = self._kernel_peak(kernel)
            return self._hit(kernel, limit, peak, self.cage.mechanism, utcnow())
        if exit_code == -signal.SIGXCPU and self.limits.cpu_seconds is not None:
            return self._hit("cpu_seconds", self.limits.cpu_seconds, self.cpu_seconds(),
                             "rlimit", utcnow())
        return None

    def _kernel_peak(self, kind: LimitKind) -> tuple[float, float]:
        assert self.cage is not None
        if kind == "memory":
            assert self.limits.memory_mb is not None
            peak = self.cage.memory_peak_mb()
            return self.limits.memory_mb, peak if peak is not None else self.peak_rss / _MB
        assert self.limits.max_procs is not None
        return self.limits.max_procs, max(self.cage.procs_peak() or 0, self.peak_procs)

    def _trip(self, kind: LimitKind, limit: float, peak: float, mechanism: Mechanism) -> LimitHit:
        crossed = utcnow()
        self.kill()
        return self._hit(kind, limit, peak, mechanism, crossed)

    def _hit(self, kind: LimitKind, limit: float, peak: float, mechanism: Mechanism,
             crossed: datetime) -> LimitHit:
        return LimitHit(limit=kind, limit_value=limit, peak_value=round(peak, 3),
                        mechanism=mechanism, crossed_at=crossed, killed_at=utcnow())

    def kill(self) -> None:
        """SIGKILL the tree now: its process group, what was sampled, its cgroup."""
        _kill(self._pgid, [proc for proc in self.seen if _alive(proc)])
        if self.cage is not None:
            self.cage.kill()

    def throttle(self) -> None:
        """Stop the tree while it is ahead of its CPU share, continue it when it is not."""
        if not self._duty_cycle:
            return
        assert self.limits.cpu is not None
        now, used = time.monotonic(), self.cpu_seconds()
        then, used_then = self._last
        self._last = (now, used)
        cap = self.limits.cpu
        self._tokens = min(cap * _BURST_S, self._tokens + cap * (now - then)) - (used - used_then)
        if self._tokens < 0 and not self.stopped:
            self._signal(signal.SIGSTOP)
            self.stopped = True
        elif self._tokens >= 0 and self.stopped:
            self._signal(signal.SIGCONT)
            self.stopped = False

    def _signal(self, sig: int) -> None:
        if self._pgid != os.getpgrp():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, sig)
        for proc in self.seen:  # members that left the process group
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)


async def _watch_every(watch: _Watch, interval_s: float, *, first_after: bool = False) -> LimitHit:
    """Sample until a limit is crossed; return it once the tree has been killed for it.

    ``first_after``: the caller has just sampled, so the first sample is one interval on."""
    if first_after:
        await asyncio.sleep(interval_s)
    while True:
        watch.sample()
        hit = watch.check()
        if hit is not None:
            return hit
        watch.throttle()
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


async def _kill_and_wait(watch: _Watch, pgid: int, token: str) -> None:
    # A few rounds, because a process that forked while we killed may have a child
    # we had not seen yet; its marker (or its cgroup) finds it in the next round.
    if watch.cage is not None and not watch.cage.pids():
        return  # the usual end: the root exited and left nothing in its group
    for _ in range(3):
        # A cgroup holds the whole tree, forks and setsid included; without one, the
        # environment marker is how escaped processes are found (a scan of every process).
        victims = [*watch.members(), *(_marked(token) if watch.cage is None else [])]
        _kill(pgid, victims)
        if watch.cage is not None:
            watch.cage.kill()
        if not victims:
            return
        deadline = time.monotonic() + _SETTLE_S
        while any(_alive(proc) for proc in victims) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
