"""Limits on a child process tree are enforced: memory, cores, CPU seconds, processes, time.

Each scenario runs with the mechanism this machine offers (``auto``: a cgroup where one
is writable) and again with the fallback forced (rlimits plus the watchdog).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from actors.executor import ExecutorCore
from actors.limits import (
    DEFAULT_MAX_PROCS,
    MECHANISM_ENV,
    CgroupSupport,
    Limits,
    TreeCage,
    choose_mechanism,
    describe,
)
from actors.sandbox import ChildOutcome, ChildSpec, run_child
from schemas.base import utcnow
from schemas.task import ResourceSpec, WorkItemSpec
from schemas.work import LimitHit, WorkItemAssignment

# Allocates up to 2 GB in 16 MB steps, touching every page, and says how far it got.
# It stops at 2 GB by itself, so even a broken limit cannot take more than that.
MEMORY_BOMB = """
    import time
    chunks = []
    for step in range(1, 129):
        chunks.append(bytearray(b"x") * (16 << 20))
        print(f"{step * 16} MB", flush=True)
        time.sleep(0.02)
"""

BUSY_LOOP = "while True: pass"

# A Python fork bomb: every process forks forever. Unlike a shell one it cannot leave
# its process group, its session or its cgroup.
FORK_BOMB = "import os\nwhile True: os.fork()"

#: A safety net for every scenario: nothing here may run longer than this.
TIMEOUT_S = 60.0


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def run(code: str, tmp_path: Path, limits: Limits, **env: str) -> ChildOutcome:
    spec = ChildSpec(argv=python(code), cwd=str(tmp_path), env={**os.environ, **env},
                     limits=limits)
    return asyncio.run(run_child(spec))


def our_groups() -> list[str]:
    """Per-child cgroups this test process made that still exist."""
    support = choose_mechanism()
    if support is None:
        return []
    prefix = f"{os.getpid()}-"
    return [
        os.path.join(parent, name)
        for parent in set(support.parents.values())
        for name in os.listdir(parent)
        if name.startswith(prefix)
    ]


@pytest.fixture(autouse=True)
def no_cgroup_is_left_behind():
    """Every test here ends with no cgroup of ours left; the hivebus parent groups are
    shared with other agents on the machine, so only our own pid's groups are counted."""
    yield
    assert our_groups() == []


@pytest.fixture(params=["auto", "watchdog"])
def mechanism(request, monkeypatch) -> str:
    """The mechanism a limit hit must name under the forced setting."""
    monkeypatch.setenv(MECHANISM_ENV, request.param)
    support = choose_mechanism()
    return support.version if support is not None else "watchdog"


def marked(name: str, value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(name) == value:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_marked(name: str, value: str) -> list[psutil.Process]:
    """SIGKILL every process carrying ``name=value`` until none is left; the survivors
    of the last round (none, unless something is badly wrong)."""
    for _ in range(50):
        victims = marked(name, value)
        if not victims:
            return []
        for proc in victims:
            try:
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(victims, timeout=1)
    return marked(name, value)


def test_a_memory_bomb_is_killed_within_a_second_of_crossing_its_limit(tmp_path, mechanism):
    outcome = run(MEMORY_BOMB, tmp_path, Limits(memory_mb=256, timeout_s=TIMEOUT_S))
    hit = outcome.limit
    assert hit is not None and hit.limit == "memory"
    assert hit.mechanism == mechanism
    assert hit.limit_value == 256
    assert 200 <= hit.peak_value < 2048
    assert hit.crossed_at is not None and outcome.peak_rss_at is not None
    assert hit.killed_at - hit.crossed_at <= timedelta(seconds=1)
    assert hit.killed_at - outcome.peak_rss_at <= timedelta(seconds=1)
    assert outcome.exit_code == -9
    reached = [int(line.split()[0]) for line in outcome.stdout_tail.split("\n") if line]
    assert 128 <= reached[-1] < 512, "it grew step by step and was stopped near its limit"
    assert not outcome.timed_out


def test_a_busy_loop_gets_about_half_a_core_and_is_stopped_after_its_cpu_seconds(
    tmp_path, mechanism
):
    outcome = run(BUSY_LOOP, tmp_path, Limits(cpu=0.5, cpu_seconds=2, timeout_s=TIMEOUT_S))
    hit = outcome.limit
    assert hit is not None and hit.limit == "cpu_seconds"
    # Under a cgroup the kernel caps the cores and the budget is read from the group's
    # exact accounting; without one the watchdog does both (duty cycle, sampled times).
    assert hit.mechanism == "watchdog"
    assert hit.limit_value == 2
    assert 1.5 <= hit.peak_value <= 3.5
    assert 1.5 <= outcome.cpu_seconds <= 3.5
    # Two CPU seconds at half a core take about four seconds of wall time.
    assert outcome.cpu_seconds / outcome.duration_s <= 0.75
    assert not outcome.timed_out


def test_a_fork_bomb_is_contained_and_the_machine_stays_usable(tmp_path, mechanism):
    # The sandbox's own marker is secret to it; this one lets the test clean up by itself.
    tag = uuid.uuid4().hex
    try:
        outcome = run(FORK_BOMB, tmp_path, Limits(max_procs=50, timeout_s=TIMEOUT_S),
                      HIVEBUS_TEST_FORK_BOMB=tag)
    finally:
        survivors = kill_marked("HIVEBUS_TEST_FORK_BOMB", tag)
    hit = outcome.limit
    assert hit is not None and hit.limit == "max_procs"
    assert hit.mechanism == mechanism
    assert hit.limit_value == 50
    assert hit.peak_value >= 50
    assert survivors == [], "the sandbox had killed the whole bomb before the test looked"
    assert subprocess.run(["true"]).returncode == 0


def test_a_timeout_kills_the_tree_and_is_reported_as_a_limit_of_the_watchdog(tmp_path):
    outcome = run("import time; time.sleep(60)", tmp_path, Limits(timeout_s=1))
    assert outcome.timed_out
    hit = outcome.limit
    assert hit is not None
    assert (hit.limit, hit.mechanism, hit.limit_value) == ("timeout", "watchdog", 1)
    assert 1 <= hit.peak_value < 30


def test_the_earlier_of_the_two_timeouts_applies(tmp_path):
    spec = ChildSpec(argv=python("import time; time.sleep(60)"), cwd=str(tmp_path),
                     env=dict(os.environ), timeout_s=30, limits=Limits(timeout_s=1))
    outcome = asyncio.run(run_child(spec))
    assert outcome.limit is not None and outcome.limit.limit_value == 1


def test_a_child_within_its_limits_reports_usage_and_no_limit(tmp_path, mechanism):
    code = "b = bytearray(b'x') * 50_000_000; import time; time.sleep(0.3)"
    limits = Limits(memory_mb=512, cpu=1, cpu_seconds=30, max_procs=20, timeout_s=TIMEOUT_S)
    outcome = run(code, tmp_path, limits)
    assert outcome.exit_code == 0
    assert outcome.limit is None
    assert outcome.peak_rss_mb >= 40 and outcome.peak_rss_at is not None
    assert outcome.cpu_seconds > 0


def test_a_child_is_in_its_own_cgroup_from_its_first_instruction(tmp_path, monkeypatch):
    monkeypatch.setenv(MECHANISM_ENV, "auto")
    support = choose_mechanism()
    if support is None:
        pytest.skip("no writable cgroups on this machine: children run under the watchdog")
    outcome = run("print(open('/proc/self/cgroup').read())", tmp_path, Limits())
    groups = {}
    for line in filter(None, outcome.stdout_tail.splitlines()):
        _, controllers, path = line.split(":", 2)
        groups[controllers] = path
    # cgroup v2 has one group (controllers ""), cgroup v1 one per hierarchy.
    keys = [""] if support.version == "cgroup-v2" else ["memory", "pids", "cpu"]
    limited = [path for key, path in groups.items() if key in keys]
    assert limited
    for path in limited:
        assert path.split("/")[-2] == "hivebus"
        assert path.split("/")[-1].startswith(f"{os.getpid()}-")


def test_the_fallback_sets_rlimit_cpu_a_little_above_the_budget(tmp_path, monkeypatch):
    monkeypatch.setenv(MECHANISM_ENV, "watchdog")
    code = "import resource; print(*resource.getrlimit(resource.RLIMIT_CPU))"
    outcome = run(code, tmp_path, Limits(cpu_seconds=2.5))
    assert outcome.stdout_tail == "4 5\n"


def test_cancelling_a_limited_child_removes_its_cgroup(tmp_path, monkeypatch):
    monkeypatch.setenv(MECHANISM_ENV, "auto")

    async def scenario():
        ready = tmp_path / "ready"
        code = f"open({str(ready)!r}, 'w').close(); import time; time.sleep(60)"
        spec = ChildSpec(argv=python(code), cwd=str(tmp_path), env=dict(os.environ),
                         limits=Limits(memory_mb=100))
        running = asyncio.create_task(run_child(spec))
        while not ready.exists():
            await asyncio.sleep(0.01)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(scenario())
    assert our_groups() == []


def test_limits_of_a_work_item_take_the_default_process_cap():
    limits = Limits.from_resources(ResourceSpec(cpu=0.5, memory_mb=256), timeout_s=10)
    assert limits == Limits(memory_mb=256, cpu=0.5, cpu_seconds=None,
                            max_procs=DEFAULT_MAX_PROCS, timeout_s=10)
    assert Limits.from_resources(ResourceSpec(max_procs=7)).max_procs == 7


def test_an_unknown_forced_mechanism_is_refused_with_a_sentence(monkeypatch):
    monkeypatch.setenv(MECHANISM_ENV, "cgroup-v3")
    with pytest.raises(ValueError, match="HIVEBUS_LIMITS_MECHANISM='cgroup-v3' is not one of"):
        choose_mechanism()


@pytest.mark.parametrize(
    ("hit", "sentence"),
    [
        (dict(limit="memory", limit_value=256, peak_value=262.4, mechanism="cgroup-v1"),
         "killed: memory 262 MB over its limit of 256 MB (cgroup-v1)"),
        (dict(limit="memory", limit_value=256, peak_value=256, mechanism="cgroup-v2"),
         "killed: memory 256 MB at its limit of 256 MB (cgroup-v2)"),
        (dict(limit="cpu_seconds", limit_value=2, peak_value=2.04, mechanism="watchdog"),
         "killed: 2.0 CPU seconds over its budget of 2 CPU seconds (watchdog)"),
        (dict(limit="max_procs", limit_value=50, peak_value=50, mechanism="cgroup-v1"),
         "killed: 50 processes at its limit of 50 (cgroup-v1)"),
    ],
)
def test_a_limit_hit_reads_as_a_sentence(hit, sentence):
    assert describe(LimitHit(**hit, killed_at=utcnow())) == sentence


def test_a_cgroup_v2_cage_writes_the_kernels_formats(tmp_path):
    # A fake hierarchy: what the cage writes, and how it reads the kernel's event files.
    parent = tmp_path / "hivebus"
    parent.mkdir()
    limits = Limits(memory_mb=256, cpu=0.5, cpu_seconds=2, max_procs=50)
    cage = TreeCage(CgroupSupport("cgroup-v2", {"unified": str(parent)}), limits)
    (group,) = map(Path, cage.directories)
    assert group.parent == parent and group.name.startswith(f"{os.getpid()}-")
    assert (group / "memory.max").read_text() == str(256 * 1024 * 1024)
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert (group / "pids.max").read_text() == "50"
    assert cage.procs_files == [str(group / "cgroup.procs")]
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (group / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (group / "memory.peak").write_text(str(256 * 1024 * 1024))
    assert cage.kernel_hit() == "memory"
    assert cage.cpu_seconds() == 2.5
    assert cage.memory_peak_mb() == 256
    for path in group.iterdir():  # a real group's files vanish with it
        path.unlink()
    assert cage.remove() == []
    assert not group.exists()


def test_the_same_core_runs_a_normal_item_right_after_a_killed_one(tmp_path, mechanism):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "bomb.py").write_text(textwrap.dedent(MEMORY_BOMB))
    core = ExecutorCore(agent_id="executor-1", scratch_dir=str(tmp_path / "scratch"))

    def assignment(item_id: str, command: str, **resources) -> WorkItemAssignment:
        return WorkItemAssignment(
            task_id="task-1", iteration=1,
            item=WorkItemSpec(id=item_id, run=command, timeout_s=TIMEOUT_S),
            workdir=str(workdir), resources=ResourceSpec(**resources),
        )

    async def scenario():
        killed = await core.run(assignment("bomb", f"{sys.executable} bomb.py", memory_mb=256))
        # Long enough to be sampled: a child gone before the first sample has no peak.
        normal = await core.run(assignment("after", "echo fine; sleep 0.5"))
        return killed, normal

    killed, normal = asyncio.run(scenario())
    assert killed.status == "resource_limit"
    assert killed.limit is not None and killed.limit.limit == "memory"
    assert killed.limit.mechanism == mechanism
    assert killed.error == describe(killed.limit)
    assert killed.error.startswith("killed: memory ")
    assert killed.error.endswith(f" its limit of 256 MB ({mechanism})")
    assert killed.peak_rss_mb >= 128 and killed.peak_rss_at is not None
    assert killed.cpu_seconds > 0
    assert normal.status == "succeeded" and normal.stdout_tail == "fine\n"
    assert normal.limit is None
    assert normal.peak_rss_at is not None and normal.peak_rss_mb > 0
    assert core.running == []


def test_unset_item_resources_take_the_cores_defaults(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    core = ExecutorCore(agent_id="executor-1", scratch_dir=str(tmp_path / "scratch"),
                        default_resources=ResourceSpec(cpu_seconds=0.5))
    work = WorkItemAssignment(
        task_id="task-1", iteration=1,
        item=WorkItemSpec(id="spin", run=f"{sys.executable} -c 'while True: pass'",
                          timeout_s=TIMEOUT_S),
        workdir=str(workdir),
    )
    result = asyncio.run(core.run(work))
    assert result.status == "resource_limit"
    assert result.limit is not None and result.limit.limit == "cpu_seconds"
    assert result.limit.limit_value == 0.5
