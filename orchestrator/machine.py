"""The task state machine: which state changes are legal, and how an iteration ends.

Pure functions over frozen ``TaskRecord``s and agent results. The loop that calls
them owns every side effect (storing the record, publishing lifecycle events).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Literal, get_args

from schemas import (
    ExitReason,
    FailedGate,
    FailedItem,
    FailureContext,
    GateResult,
    HivebusError,
    Stage,
    TaskRecord,
    TaskState,
    WorkItemResult,
)

_S = TaskState

#: The states each state may move to; terminal states move nowhere.
ALLOWED: Mapping[TaskState, frozenset[TaskState]] = MappingProxyType({
    _S.DRAFT: frozenset({_S.APPROVED, _S.CANCELED, _S.BLOCKED}),
    _S.APPROVED: frozenset({_S.QUEUED, _S.CANCELED, _S.BLOCKED}),
    # FAILED before start: deadline_exceeded or internal_error while queued.
    _S.QUEUED: frozenset({_S.RUNNING, _S.CANCELED, _S.BLOCKED, _S.FAILED}),
    _S.RUNNING: frozenset({_S.SUCCEEDED, _S.FAILED, _S.BLOCKED, _S.CANCELED}),
    _S.SUCCEEDED: frozenset(),
    _S.FAILED: frozenset(),
    _S.BLOCKED: frozenset(),
    _S.CANCELED: frozenset(),
})

_EXIT_REASONS = frozenset(get_args(ExitReason))
_STAGES = frozenset(get_args(Stage))
#: Lines of each output tail that count in a fingerprint: enough to tell failures
#: apart, few enough that an earlier banner or progress line does not.
_TAIL_LINES = 20
#: Names listed in a message before "and N more".
_NAMED = 5


class InvalidTransition(HivebusError):
    """A state or stage change the machine refuses, with the task, both states and why."""

    def __init__(self, task_id: str, from_state: TaskState, to_state: TaskState,
                 reason: str):
        self.task_id = task_id
        self.from_state = from_state
        self.to_state = to_state
        self.reason = reason
        if from_state is to_state:
            sentence = f"task {task_id} ({from_state.value}): {reason}"
        else:
            sentence = (f"task {task_id} cannot go from {from_state.value} to "
                        f"{to_state.value}: {reason}")
        super().__init__(sentence)


def transition(record: TaskRecord, to: TaskState, *, now: datetime,
               stage: Stage | None = None, exit_reason: ExitReason | None = None,
               message: str = "") -> TaskRecord:
    """Move ``record`` to state ``to``, or raise InvalidTransition.

    A terminal state needs an ``exit_reason`` (SUCCEEDED exactly ``done``, CANCELED
    exactly ``canceled``) and other states refuse one. Entering RUNNING needs a
    ``stage``; outside RUNNING the stage is cleared. ``message`` replaces the record's
    message when it is not empty.
    """
    def refuse(reason: str) -> InvalidTransition:
        return InvalidTransition(record.task_id, record.state, to, reason)

    current = record.state
    if to not in ALLOWED[current]:
        if current.terminal:
            raise refuse(f"{current.value} is a terminal state")
        onward = ", ".join(sorted(s.value for s in ALLOWED[current]))
        raise refuse(f"{current.value} may only go to {onward}")
    if exit_reason is not None and exit_reason not in _EXIT_REASONS:
        raise refuse(f"{exit_reason!r} is not an exit reason")
    if to.terminal and exit_reason is None:
        raise refuse("a terminal state needs an exit_reason")
    if not to.terminal and exit_reason is not None:
        raise refuse(f"exit_reason {exit_reason!r} is only for terminal states")
    if to is _S.SUCCEEDED and exit_reason != "done":
        raise refuse(f"SUCCEEDED needs exit_reason 'done', not {exit_reason!r}")
    if to is not _S.SUCCEEDED and exit_reason == "done":
        raise refuse("exit_reason 'done' is only for SUCCEEDED")
    if to is _S.CANCELED and exit_reason != "canceled":
        raise refuse(f"CANCELED needs exit_reason 'canceled', not {exit_reason!r}")
    if to is _S.RUNNING and stage not in _STAGES:
        raise refuse(f"entering RUNNING needs a stage ({', '.join(sorted(_STAGES))})")

    update: dict[str, object] = {
        "state": to,
        "stage": stage if to is _S.RUNNING else None,
        "exit_reason": exit_reason,
        "updated_at": now,
    }
    if to is _S.RUNNING:
        update["started_at"] = record.started_at or now
        # The design counts iterations from 1 while RUNNING.
        update["iteration"] = max(record.iteration, 1)
    if to.terminal:
        update["finished_at"] = now
    if message:
        update["message"] = message
    return record.model_copy(update=update)


def enter_stage(record: TaskRecord, stage: Stage, *, now: datetime,
                iteration: int | None = None) -> TaskRecord:
    """Move a RUNNING task to ``stage``; ``iteration`` may stay or grow by one."""
    state = record.state
    if state is not _S.RUNNING:
        raise InvalidTransition(record.task_id, state, state,
                                f"stage {stage!r} can only be entered while RUNNING")
    if stage not in _STAGES:
        raise InvalidTransition(record.task_id, state, state, f"{stage!r} is not a stage")
    update: dict[str, object] = {"stage": stage, "updated_at": now}
    if iteration is not None:
        if iteration not in (record.iteration, record.iteration + 1):
            raise InvalidTransition(
                record.task_id, state, state,
                f"iteration may only stay at {record.iteration} or grow to "
                f"{record.iteration + 1}, not become {iteration}",
            )
        update["iteration"] = iteration
    return record.model_copy(update=update)


def _failed_items(results: Sequence[WorkItemResult]) -> list[WorkItemResult]:
    return [r for r in results if r.status not in ("succeeded", "skipped")]


def _failed_gates(results: Sequence[GateResult] | None) -> list[GateResult]:
    return [g for g in results or () if not g.passed]


def _tail(text: str) -> list[str]:
    return text.splitlines()[-_TAIL_LINES:]


def fingerprint(item_results: Sequence[WorkItemResult],
                gate_results: Sequence[GateResult]) -> str | None:
    """A 16-hex-digit digest of what failed and how, or None when nothing failed.

    Order, timestamps, durations and attempts do not count, so the same failure in
    two iterations gives the same fingerprint.
    """
    # Entries are compared as JSON text because exit codes may be None.
    items = sorted(
        json.dumps([r.item_id, r.status, r.exit_code, _tail(r.stdout_tail),
                    _tail(r.stderr_tail)])
        for r in _failed_items(item_results)
    )
    gates = sorted(
        json.dumps([g.gate, g.exit_code, g.problems, _tail(g.stdout_tail),
                    _tail(g.stderr_tail)])
        for g in _failed_gates(gate_results)
    )
    if not items and not gates:
        return None
    body = json.dumps({"items": items, "gates": gates}).encode()
    return hashlib.sha256(body).hexdigest()[:16]


@dataclass(frozen=True)
class Verdict:
    """How an iteration ends: the task succeeds, goes back to planning, or fails."""

    action: Literal["succeed", "replan", "fail"]
    exit_reason: ExitReason | None
    message: str


def _names(noun: str, names: list[str]) -> str:
    shown = ", ".join(names[:_NAMED])
    if len(names) > _NAMED:
        shown += f" and {len(names) - _NAMED} more"
    return f"{noun}{'s' if len(names) > 1 else ''} {shown}"


def _describe(items: list[WorkItemResult], gates: list[GateResult]) -> str:
    parts = []
    if items:
        parts.append(_names("work item", [f"{r.item_id!r} ({r.status})" for r in items]))
    if gates:
        parts.append(_names("gate", [repr(g.gate) for g in gates]))
    return " and ".join(parts)


def _replan_or_stop(iteration: int, max_iterations: int,
                    item_results: Sequence[WorkItemResult],
                    gate_results: Sequence[GateResult] | None,
                    previous_fingerprint: str | None) -> Verdict:
    what = _describe(_failed_items(item_results), _failed_gates(gate_results))
    if fingerprint(item_results, gate_results or []) == previous_fingerprint:
        return Verdict("fail", "no_progress", f"{what} failed twice in a row with the "
                       f"same output (iteration {iteration})")
    if iteration >= max_iterations:
        return Verdict("fail", "max_iterations", f"{what} still failed after {iteration} "
                       f"iterations (max_iterations is {max_iterations})")
    return Verdict("replan", None,
                   f"{what} failed in iteration {iteration}; planning iteration "
                   f"{iteration + 1}")


def judge_iteration(*, iteration: int, max_iterations: int,
                    item_results: Sequence[WorkItemResult],
                    gate_results: Sequence[GateResult] | None,
                    previous_fingerprint: str | None, can_replan: bool) -> Verdict:
    """Decide what follows an iteration from its item and gate results.

    ``gate_results`` is None when the gates were not run; an empty list means there
    are no gates, which pass. A repeated fingerprint ends the task as ``no_progress``
    before ``max_iterations`` is considered.
    """
    failed = _failed_items(item_results)
    canceled = [r for r in failed if r.status == "canceled"]
    if canceled:
        names = _names("work item", [repr(r.item_id) for r in canceled])
        verb = "was" if len(canceled) == 1 else "were"
        return Verdict("fail", "canceled", f"{names} {verb} canceled in iteration {iteration}")
    if failed:
        if can_replan:
            return _replan_or_stop(iteration, max_iterations, item_results, gate_results,
                                   previous_fingerprint)
        limit = any(r.status == "resource_limit" for r in failed)
        return Verdict("fail", "resource_limit" if limit else "work_item_failed",
                       f"{_describe(failed, [])} did not succeed in iteration "
                       f"{iteration} and the task cannot be replanned")
    if not _failed_gates(gate_results):
        gates = "gates were not run" if gate_results is None else "every gate passed"
        return Verdict("succeed", "done", f"every work item succeeded and {gates} "
                       f"(iteration {iteration})")
    return _replan_or_stop(iteration, max_iterations, item_results, gate_results,
                           previous_fingerprint)


def failure_context(task_id: str, iteration: int,
                    item_results: Sequence[WorkItemResult],
                    gate_results: Sequence[GateResult] | None) -> FailureContext:
    """What a replanning step reads: the failed items and gates with their output tails.

    Skipped items are listed too (status ``skipped``): they never ran, so a replan must
    run them again even when what they waited for was a fix item.
    """
    return FailureContext(
        task_id=task_id,
        iteration=iteration,
        failed_items=[
            FailedItem(id=r.item_id, status=r.status, exit_code=r.exit_code,
                       stdout_tail=r.stdout_tail, stderr_tail=r.stderr_tail, error=r.error)
            for r in item_results if r.status != "succeeded"
        ],
        failed_gates=[
            FailedGate(name=g.gate, exit_code=g.exit_code, stdout_tail=g.stdout_tail,
                       stderr_tail=g.stderr_tail, problems=list(g.problems))
            for g in _failed_gates(gate_results)
        ],
    )


__all__ = [
    "ALLOWED", "InvalidTransition", "transition", "enter_stage",
    "fingerprint", "Verdict", "judge_iteration", "failure_context",
]
