"""The executor and verifier cores, called directly: no NATS, no Ray."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from actors.executor import ExecutorCore
from actors.verifier import VerifierCore
from schemas.task import GateSpec, WorkItemSpec
from schemas.work import TAIL_CHARS, FailedGate, FailureContext, VerifyRequest, WorkItemAssignment

MATHMOD = """
    import asyncio

    def add(a, b):
        return a + b

    async def mul(a, b):
        await asyncio.sleep(0)
        return a * b

    def explode():
        raise ValueError("boom")

    NOT_CALLABLE = 42
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    (path / "mathmod.py").write_text(textwrap.dedent(MATHMOD))
    return path


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    return tmp_path / "scratch"


@pytest.fixture
def core(scratch: Path) -> ExecutorCore:
    return ExecutorCore(agent_id="executor-1", node_id="node-a", scratch_dir=str(scratch))


def assignment(
    workdir: Path,
    *,
    iteration: int = 1,
    env: dict[str, str] | None = None,
    failure: FailureContext | None = None,
    **item,
) -> WorkItemAssignment:
    return WorkItemAssignment(
        task_id="task-1",
        iteration=iteration,
        item=WorkItemSpec(id="build", **item),
        workdir=str(workdir),
        env=env or {},
        failure=failure,
    )


def run(core: ExecutorCore, work: WorkItemAssignment):
    """One attempt in its own event loop; the warm call runner ends with the loop."""
    async def attempt():
        try:
            return await core.run(work)
        finally:
            await core.close()

    return asyncio.run(attempt())


def test_a_shell_item_that_succeeds_reports_output_files_and_tests(core, workdir, scratch):
    command = "echo hello > out.txt; echo done; echo '3 passed in 0.01s'"
    result = run(core, assignment(workdir, run=command))
    assert result.status == "succeeded" and result.ok
    assert result.exit_code == 0
    assert result.error is None
    assert result.stdout_tail == "done\n3 passed in 0.01s\n"
    assert result.files_changed == ["out.txt"]
    assert result.commands_run == [command]
    assert result.tests_run == ["3 passed in 0.01s"]
    assert result.evidence[0] == "exit code 0"
    assert result.evidence[1].startswith("stdout sha256:") and len(result.evidence[1]) == 26
    assert result.evidence[2:] == ["files changed: 1", "3 passed in 0.01s"]
    assert (result.task_id, result.item_id, result.attempt) == ("task-1", "build", 1)
    assert (result.agent_id, result.node_id) == ("executor-1", "node-a")
    assert result.finished_at >= result.started_at
    assert result.limit is None
    assert result.cpu_seconds >= 0 and result.peak_rss_mb >= 0
    assert list(scratch.iterdir()) == [], "temp files are removed"


def test_summary_lines_of_common_test_runners_become_tests_run(core, workdir):
    lines = [
        "===== 1 failed, 2 passed in 0.05s =====",
        "Ran 3 tests in 0.001s",
        "test result: ok. 3 passed; 0 failed; 0 ignored",
    ]
    command = f"echo '{lines[0]}'; echo '{lines[1]}' >&2; echo '{lines[2]}'; echo '4 passed'"
    result = run(core, assignment(workdir, run=command))
    assert result.tests_run == ["1 failed, 2 passed in 0.05s", lines[2], lines[1]]


def test_a_failing_shell_item_reports_its_exit_code_and_stderr(core, workdir):
    result = run(core, assignment(workdir, run="echo oops >&2; exit 3"))
    assert result.status == "failed"
    assert result.exit_code == 3
    assert result.error == "exited with code 3"
    assert result.stderr_tail == "oops\n"


def test_an_item_that_runs_out_of_time_is_killed_and_reported_as_timeout(core, workdir):
    result = run(core, assignment(workdir, run="sleep 30", timeout_s=1))
    assert result.status == "timeout"
    assert result.error == "timed out after 1 s; its process tree was killed"
    assert result.duration_s < 20, "killed well before the 30 s sleep would end"
    assert result.limit is not None
    assert (result.limit.limit, result.limit.mechanism) == ("timeout", "watchdog")
    assert result.limit.limit_value == 1


def test_a_call_item_returns_the_functions_value_as_output(core, workdir, scratch):
    result = run(core, assignment(workdir, call="mathmod:add", args={"a": 1, "b": 2}))
    assert result.status == "succeeded"
    assert result.output == 3
    assert result.commands_run == ["call mathmod:add"]
    assert list(scratch.iterdir()) == []


def test_a_call_item_awaits_a_coroutine_function(core, workdir):
    result = run(core, assignment(workdir, call="mathmod:mul", args={"a": 6, "b": 7}))
    assert result.status == "succeeded"
    assert result.output == 42


def test_a_call_item_imports_the_tasks_own_module_even_when_its_name_is_one_of_ours(
    core, workdir
):
    (workdir / "sandbox.py").write_text("def where():\n    return 'task'\n")
    result = run(core, assignment(workdir, call="sandbox:where"))
    assert result.output == "task"


def test_a_call_item_that_raises_fails_with_its_traceback(core, workdir):
    result = run(core, assignment(workdir, call="mathmod:explode"))
    assert result.status == "failed"
    assert result.exit_code == 1
    assert "Traceback" in result.stderr_tail
    assert "ValueError: boom" in result.stderr_tail
    assert result.error == "mathmod:explode raised ValueError: boom"
    assert result.output is None


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("nosuchmod:add", "no module named 'nosuchmod'"),
        ("mathmod:missing", "module 'mathmod' has no attribute 'missing'"),
        ("mathmod:NOT_CALLABLE", "mathmod:NOT_CALLABLE is not callable (it is 'int')"),
    ],
)
def test_a_bad_call_target_is_an_error_with_a_sentence(core, workdir, target, error):
    result = run(core, assignment(workdir, call=target))
    assert result.status == "error"
    assert result.error is not None and result.error.startswith(error)


def test_a_missing_workdir_is_an_error_and_nothing_runs(core, tmp_path):
    missing = tmp_path / "missing"
    result = run(core, assignment(missing, run="touch ran"))
    assert result.status == "error"
    assert result.error == f"workdir {missing} does not exist or is not a directory"
    assert result.exit_code is None and result.commands_run == []


def test_the_child_sees_the_task_env_and_the_failure_context(core, workdir):
    failure = FailureContext(
        task_id="task-1", iteration=1, failed_gates=[FailedGate(name="tests", exit_code=1)]
    )
    command = (
        'echo "$GREETING $HIVEBUS_TASK_ID $HIVEBUS_ITERATION $HIVEBUS_WORK_ITEM '
        '$HIVEBUS_ATTEMPT"; cat "$HIVEBUS_FAILURE_CONTEXT"'
    )
    work = assignment(
        workdir, run=command, iteration=2, env={"GREETING": "hi"}, failure=failure
    )
    result = run(core, work)
    first, context = result.stdout_tail.split("\n", 1)
    assert first == "hi task-1 2 build 1"
    assert FailureContext.model_validate(json.loads(context)) == failure


def test_what_the_child_writes_to_the_handoff_file_becomes_handoff_notes(core, workdir):
    result = run(core, assignment(workdir, run='echo "next: run the linter" > "$HIVEBUS_HANDOFF"'))
    assert result.handoff_notes == "next: run the linter\n"
    assert result.files_changed == [], "the handoff file lives outside the workdir"


def test_long_handoff_notes_are_capped(core, workdir):
    result = run(core, assignment(workdir, run='yes note | head -c 100000 > "$HIVEBUS_HANDOFF"'))
    assert result.handoff_notes.startswith("note\nnote\n")
    assert len(result.handoff_notes) == TAIL_CHARS


def test_cancel_stops_every_running_item_of_the_task(core, workdir):
    async def scenario():
        running = asyncio.create_task(core.run(assignment(workdir, run="touch started; sleep 30")))
        while not (workdir / "started").exists():
            await asyncio.sleep(0.01)
        assert core.running == ["task-1:1:build:1"]
        assert core.cancel("another-task") == 0
        assert core.cancel("task-1") == 1
        return await asyncio.wait_for(running, 30)

    result = asyncio.run(scenario())
    assert result.status == "canceled"
    assert result.error == "canceled while running; its process tree was killed"
    assert result.duration_s < 20, "stopped well before the 30 s sleep would end"
    assert core.running == []


def verify(workdir: Path | str, *gates: GateSpec | str | dict) -> list:
    request = VerifyRequest(
        task_id="task-1",
        iteration=1,
        workdir=str(workdir),
        env={"WORD": "three"},
        gates=[GateSpec.model_validate(g) for g in gates],
    )
    return asyncio.run(VerifierCore(agent_id="verifier-1").verify(request)).results


def test_the_verifier_runs_every_gate_in_order_and_reports_the_failures(workdir):
    results = verify(
        workdir,
        {"name": "first", "run": "echo one >> order.txt"},
        {"name": "broken", "run": "echo two >> order.txt; echo bad >&2; exit 4"},
        {"name": "last", "run": 'echo "$WORD $LOCAL" >> order.txt', "env": {"LOCAL": "x"}},
    )
    assert [r.gate for r in results] == ["first", "broken", "last"]
    assert [r.passed for r in results] == [True, False, True]
    assert (workdir / "order.txt").read_text() == "one\ntwo\nthree x\n"
    broken = results[1]
    assert broken.kind == "command"
    assert broken.exit_code == 4
    assert broken.stderr_tail == "bad\n"
    assert broken.problems == ["exited with code 4"]
    assert all(r.agent_id == "verifier-1" for r in results)


def test_a_gate_that_runs_out_of_time_fails(workdir):
    (result,) = verify(workdir, {"name": "slow", "run": "sleep 30", "timeout_s": 1})
    assert not result.passed
    assert result.problems == ["timed out after 1 s; its process tree was killed"]
    assert result.duration_s < 20


def test_the_doctor_finds_commands_that_the_other_gates_cannot_run(workdir):
    (workdir / "check.sh").write_text("#!/bin/sh\nexit 0\n")
    (workdir / "check.sh").chmod(0o755)
    results = verify(
        workdir,
        "doctor",
        {"name": "lint", "run": "no-such-linter-hivebus --check ."},
        {"name": "local", "run": "./missing.sh"},
        {"name": "script", "run": "./check.sh"},
        {"name": "builtin", "run": "cd . && test -d ."},
        {"name": "assign", "run": "FOO=1 sh -c true"},
    )
    doctor = results[0]
    assert doctor.kind == "doctor" and not doctor.passed
    assert doctor.problems == [
        "gate lint: command 'no-such-linter-hivebus' is not on PATH",
        f"gate local: ./missing.sh is not an executable file in {workdir}",
    ]
    assert doctor.stdout_tail == "\n".join(doctor.problems)
    assert [r.passed for r in results[1:]] == [False, False, True, True, True]


def test_the_doctor_passes_a_sound_workdir(workdir):
    (result,) = verify(workdir, "doctor")
    assert result.passed and result.problems == []


def test_the_doctor_reports_a_missing_workdir_and_the_gates_fail(tmp_path):
    missing = tmp_path / "missing"
    doctor, gate = verify(missing, "doctor", {"name": "tests", "run": "true"})
    assert doctor.problems == [f"workdir {missing} does not exist"]
    assert not gate.passed
    assert gate.problems == [f"working directory {missing} does not exist or is not a directory"]


def test_the_doctor_reports_a_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    (doctor,) = verify(path, "doctor")
    assert doctor.problems == [f"workdir {path} is not a directory"]


def test_the_doctor_reports_a_workdir_that_refuses_new_files():
    # /proc refuses new files even to root, for whom chmod does not make a directory read-only.
    (doctor,) = verify("/proc", "doctor")
    assert not doctor.passed
    assert doctor.problems[0].startswith("workdir /proc is not writable: ")
