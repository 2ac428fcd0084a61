"""The sandbox runs one child process tree, observes it, and never leaves it behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from actors.sandbox import (
    ChildSpec,
    call_argv,
    changed_files,
    kill_tree,
    run_child,
    shell_argv,
    snapshot_files,
)
from schemas.work import TAIL_CHARS


def spec(cwd: Path, argv: list[str], **kwargs) -> ChildSpec:
    return ChildSpec(argv=argv, cwd=str(cwd), env=dict(os.environ), **kwargs)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone_within(pid: int, timeout_s: float) -> bool:
    """Wait for a process (not ours to reap) to die; True when it did."""
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def wait_for_file(path: Path, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not path.exists():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout_s)


# A grandchild that leaves the process group and writes its pid when it is up.
SETSID_GRANDCHILD = """
    import os, subprocess, sys, time
    env = {"PATH": os.environ["PATH"]}  # no inherited environment: only the tree finds it
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True, env=env)
    with open("grandchild.tmp", "w") as f:
        f.write(str(p.pid))
    os.rename("grandchild.tmp", "grandchild.pid")
    time.sleep(60)
"""

# A daemon: fork, setsid, fork again; the grandchild is re-parented away from the tree.
DOUBLE_FORK_GRANDCHILD = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open("grandchild.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename("grandchild.tmp", "grandchild.pid")
            time.sleep(60)
        os._exit(0)
    while not os.path.exists("grandchild.pid"):
        time.sleep(0.01)
    time.sleep(60)
"""


def test_a_child_reports_its_exit_code_and_output(tmp_path):
    outcome = asyncio.run(run_child(spec(tmp_path, shell_argv("echo out; echo err >&2; exit 3"))))
    assert outcome.exit_code == 3
    assert outcome.stdout_tail == "out\n"
    assert outcome.stderr_tail == "err\n"
    assert outcome.error is None
    assert not outcome.timed_out and not outcome.canceled
    assert outcome.finished_at >= outcome.started_at


def test_the_tails_keep_only_the_end_of_a_large_output(tmp_path):
    code = """
        import sys
        for i in range(200_000):
            sys.stdout.write(f"line {i}\\n")
            sys.stderr.write(f"err {i}\\n")
        print("END")
    """
    outcome = asyncio.run(run_child(spec(tmp_path, python(code))))
    assert outcome.exit_code == 0
    assert len(outcome.stdout_tail) == TAIL_CHARS
    assert outcome.stdout_tail.endswith("line 199999\nEND\n")
    assert len(outcome.stderr_tail) == TAIL_CHARS
    assert outcome.stderr_tail.endswith("err 199999\n")


def test_a_tail_cut_inside_a_multibyte_character_decodes_cleanly(tmp_path):
    code = 'print("\\u00e9" * 50_000 + "x", end="")'
    outcome = asyncio.run(run_child(spec(tmp_path, python(code))))
    assert outcome.stdout_tail == "\u00e9" * (TAIL_CHARS - 1) + "x"


def test_stdin_reaches_the_child(tmp_path):
    code = "import sys; print(sys.stdin.read()[::-1])"
    outcome = asyncio.run(run_child(spec(tmp_path, python(code), stdin=b"abc")))
    assert outcome.stdout_tail == "cba\n"


def test_a_timeout_kills_a_grandchild_that_left_the_process_group(tmp_path):
    outcome = asyncio.run(run_child(spec(tmp_path, python(SETSID_GRANDCHILD), timeout_s=5)))
    assert outcome.timed_out
    assert outcome.exit_code == -9
    assert outcome.limit is not None and outcome.limit.limit == "timeout"
    assert outcome.duration_s < 30, "killed well before the 60 s sleep would end"
    assert not alive(int((tmp_path / "grandchild.pid").read_text()))


def test_a_timeout_kills_a_double_forked_daemon(tmp_path):
    outcome = asyncio.run(run_child(spec(tmp_path, python(DOUBLE_FORK_GRANDCHILD), timeout_s=5)))
    assert outcome.timed_out
    assert outcome.duration_s < 30, "killed well before the 60 s sleep would end"
    assert not alive(int((tmp_path / "grandchild.pid").read_text()))


# A root that starts a double-forked daemon and exits as soon as the daemon is up.
DAEMON_OF_A_SHORT_ROOT = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open("daemon.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename("daemon.tmp", "daemon.pid")
            time.sleep(60)
        os._exit(0)
    while not os.path.exists("daemon.pid"):
        time.sleep(0.01)
"""


@pytest.mark.parametrize("mechanism", ["auto", "watchdog"])
def test_a_daemon_left_by_a_finished_root_is_killed_under_every_mechanism(
    tmp_path, monkeypatch, mechanism
):
    # Every child has a cgroup where one is writable (the default limits cap its
    # processes); without one the daemon is found by its marker.
    monkeypatch.setenv("HIVEBUS_LIMITS_MECHANISM", mechanism)
    outcome = asyncio.run(run_child(spec(tmp_path, python(DAEMON_OF_A_SHORT_ROOT), timeout_s=30)))
    assert outcome.exit_code == 0 and not outcome.timed_out
    assert outcome.duration_s < 20, "did not wait for the 60 s sleep"
    assert not alive(int((tmp_path / "daemon.pid").read_text()))


def test_setting_the_cancel_event_kills_the_tree(tmp_path):
    async def scenario():
        cancel = asyncio.Event()
        command = "sleep 60 & echo $! > bg.pid; wait"
        running = asyncio.create_task(
            run_child(spec(tmp_path, shell_argv(command)), cancel=cancel)
        )
        await wait_for_file(tmp_path / "bg.pid")
        cancel.set()
        return await running

    outcome = asyncio.run(scenario())
    assert outcome.canceled and not outcome.timed_out
    assert outcome.duration_s < 30, "killed well before the 60 s sleep would end"
    assert not alive(int((tmp_path / "bg.pid").read_text()))


def test_cancelling_the_coroutine_still_kills_the_tree(tmp_path):
    async def scenario():
        running = asyncio.create_task(run_child(spec(tmp_path, python(SETSID_GRANDCHILD))))
        await wait_for_file(tmp_path / "grandchild.pid")
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    asyncio.run(scenario())
    assert gone_within(int((tmp_path / "grandchild.pid").read_text()), timeout_s=10)


def test_orphans_left_in_the_group_by_a_finished_root_are_killed(tmp_path):
    outcome = asyncio.run(run_child(spec(tmp_path, shell_argv("sleep 60 & echo $! > bg.pid"))))
    assert outcome.exit_code == 0
    assert outcome.duration_s < 30, "did not wait for the 60 s sleep"
    assert not alive(int((tmp_path / "bg.pid").read_text()))


def test_a_missing_cwd_is_an_error_sentence_and_nothing_runs(tmp_path):
    outcome = asyncio.run(run_child(spec(tmp_path / "nowhere", shell_argv("true"))))
    assert outcome.exit_code is None
    assert outcome.error == (
        f"working directory {tmp_path / 'nowhere'} does not exist or is not a directory"
    )


def test_a_missing_executable_is_an_error_sentence(tmp_path):
    outcome = asyncio.run(run_child(spec(tmp_path, ["no-such-program-hivebus"])))
    assert outcome.exit_code is None
    assert outcome.error == "cannot start no-such-program-hivebus: no such file or command"


def test_the_peak_rss_of_a_child_allocating_100_mb_is_observed(tmp_path):
    code = "b = bytearray(100_000_000); import time; time.sleep(0.5)"
    outcome = asyncio.run(run_child(spec(tmp_path, python(code)), sample_interval_s=0.05))
    assert outcome.exit_code == 0
    assert outcome.peak_rss_mb >= 80
    assert outcome.started_at <= outcome.peak_rss_at <= outcome.finished_at
    assert outcome.limit is None


def test_cpu_seconds_of_a_busy_child_are_observed(tmp_path):
    code = """
        import time
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
        time.sleep(0.3)
    """
    outcome = asyncio.run(run_child(spec(tmp_path, python(code)), sample_interval_s=0.05))
    assert outcome.cpu_seconds >= 0.3


def test_kill_tree_kills_a_process_its_children_and_its_group(tmp_path):
    root = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60 & echo $! > bg.pid; wait"],
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        asyncio.run(wait_for_file(tmp_path / "bg.pid"))
        kill_tree(root.pid, root.pid)
        assert root.wait(timeout=30) == -9
        assert gone_within(int((tmp_path / "bg.pid").read_text()), timeout_s=10)
    finally:
        root.kill()
        root.wait()


def test_kill_tree_refuses_to_kill_our_own_process_group():
    with pytest.raises(ValueError):
        kill_tree(os.getpid(), os.getpgrp())


def test_argv_builders():
    assert shell_argv("echo hi") == ["/bin/sh", "-c", "echo hi"]
    python_exe, runner, target = call_argv("pkg.mod:fn")
    assert (python_exe, target) == (sys.executable, "pkg.mod:fn")
    assert Path(runner).name == "_callrunner.py" and Path(runner).is_file()


def test_changed_files_lists_added_modified_and_deleted_files(tmp_path):
    (tmp_path / "keep.txt").write_text("same")
    (tmp_path / "edit.txt").write_text("old")
    (tmp_path / "gone.txt").write_text("bye")
    (tmp_path / "sub").mkdir()
    before = snapshot_files(str(tmp_path))
    (tmp_path / "edit.txt").write_text("new and longer")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "sub" / "new.txt").write_text("hello")
    for skipped in (".git", "__pycache__", ".hivebus", "node_modules", ".venv"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "ignored.txt").write_text("x")
    after = snapshot_files(str(tmp_path))
    assert changed_files(before, after) == ["edit.txt", "gone.txt", os.path.join("sub", "new.txt")]


def test_a_snapshot_stops_at_its_limit(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}.txt").write_text(str(i))
    assert len(snapshot_files(str(tmp_path), limit=4)) == 4
    assert snapshot_files(str(tmp_path), limit=4) == snapshot_files(str(tmp_path), limit=4)
