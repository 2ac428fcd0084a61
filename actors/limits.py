"""Limits on one work item's process tree, and the kernel mechanism that enforces them.

Which mechanism enforces what:

=============  =============================  ==================================
limit          cgroup v2 / cgroup v1          fallback (no writable cgroups)
=============  =============================  ==================================
memory_mb      memory.max / limit_in_bytes    watchdog: summed RSS of the tree
               (swap off); the kernel's OOM   (shared pages count once per
               killer acts, the tree is then  process, so it errs on the safe
               killed by the watchdog         side)
cpu            cpu.max / cfs_quota_us         watchdog: SIGSTOP/SIGCONT duty
                                              cycle of the whole tree
cpu_seconds    watchdog on the exact          watchdog on sampled CPU times,
               cpuacct / cpu.stat usage       RLIMIT_CPU per process as backstop
max_procs      pids.max (threads count too)   watchdog counts processes;
                                              RLIMIT_NPROC when not root
timeout_s      watchdog                       watchdog
=============  =============================  ==================================

The mechanism is detected once per process: cgroup v2 when a writable cgroup2 mount
offers the memory, cpu and pids controllers to a child group, else cgroup v1 when the
memory, cpu and pids hierarchies are writable, else rlimits plus the watchdog. Set
``HIVEBUS_LIMITS_MECHANISM`` to ``cgroup-v2``, ``cgroup-v1`` or ``watchdog`` to force a
choice (``auto`` is the default). Per-child groups live in
``<hierarchy>/<our own group>/hivebus/<our pid>-<random>`` and are removed with the tree.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import resource
import shlex
import signal
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import psutil

from schemas.task import ResourceSpec
from schemas.work import LimitHit, LimitKind

#: Forces the mechanism: ``auto`` (default), ``cgroup-v2``, ``cgroup-v1`` or ``watchdog``.
MECHANISM_ENV = "HIVEBUS_LIMITS_MECHANISM"
#: Processes (tasks, under cgroups: threads count) an item may have when it names no
#: max_procs. High enough for a parallel build or a JVM's threads, low enough that a fork
#: bomb is stopped long before the kernel's pid table fills.
DEFAULT_MAX_PROCS = 1024
#: Name of the group, under our own cgroup, that holds the per-child groups.
CGROUP_PARENT = "hivebus"

_MB = 1024 * 1024
_CFS_PERIOD_US = 100_000
#: How long remove() keeps killing what is left in a group before giving up on it.
_DRAIN_S = 5.0
_CONTROLLERS_V1 = ("memory", "cpu", "pids")
_CONTROLLERS_V2 = frozenset({"memory", "cpu", "pids"})

CgroupVersion = Literal["cgroup-v2", "cgroup-v1"]


@dataclass(frozen=True)
class Limits:
    """What one child tree may use; None means unlimited.

    ``cpu`` is in cores (0.5 is half a core over time), ``memory_mb`` caps the tree's
    memory, ``cpu_seconds`` its total CPU time, ``max_procs`` its processes and
    ``timeout_s`` its wall time. Even ``Limits()`` caps processes at DEFAULT_MAX_PROCS.
    """

    memory_mb: float | None = None
    cpu: float | None = None
    cpu_seconds: float | None = None
    max_procs: int | None = DEFAULT_MAX_PROCS
    timeout_s: float | None = None

    @classmethod
    def from_resources(cls, resources: ResourceSpec, *, timeout_s: float | None = None) -> Limits:
        """The limits of a work item's ``resources``; no max_procs means DEFAULT_MAX_PROCS."""
        return cls(
            memory_mb=resources.memory_mb,
            cpu=resources.cpu,
            cpu_seconds=resources.cpu_seconds,
            max_procs=resources.max_procs or DEFAULT_MAX_PROCS,
            timeout_s=timeout_s,
        )


@dataclass(frozen=True)
class CgroupSupport:
    """Where per-child groups are made: the hivebus parent group of each hierarchy.

    cgroup v2 has one parent (key ``unified``); cgroup v1 one per controller (``memory``,
    ``cpu``, ``pids`` and, when mounted, ``cpuacct``), possibly the same directory.
    """

    version: CgroupVersion
    parents: Mapping[str, str]


def choose_mechanism() -> CgroupSupport | None:
    """The cgroups to put child trees in, or None for rlimits plus the watchdog.

    Reads ``HIVEBUS_LIMITS_MECHANISM`` on every call; the probing of the machine is done
    once per process. A forced cgroup version that the machine does not offer means the
    watchdog, never the other version.
    """
    forced = os.environ.get(MECHANISM_ENV, "auto") or "auto"
    if forced not in ("auto", "cgroup-v2", "cgroup-v1", "watchdog"):
        raise ValueError(
            f"{MECHANISM_ENV}={forced!r} is not one of auto, cgroup-v2, cgroup-v1, watchdog"
        )
    if forced in ("auto", "cgroup-v2") and (found := detect_cgroup_v2()) is not None:
        return found
    if forced in ("auto", "cgroup-v1") and (found := detect_cgroup_v1()) is not None:
        return found
    return None


@functools.cache
def detect_cgroup_v2() -> CgroupSupport | None:
    """cgroup v2 if our group can have a child with memory, cpu and pids; probed once."""
    mounts = [m for m in _mounts() if m.fstype == "cgroup2"]
    ours = _own_groups().get("")
    if ours is None:
        return None
    for mount in mounts:
        group = _inside(mount, ours)
        if group is None:
            continue
        try:
            with open(os.path.join(group, "cgroup.controllers")) as f:
                if not _CONTROLLERS_V2 <= set(f.read().split()):
                    continue
            parent = os.path.join(group, CGROUP_PARENT)
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent)
            # Fails with EBUSY when our own group holds processes and is not a root:
            # cgroup v2 lets only leaves have processes.
            enable = " ".join(f"+{c}" for c in sorted(_CONTROLLERS_V2))
            _write(os.path.join(group, "cgroup.subtree_control"), enable)
            _write(os.path.join(parent, "cgroup.subtree_control"), enable)
            _probe(parent, "pids.max", "memory.max", "cpu.max")
        except OSError:
            continue
        _sweep(parent)
        return CgroupSupport("cgroup-v2", {"unified": parent})
    return None


@functools.cache
def detect_cgroup_v1() -> CgroupSupport | None:
    """cgroup v1 if the memory, cpu and pids hierarchies take a child group; probed once."""
    groups = _own_groups()
    parents: dict[str, str] = {}
    for mount in (m for m in _mounts() if m.fstype == "cgroup"):
        options = set(mount.options.split(","))
        for controller in (*_CONTROLLERS_V1, "cpuacct"):
            if controller not in options or controller in parents:
                continue
            ours = next((path for key, path in groups.items() if controller in key.split(",")),
                        None)
            group = _inside(mount, ours) if ours is not None else None
            if group is not None:
                parents[controller] = os.path.join(group, CGROUP_PARENT)
    if not all(c in parents for c in _CONTROLLERS_V1):
        return None
    probes = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us",
              "pids": "pids.max", "cpuacct": "cpuacct.usage"}
    for controller, parent in list(parents.items()):
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent)
            _probe(parent, probes[controller])
        except OSError:
            if controller == "cpuacct":  # optional: CPU time is then sampled per process
                del parents[controller]
                continue
            return None
    for parent in set(parents.values()):
        _sweep(parent)
    return CgroupSupport("cgroup-v1", parents)


class TreeCage:
    """One child tree's cgroup: made with its limits, joined by the child before exec,
    read by the watchdog, and removed with whatever is still in it.

    Raises OSError when the group cannot be made; nothing is left behind then.
    """

    def __init__(self, support: CgroupSupport, limits: Limits):
        self.mechanism: CgroupVersion = support.version
        self.limits = limits
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._dirs = {key: os.path.join(parent, self.name)
                      for key, parent in support.parents.items()}
        self._made: list[str] = []
        try:
            for path in dict.fromkeys(self._dirs.values()):
                # The parent is made again in case someone removed it since we probed.
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.mkdir(path)
                self._made.append(path)
            self._apply(limits)
        except OSError:
            self.remove()
            raise

    @property
    def directories(self) -> list[str]:
        """The group's directories, one per hierarchy (a single one for cgroup v2)."""
        return list(self._made)

    @property
    def procs_files(self) -> list[str]:
        """The files a process writes ``0`` to in order to join the group."""
        return [os.path.join(path, "cgroup.procs") for path in self._made]

    def _dir(self, controller: str) -> str | None:
        if self.mechanism == "cgroup-v2":
            return self._dirs["unified"]
        return self._dirs.get(controller)

    def _file(self, controller: str, name: str) -> str | None:
        path = self._dir(controller)
        return None if path is None else os.path.join(path, name)

    def _apply(self, limits: Limits) -> None:
        v2 = self.mechanism == "cgroup-v2"
        if limits.memory_mb is not None:
            size = str(int(limits.memory_mb * _MB))
            if v2:
                _write(self._file("memory", "memory.max"), size)
                _write_if_present(self._file("memory", "memory.swap.max"), "0")
                # The OOM killer then takes the whole group, not only its largest process.
                _write_if_present(self._file("memory", "memory.oom.group"), "1")
            else:
                _write(self._file("memory", "memory.limit_in_bytes"), size)
                # memory + swap: only present with swap accounting; must be >= the limit.
                _write_if_present(self._file("memory", "memory.memsw.limit_in_bytes"), size)
        if limits.cpu is not None:
            quota = max(1000, int(limits.cpu * _CFS_PERIOD_US))
            if v2:
                _write(self._file("cpu", "cpu.max"), f"{quota} {_CFS_PERIOD_US}")
            else:
                _write(self._file("cpu", "cpu.cfs_period_us"), str(_CFS_PERIOD_US))
                _write(self._file("cpu", "cpu.cfs_quota_us"), str(quota))
        if limits.max_procs is not None:
            _write(self._file("pids", "pids.max"), str(limits.max_procs))

    def pids(self) -> set[int]:
        """Processes in the group now, in any of its hierarchies."""
        found: set[int] = set()
        for path in self._made:
            text = _read(os.path.join(path, "cgroup.procs"))
            if text:
                found.update(int(line) for line in text.split())
        return found

    def cpu_seconds(self) -> float | None:
        """CPU time of every process that ever ran in the group; None if not accounted."""
        if self.mechanism == "cgroup-v2":
            usec = _field(self._file("cpu", "cpu.stat"), "usage_usec")
            return None if usec is None else usec / 1e6
        ns = _number(self._file("cpuacct", "cpuacct.usage"))
        return None if ns is None else ns / 1e9

    def memory_peak_mb(self) -> float | None:
        """The group's highest memory use so far (RSS and page cache), in MB."""
        if self.mechanism == "cgroup-v2":
            peak = _number(self._file("memory", "memory.peak"))
        else:
            peak = _number(self._file("memory", "memory.max_usage_in_bytes"))
        return None if peak is None else peak / _MB

    def procs_peak(self) -> int | None:
        """The group's highest number of tasks so far, where the kernel keeps it."""
        peak = _number(self._file("pids", "pids.peak"))
        return None if peak is None else int(peak)

    def kernel_hit(self) -> LimitKind | None:
        """The limit the kernel enforced: an OOM kill in the group, or a refused fork."""
        if self.limits.memory_mb is not None:
            events = "memory.events" if self.mechanism == "cgroup-v2" else "memory.oom_control"
            if (_field(self._file("memory", events), "oom_kill") or 0) > 0:
                return "memory"
        if self.limits.max_procs is not None:
            if (_field(self._file("pids", "pids.events"), "max") or 0) > 0:
                return "max_procs"
        return None

    def kill(self) -> int:
        """SIGKILL every process in the group now; returns how many were signalled."""
        if self.mechanism == "cgroup-v2":
            _write_if_present(self._file("unified", "cgroup.kill"), "1")
        pids = self.pids()
        for pid in pids:
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return len(pids)

    def remove(self) -> list[str]:
        """Kill what is left in the group and remove its directories.

        Returns the directories that could not be removed within a few seconds (a process
        stuck in the kernel); an empty list when all went.
        """
        deadline = time.monotonic() + _DRAIN_S
        left = list(self._made)
        while left:
            self.kill()
            for path in list(left):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    continue
                left.remove(path)
                self._made.remove(path)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return left


def child_argv(argv: Sequence[str], limits: Limits, cage: TreeCage | None) -> list[str]:
    """``argv``, started through a one-line ``sh`` that first joins ``cage`` and sets the
    rlimits, then execs it: not one instruction of the program runs outside the cgroup.

    This replaces a ``preexec_fn``, which forces a full fork of the (large) agent process
    and costs several milliseconds per child; without one, Python spawns with vfork.
    """
    steps = [f"echo 0 > {shlex.quote(path)}" for path in (cage.procs_files if cage else [])]
    flags = {resource.RLIMIT_CPU: "-t", resource.RLIMIT_NPROC: "-u"}
    for which, (soft, hard) in _rlimits(limits):
        # Soft first: a hard limit below the current (unlimited) soft one is refused.
        steps += [f"ulimit -S {flags[which]} {soft}", f"ulimit -H {flags[which]} {hard}"]
    if not steps:
        return list(argv)
    return ["/bin/sh", "-c", " && ".join(steps) + ' && exec "$@"', "hivebus-cage", *argv]


def describe(hit: LimitHit) -> str:
    """A sentence for a user: which limit, the measured value, the limit, the mechanism."""
    over = "over" if hit.peak_value > hit.limit_value else "at"
    if hit.limit == "memory":
        what = f"memory {hit.peak_value:.0f} MB {over} its limit of {hit.limit_value:g} MB"
    elif hit.limit == "cpu_seconds":
        what = (f"{hit.peak_value:.1f} CPU seconds {over} its budget of "
                f"{hit.limit_value:g} CPU seconds")
    elif hit.limit == "max_procs":
        what = f"{hit.peak_value:.0f} processes {over} its limit of {hit.limit_value:g}"
    else:
        what = f"ran {hit.peak_value:.1f} s, {over} its timeout of {hit.limit_value:g} s"
    return f"killed: {what} ({hit.mechanism})"


def _rlimits(limits: Limits) -> list[tuple[int, tuple[int, int]]]:
    found = []
    if limits.cpu_seconds is not None:
        # A backstop per process, a little above the tree's budget: the watchdog, which
        # sums the whole tree, normally acts first. SIGXCPU at soft, SIGKILL at hard.
        soft = math.ceil(limits.cpu_seconds) + 1
        found.append((resource.RLIMIT_CPU, _within(resource.RLIMIT_CPU, soft, soft + 1)))
    if limits.max_procs is not None and os.geteuid() != 0:
        # RLIMIT_NPROC counts every process of the user, not only this tree, and root
        # ignores it; the watchdog and pids.max are what contain a tree.
        uid = os.geteuid()
        mine = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"]
                   and p.info["uids"].real == uid)
        soft = mine + limits.max_procs
        found.append((resource.RLIMIT_NPROC, _within(resource.RLIMIT_NPROC, soft, soft)))
    return found


def _within(which: int, soft: int, hard: int) -> tuple[int, int]:
    """``(soft, hard)`` lowered to what the current hard limit allows."""
    _, current = resource.getrlimit(which)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    return soft, hard


@dataclass(frozen=True)
class _Mount:
    root: str
    point: str
    fstype: str
    options: str


def _mounts() -> list[_Mount]:
    """cgroup and cgroup2 mounts of this mount namespace, from /proc/self/mountinfo."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        # id parent major:minor root point options [optional...] - fstype source superoptions
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        found.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), tail[0], tail[2]))
    return found


def _own_groups() -> dict[str, str]:
    """Controllers (comma-joined, "" for cgroup v2) -> our group's path in that hierarchy."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    groups = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups[parts[1]] = parts[2]
    return groups


def _inside(mount: _Mount, group: str) -> str | None:
    """The directory of ``group`` under ``mount``, if the mount shows it."""
    root = mount.root.rstrip("/")
    if group != root and not group.startswith(root + "/"):
        return None
    path = os.path.join(mount.point, group[len(root):].lstrip("/"))
    return path if os.path.isdir(path) else None


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace(
        "\\134", "\\")


def _probe(parent: str, *files: str) -> None:
    """Make and remove a child group of ``parent``; OSError unless it offers ``files``."""
    probe = os.path.join(parent, f"{os.getpid()}-probe")
    with contextlib.suppress(FileExistsError):
        os.mkdir(probe)
    try:
        missing = [name for name in files if not os.path.exists(os.path.join(probe, name))]
        if missing:
            raise FileNotFoundError(errno.ENOENT, f"no {', '.join(missing)} in a child group")
    finally:
        os.rmdir(probe)


def _sweep(parent: str) -> None:
    """Remove empty groups that agents now dead left behind (killed before their cleanup)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        owner, _, _ = name.partition("-")
        if not owner.isdigit() or psutil.pid_exists(int(owner)):
            continue
        # rmdir refuses a group that still has processes: those are left to the agent's
        # own orphan sweep, which knows whose they are.
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(parent, name))


def _write(path: str | None, value: str) -> None:
    if path is None:
        raise FileNotFoundError(errno.ENOENT, "the group has no such controller")
    with open(path, "w") as f:
        f.write(value)


def _write_if_present(path: str | None, value: str) -> None:
    if path is not None and os.path.exists(path):
        _write(path, value)


def _read(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:  # the group is gone
        return None


def _number(path: str | None) -> float | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        return None


def _field(path: str | None, key: str) -> float | None:
    """The value of ``key`` in a flat-keyed file such as memory.events or cpu.stat."""
    text = _read(path)
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return float(value)
    return None
