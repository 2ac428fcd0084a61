"""The warm call runner: call items of a task share one process, held to their limits."""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from actors.executor import ExecutorCore
from schemas.task import ResourceSpec
from schemas.work import WorkItemAssignment

CALLS = """
    import os, subprocess, sys, time

    STATE = []

    def pid():
        return os.getpid()

    def remember(value):
        STATE.append(value)
        print("remembered", value)
        return list(STATE)

    def env(name):
        return os.environ.get(name)

    def set_env():
        os.environ["LEFT_BEHIND"] = "yes"
        return True

    def bomb():
        chunks = []
        while True:
            chunks.append(bytearray(50 * 2**20))

    def sleep(seconds):
        time.sleep(seconds)

    def spawn(marker):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        with open(marker, "w") as f:
            f.write(str(proc.pid))
        return proc.pid

    def fail():
        raise RuntimeError("this call fails")
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    (path / "calls.py").write_text(textwrap.dedent(CALLS))
    (path / "version.py").write_text("def get():\n    return 1\n")
    return path


@pytest.fixture
def core(tmp_path: Path) -> ExecutorCore:
    return ExecutorCore(agent_id="executor-1", scratch_dir=str(tmp_path / "scratch"),
                        default_resources=ResourceSpec(cpu=1, memory_mb=256))


def attempt(workdir: Path, call: str, *, task_id: str = "t-1", item: str = "a", n: int = 1,
            args: dict | None = None, **resources) -> WorkItemAssignment:
    return WorkItemAssignment(
        task_id=task_id, iteration=1, attempt=n,
        item={"id": item, "call": call, "args": args or {}, "timeout_s": resources.pop("timeout_s", 30)},
        workdir=str(workdir), resources=resources,
    )


def run_all(core: ExecutorCore, *attempts: WorkItemAssignment):
    """The attempts one after the other in one event loop, as an executor runs them."""
    async def go():
        try:
            return [await core.run(a) for a in attempts]
        finally:
            await core.close()

    return asyncio.run(go())


def test_the_call_items_of_a_task_run_in_one_warm_process_that_keeps_its_modules(core, workdir):
    results = run_all(core, *(attempt(workdir, "calls:remember", item=f"i{k}", args={"value": k})
                              for k in range(3)),
                      attempt(workdir, "calls:pid", item="p1"), attempt(workdir, "calls:pid", item="p2"))

    assert [r.status for r in results] == ["succeeded"] * 5
    assert [r.output for r in results[:3]] == [[0], [0, 1], [0, 1, 2]]
    # Each call's output is its own, not the runner's whole history.
    assert [r.stdout_tail for r in results[:3]] == ["remembered 0\n", "remembered 1\n", "remembered 2\n"]
    assert results[3].output == results[4].output != os.getpid()
    assert all(r.peak_rss_mb > 5 for r in results)


def test_another_task_never_shares_the_runner_of_the_last(core, workdir):
    first, second = run_all(core, attempt(workdir, "calls:pid", task_id="t-1"),
                            attempt(workdir, "calls:pid", task_id="t-2"))

    assert first.status == second.status == "succeeded"
    assert first.output != second.output
    assert not psutil.pid_exists(first.output)


def test_a_module_whose_file_changed_is_imported_again(core, workdir):
    async def go():
        try:
            before = await core.run(attempt(workdir, "version:get", item="v1"))
            path = workdir / "version.py"
            path.write_text("def get():\n    return 2\n")
            stat = path.stat()  # a different size is enough, whatever the clock's grain
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
            after = await core.run(attempt(workdir, "version:get", item="v2"))
            return before, after
        finally:
            await core.close()

    before, after = asyncio.run(go())
    assert (before.output, after.output) == (1, 2)


def test_each_call_sees_exactly_its_own_environment(core, workdir):
    first, second, third = run_all(
        core, attempt(workdir, "calls:set_env", item="s"),
        attempt(workdir, "calls:env", item="e", args={"name": "LEFT_BEHIND"}),
        attempt(workdir, "calls:env", item="w", n=2, args={"name": "HIVEBUS_ATTEMPT"}))

    assert first.output is True
    assert second.output is None
    assert third.output == "2"


def test_a_call_that_raises_fails_and_the_runner_serves_the_next(core, workdir):
    failed, before, after = run_all(core, attempt(workdir, "calls:fail", item="f"),
                                    attempt(workdir, "calls:pid", item="p1"),
                                    attempt(workdir, "calls:pid", item="p2"))

    assert failed.status == "failed"
    assert "RuntimeError: this call fails" in failed.stderr_tail
    assert before.output == after.output


def test_a_bad_target_is_an_error_with_a_sentence(core, workdir):
    (result,) = run_all(core, attempt(workdir, "calls:nothing"))

    assert result.status == "error"
    assert result.error == "module 'calls' has no attribute 'nothing'"


def test_a_memory_bomb_is_killed_at_its_limit_and_the_next_call_gets_a_fresh_runner(core, workdir):
    before, bomb, after = run_all(core, attempt(workdir, "calls:pid", item="p1", memory_mb=200),
                                  attempt(workdir, "calls:bomb", item="b", memory_mb=200),
                                  attempt(workdir, "calls:pid", item="p2", memory_mb=200))

    assert bomb.status == "resource_limit"
    assert bomb.limit is not None and bomb.limit.limit == "memory"
    assert bomb.limit.limit_value == 200
    assert after.status == "succeeded"
    assert after.output != before.output
    assert not psutil.pid_exists(before.output)


def test_a_call_that_times_out_is_killed_with_its_runner(core, workdir):
    started = time.monotonic()
    slow, after = run_all(core, attempt(workdir, "calls:sleep", item="s", args={"seconds": 30}, timeout_s=1),
                          attempt(workdir, "calls:pid", item="p"))

    assert slow.status == "timeout"
    assert time.monotonic() - started < 20
    assert after.status == "succeeded"


def test_processes_a_call_leaves_running_are_killed_when_it_returns(core, workdir, tmp_path):
    marker = tmp_path / "child.pid"
    (result,) = run_all(core, attempt(workdir, "calls:spawn", args={"marker": str(marker)}))

    assert result.status == "succeeded"
    child = int(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(child) and \
            psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_a_call_with_a_cpu_seconds_budget_runs_in_a_cold_child_of_its_own(core, workdir):
    first, second = run_all(core, attempt(workdir, "calls:pid", item="c1", cpu_seconds=5),
                            attempt(workdir, "calls:pid", item="c2", cpu_seconds=5))

    assert first.status == second.status == "succeeded"
    assert first.output != second.output


def test_canceling_the_task_kills_a_running_call(core, workdir):
    async def go():
        try:
            running = asyncio.ensure_future(core.run(attempt(workdir, "calls:sleep", args={"seconds": 30})))
            while not core.running:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            core.cancel("t-1")
            return await asyncio.wait_for(running, 20)
        finally:
            await core.close()

    result = asyncio.run(go())
    assert result.status == "canceled"
