"""The task state machine and the end-of-iteration verdict, without NATS or Ray."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from orchestrator.machine import (
    ALLOWED,
    InvalidTransition,
    Verdict,
    enter_stage,
    failure_context,
    fingerprint,
    judge_iteration,
    transition,
)
from schemas import (
    TERMINAL_STATES,
    FailureContext,
    GateResult,
    HivebusError,
    TaskRecord,
    TaskSpec,
    TaskState,
    WorkItemResult,
)

S = TaskState
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)
TASK = "t-abc"

EXPECTED_EDGES = {
    (S.DRAFT, S.APPROVED), (S.DRAFT, S.CANCELED), (S.DRAFT, S.BLOCKED),
    (S.APPROVED, S.QUEUED), (S.APPROVED, S.CANCELED), (S.APPROVED, S.BLOCKED),
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.CANCELED), (S.QUEUED, S.BLOCKED),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED), (S.RUNNING, S.FAILED), (S.RUNNING, S.BLOCKED),
    (S.RUNNING, S.CANCELED),
}
REASON_FOR = {S.SUCCEEDED: "done", S.FAILED: "internal_error",
              S.BLOCKED: "approval_required", S.CANCELED: "canceled"}


def record(state: TaskState = S.DRAFT, **fields) -> TaskRecord:
    return TaskRecord(task_id=TASK, spec=TaskSpec(title="x", gates=["doctor"]),
                      state=state, created_at=T0, updated_at=T0, **fields)


def running(iteration: int = 1) -> TaskRecord:
    return record(S.RUNNING, stage="executing", iteration=iteration, started_at=T0)


def move(rec: TaskRecord, to: TaskState, now: datetime = T1) -> TaskRecord:
    return transition(rec, to, now=now, exit_reason=REASON_FOR.get(to),
                      stage="planning" if to is S.RUNNING else None)


def item(item_id: str, status: str = "succeeded", *, exit_code: int | None = None,
         stdout: str = "", stderr: str = "", **fields) -> WorkItemResult:
    return WorkItemResult(task_id=TASK, iteration=1, item_id=item_id, status=status,
                          exit_code=exit_code, stdout_tail=stdout, stderr_tail=stderr,
                          **fields)


def gate(name: str, passed: bool = True, *, exit_code: int | None = None,
         stdout: str = "", stderr: str = "", **fields) -> GateResult:
    return GateResult(task_id=TASK, iteration=1, gate=name, kind="command", passed=passed,
                      exit_code=exit_code, stdout_tail=stdout, stderr_tail=stderr, **fields)


def judge(items=(), gates=None, *, iteration=1, max_iterations=5, previous=None,
          can_replan=True) -> Verdict:
    return judge_iteration(iteration=iteration, max_iterations=max_iterations,
                           item_results=list(items), gate_results=gates,
                           previous_fingerprint=previous, can_replan=can_replan)


# --- transitions -------------------------------------------------------------------

def test_the_allowed_table_is_exactly_the_documented_one():
    edges = {(a, b) for a, targets in ALLOWED.items() for b in targets}
    assert edges == EXPECTED_EDGES
    assert set(ALLOWED) == set(TaskState)


@pytest.mark.parametrize(("start", "to"), sorted(EXPECTED_EDGES))
def test_every_allowed_transition_is_accepted(start, to):
    rec = running() if start is S.RUNNING else record(start)
    moved = move(rec, to)
    assert moved.state is to
    assert moved.updated_at == T1
    assert moved.exit_reason == REASON_FOR.get(to)


@pytest.mark.parametrize(("start", "to"), [
    (S.DRAFT, S.QUEUED), (S.DRAFT, S.RUNNING), (S.DRAFT, S.SUCCEEDED),
    (S.APPROVED, S.RUNNING), (S.APPROVED, S.FAILED), (S.QUEUED, S.SUCCEEDED),
    (S.QUEUED, S.APPROVED), (S.RUNNING, S.QUEUED), (S.RUNNING, S.RUNNING),
    (S.DRAFT, S.DRAFT),
])
def test_a_disallowed_transition_raises_invalid_transition_with_its_fields(start, to):
    rec = running() if start is S.RUNNING else record(start)
    with pytest.raises(InvalidTransition) as caught:
        move(rec, to)
    err = caught.value
    assert isinstance(err, HivebusError)
    assert (err.task_id, err.from_state, err.to_state) == (TASK, start, to)
    assert TASK in str(err) and start.value in str(err)


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("to", list(TaskState))
def test_a_terminal_state_goes_nowhere(terminal, to):
    rec = record(terminal, exit_reason=REASON_FOR[terminal])
    with pytest.raises(InvalidTransition, match="terminal"):
        move(rec, to)


@pytest.mark.parametrize("to", [S.FAILED, S.BLOCKED, S.CANCELED, S.SUCCEEDED])
def test_a_terminal_state_requires_an_exit_reason(to):
    with pytest.raises(InvalidTransition, match="exit_reason"):
        transition(running(), to, now=T1)


def test_a_non_terminal_state_refuses_an_exit_reason():
    with pytest.raises(InvalidTransition, match="only for terminal"):
        transition(record(), S.APPROVED, now=T1, exit_reason="done")


@pytest.mark.parametrize(("to", "reason"), [
    (S.SUCCEEDED, "max_iterations"), (S.FAILED, "done"), (S.BLOCKED, "done"),
    (S.CANCELED, "done"), (S.CANCELED, "internal_error"),
])
def test_exit_reasons_must_match_the_terminal_state(to, reason):
    with pytest.raises(InvalidTransition):
        transition(running(), to, now=T1, exit_reason=reason)


def test_an_unknown_exit_reason_is_refused():
    with pytest.raises(InvalidTransition, match="not an exit reason"):
        transition(running(), S.FAILED, now=T1, exit_reason="oops")


def test_entering_running_requires_a_stage():
    with pytest.raises(InvalidTransition, match="stage"):
        transition(record(S.QUEUED), S.RUNNING, now=T1)


def test_entering_running_sets_the_stage_the_start_time_and_the_first_iteration():
    rec = transition(record(S.QUEUED), S.RUNNING, now=T1, stage="planning")
    assert (rec.stage, rec.started_at, rec.updated_at, rec.iteration) == (
        "planning", T1, T1, 1)
    assert rec.finished_at is None and rec.exit_reason is None


def test_entering_running_keeps_an_existing_start_time():
    rec = transition(record(S.QUEUED, started_at=T0), S.RUNNING, now=T1, stage="planning")
    assert rec.started_at == T0


def test_a_terminal_state_clears_the_stage_and_sets_the_finish_time():
    rec = transition(running(), S.SUCCEEDED, now=T2, exit_reason="done")
    assert (rec.stage, rec.finished_at, rec.updated_at, rec.started_at) == (
        None, T2, T2, T0)


def test_a_stage_outside_running_is_dropped():
    rec = transition(record(), S.APPROVED, now=T1, stage="planning")
    assert rec.stage is None


def test_a_message_is_kept_unless_a_new_one_is_given():
    rec = record(message="submitted by ci")
    kept = transition(rec, S.APPROVED, now=T1)
    assert kept.message == "submitted by ci"
    replaced = transition(kept, S.QUEUED, now=T2, message="waiting for an executor")
    assert replaced.message == "waiting for an executor"


def test_transition_returns_a_new_record_and_leaves_the_old_one_alone():
    rec = record()
    moved = transition(rec, S.APPROVED, now=T1)
    assert rec.state is S.DRAFT and moved.state is S.APPROVED
    assert moved.task_id == rec.task_id and moved.spec == rec.spec


# --- stages ------------------------------------------------------------------------

def test_enter_stage_changes_the_stage_and_the_update_time():
    rec = enter_stage(running(), "verifying", now=T1)
    assert (rec.stage, rec.updated_at, rec.iteration) == ("verifying", T1, 1)


def test_enter_stage_may_keep_or_advance_the_iteration_by_one():
    assert enter_stage(running(2), "executing", now=T1, iteration=2).iteration == 2
    assert enter_stage(running(2), "planning", now=T1, iteration=3).iteration == 3


@pytest.mark.parametrize("iteration", [0, 1, 4])
def test_enter_stage_refuses_an_iteration_that_jumps_or_goes_back(iteration):
    with pytest.raises(InvalidTransition, match="iteration"):
        enter_stage(running(2), "planning", now=T1, iteration=iteration)


@pytest.mark.parametrize("state", [S.DRAFT, S.QUEUED, S.SUCCEEDED])
def test_enter_stage_only_works_while_running(state):
    with pytest.raises(InvalidTransition, match="only be entered while RUNNING"):
        enter_stage(record(state), "planning", now=T1)


# --- fingerprints ------------------------------------------------------------------

def test_nothing_failed_means_no_fingerprint():
    items = [item("a"), item("b", "skipped")]
    assert fingerprint(items, [gate("tests")]) is None
    assert fingerprint([], []) is None


def test_a_fingerprint_is_sixteen_hex_digits():
    fp = fingerprint([item("a", "failed", exit_code=1)], [])
    assert fp is not None and len(fp) == 16
    int(fp, 16)


def test_the_fingerprint_ignores_order_timestamps_durations_and_passes():
    first = fingerprint(
        [item("a", "failed", exit_code=1, stderr="boom"), item("b", "timeout"), item("c")],
        [gate("lint", False, exit_code=2, stdout="E501"), gate("doctor")],
    )
    second = fingerprint(
        [item("b", "timeout", started_at=T2, duration_s=9.5, attempt=3),
         item("a", "failed", exit_code=1, stderr="boom", finished_at=T2)],
        [gate("lint", False, exit_code=2, stdout="E501", duration_s=4.0, started_at=T1)],
    )
    assert first == second


def test_only_the_last_twenty_lines_of_output_count():
    tail = "".join(f"line {n}\n" for n in range(20))
    one = fingerprint([], [gate("tests", False, stdout="banner v1\n" + tail)])
    two = fingerprint([], [gate("tests", False, stdout="banner v2\n" + tail)])
    assert one == two


@pytest.mark.parametrize("changed", [
    {"stdout": "different"}, {"stderr": "different"}, {"exit_code": 3},
    {"problems": ["workdir is missing"]}, {"name": "lint"},
])
def test_a_different_gate_failure_gives_a_different_fingerprint(changed):
    base = {"stdout": "out", "stderr": "err", "exit_code": 1, "problems": []}
    name = changed.pop("name", "tests")
    assert (fingerprint([], [gate("tests", False, **base)])
            != fingerprint([], [gate(name, False, **{**base, **changed})]))


@pytest.mark.parametrize("changed", [
    {"status": "timeout"}, {"exit_code": 2}, {"stdout": "x"}, {"stderr": "x"},
    {"item_id": "b"},
])
def test_a_different_item_failure_gives_a_different_fingerprint(changed):
    base = {"item_id": "a", "status": "failed", "exit_code": 1, "stdout": "", "stderr": ""}
    merged = {**base, **changed}
    assert (fingerprint([item(base.pop("item_id"), base.pop("status"), **base)], [])
            != fingerprint([item(merged.pop("item_id"), merged.pop("status"), **merged)], []))


def test_an_item_and_a_gate_with_the_same_name_do_not_collide():
    assert (fingerprint([item("tests", "failed")], [])
            != fingerprint([], [gate("tests", False)]))


# --- verdicts ----------------------------------------------------------------------

def test_all_items_succeeded_and_all_gates_passed_means_success():
    verdict = judge([item("a"), item("b", "skipped")], [gate("tests"), gate("doctor")])
    assert verdict == Verdict("succeed", "done", verdict.message)
    assert verdict.message


@pytest.mark.parametrize("gates", [None, []])
def test_gates_not_run_or_absent_count_as_passed(gates):
    assert judge([item("a")], gates).action == "succeed"


def test_a_failed_gate_sends_the_task_back_to_planning():
    verdict = judge([item("a")], [gate("tests", False, exit_code=1)], iteration=2)
    assert (verdict.action, verdict.exit_reason) == ("replan", None)
    assert "'tests'" in verdict.message and "iteration 3" in verdict.message


def test_the_same_gate_failure_twice_in_a_row_means_no_progress():
    gates = [gate("tests", False, exit_code=1, stdout="assert 1 == 2")]
    previous = fingerprint([], gates)
    verdict = judge([item("a")], gates, iteration=3, previous=previous)
    assert (verdict.action, verdict.exit_reason) == ("fail", "no_progress")
    assert verdict.message == (
        "gate 'tests' failed twice in a row with the same output (iteration 3)")


def test_a_changed_gate_failure_is_progress():
    previous = fingerprint([], [gate("tests", False, stdout="3 failed")])
    verdict = judge([item("a")], [gate("tests", False, stdout="1 failed")], previous=previous)
    assert verdict.action == "replan"


def test_a_gate_still_failing_at_the_last_iteration_means_max_iterations():
    verdict = judge([item("a")], [gate("tests", False)], iteration=5, max_iterations=5)
    assert (verdict.action, verdict.exit_reason) == ("fail", "max_iterations")
    assert "max_iterations is 5" in verdict.message


def test_no_progress_is_reported_before_max_iterations():
    gates = [gate("tests", False)]
    verdict = judge([], gates, iteration=5, max_iterations=5,
                    previous=fingerprint([], gates))
    assert verdict.exit_reason == "no_progress"


def test_a_failed_item_that_cannot_be_replanned_means_work_item_failed():
    verdict = judge([item("build", "failed", exit_code=1), item("test", "skipped")],
                    [gate("tests")], can_replan=False)
    assert (verdict.action, verdict.exit_reason) == ("fail", "work_item_failed")
    assert "'build' (failed)" in verdict.message and "'test'" not in verdict.message


def test_a_resource_limit_that_cannot_be_replanned_means_resource_limit():
    verdict = judge([item("a", "failed"), item("b", "resource_limit")], can_replan=False)
    assert (verdict.action, verdict.exit_reason) == ("fail", "resource_limit")
    assert "'b' (resource_limit)" in verdict.message


def test_a_canceled_item_cancels_the_task_even_when_it_could_be_replanned():
    verdict = judge([item("a", "failed"), item("b", "canceled")], can_replan=True)
    assert (verdict.action, verdict.exit_reason) == ("fail", "canceled")
    assert "'b'" in verdict.message


def test_a_failed_item_is_replanned_when_the_plan_allows_it():
    verdict = judge([item("build", "timeout")], [gate("tests")], can_replan=True)
    assert (verdict.action, verdict.exit_reason) == ("replan", None)
    assert "'build' (timeout)" in verdict.message


def test_the_same_item_failure_twice_in_a_row_means_no_progress():
    items = [item("build", "failed", exit_code=1, stderr="missing header")]
    verdict = judge(items, None, previous=fingerprint(items, []), iteration=2)
    assert verdict.exit_reason == "no_progress"


def test_a_failed_item_at_the_last_iteration_means_max_iterations():
    verdict = judge([item("build", "failed")], iteration=3, max_iterations=3)
    assert verdict.exit_reason == "max_iterations"


def test_a_message_names_a_few_failures_and_counts_the_rest():
    items = [item(f"i{n}", "failed") for n in range(8)]
    verdict = judge(items, can_replan=False)
    assert "'i4'" in verdict.message and "'i5'" not in verdict.message
    assert "and 3 more" in verdict.message


# --- failure context ---------------------------------------------------------------

def test_the_failure_context_holds_the_failed_and_skipped_items_with_their_tails():
    ctx = failure_context(
        TASK, 2,
        [item("a"), item("b", "failed", exit_code=1, stdout="o", stderr="e", error="x"),
         item("c", "skipped")],
        [gate("doctor"), gate("tests", False, exit_code=1, stdout="so", stderr="se",
                              problems=["p"])],
    )
    assert isinstance(ctx, FailureContext)
    assert (ctx.task_id, ctx.iteration) == (TASK, 2)
    failed_item, skipped_item = ctx.failed_items
    assert (skipped_item.id, skipped_item.status) == ("c", "skipped")
    assert (failed_item.id, failed_item.status, failed_item.exit_code, failed_item.stdout_tail,
            failed_item.stderr_tail, failed_item.error) == ("b", "failed", 1, "o", "e", "x")
    [failed_gate] = ctx.failed_gates
    assert (failed_gate.name, failed_gate.exit_code, failed_gate.stdout_tail,
            failed_gate.stderr_tail, failed_gate.problems) == ("tests", 1, "so", "se", ["p"])


def test_the_failure_context_accepts_gates_that_were_not_run():
    ctx = failure_context(TASK, 1, [item("a", "error")], None)
    assert [f.id for f in ctx.failed_items] == ["a"] and ctx.failed_gates == []
