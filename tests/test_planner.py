"""The declarative planner: iteration 1 runs the work items, a failure replans with the fixes."""

from __future__ import annotations

import asyncio

import pytest

from actors.planner import DeclarativePlanner, PlannerError
from orchestrator.machine import failure_context
from schemas import (
    FailedGate,
    FailedItem,
    FailureContext,
    HivebusError,
    Plan,
    PlanRequest,
    TaskSpec,
    WorkItemResult,
    dag_problems,
)

TASK = "t-abc"

SPEC = TaskSpec(
    title="Build, test and document",
    gates=[{"name": "tests", "run": "pytest -q"}],
    work_items=[
        {"id": "build", "run": "make"},
        {"id": "lint", "run": "ruff check ."},
        {"id": "test", "run": "pytest -q", "depends_on": ["build"]},
        {"id": "package", "run": "make dist", "depends_on": ["test", "lint"]},
        {"id": "docs", "run": "make docs", "depends_on": ["lint"]},
    ],
    on_gate_failure=[
        {"id": "fix", "run": "python fix.py"},
        {"id": "refix", "run": "python fix.py --again", "depends_on": ["fix"]},
    ],
)
FIX_IDS = ["fix", "refix"]


def plan(spec: TaskSpec = SPEC, *, iteration: int = 1, failure: FailureContext | None = None,
         planner: DeclarativePlanner | None = None) -> Plan:
    request = PlanRequest(task_id=TASK, iteration=iteration, spec=spec, failure=failure)
    return asyncio.run((planner or DeclarativePlanner()).plan(request))


def failed(*item_ids: str, gates: tuple[str, ...] = (), iteration: int = 1) -> FailureContext:
    return FailureContext(
        task_id=TASK, iteration=iteration,
        failed_items=[FailedItem(id=i, status="failed", exit_code=1) for i in item_ids],
        failed_gates=[FailedGate(name=g, exit_code=1) for g in gates],
    )


def ids(p: Plan) -> list[str]:
    return [item.id for item in p.items]


def deps(p: Plan) -> dict[str, list[str]]:
    return {item.id: list(item.depends_on) for item in p.items}


# --- iteration 1 -------------------------------------------------------------------

def test_the_first_iteration_runs_the_task_files_work_items_as_written():
    first = plan(planner=DeclarativePlanner(agent_id="planner-1"))
    assert first.items == SPEC.work_items
    assert (first.task_id, first.iteration, first.strategy) == (TASK, 1, "declarative")
    assert first.failure is None
    assert first.planner_id == "planner-1"


# --- replanning --------------------------------------------------------------------

def test_a_failed_item_is_planned_after_the_fixes_with_its_transitive_dependents():
    failure = failed("build")
    again = plan(iteration=2, failure=failure)
    assert ids(again) == ["fix", "refix", "build", "test", "package"]
    assert again.iteration == 2
    assert again.failure == failure


def test_a_replanned_item_depends_on_every_fix_and_only_on_items_in_the_plan():
    again = plan(iteration=2, failure=failed("build"))
    assert deps(again) == {
        "fix": [],
        "refix": ["fix"],
        "build": FIX_IDS,
        "test": ["build", *FIX_IDS],
        "package": ["test", *FIX_IDS],  # lint succeeded and is not in the plan
    }


def test_a_replanned_plan_is_a_valid_dag():
    again = plan(iteration=2, failure=failed("build", "lint"))
    assert dag_problems(again.items, field="plan") == []
    assert set(ids(again)) == {"fix", "refix", "build", "lint", "test", "package", "docs"}


def test_replanned_items_keep_the_order_of_the_task_file():
    again = plan(iteration=2, failure=failed("docs", "build"))
    assert ids(again) == ["fix", "refix", "build", "test", "package", "docs"]


def test_a_failed_leaf_item_is_planned_again_alone_after_the_fixes():
    again = plan(iteration=2, failure=failed("docs"))
    assert ids(again) == ["fix", "refix", "docs"]
    assert deps(again)["docs"] == FIX_IDS


def test_a_gate_only_failure_plans_just_the_fix_items():
    again = plan(iteration=2, failure=failed(gates=("tests",)))
    assert ids(again) == FIX_IDS
    assert again.items == SPEC.on_gate_failure


def test_replanning_leaves_the_task_spec_unchanged():
    before = SPEC.model_copy(deep=True)
    plan(iteration=2, failure=failed("build"))
    assert SPEC == before


def test_work_items_skipped_behind_a_failed_fix_are_planned_again():
    spec = TaskSpec(
        title="t",
        work_items=[{"id": "a", "run": "x"}, {"id": "b", "run": "y"}],
        on_gate_failure=[{"id": "fix", "run": "python fix.py"}],
    )

    def result(item_id: str, status: str, iteration: int) -> WorkItemResult:
        return WorkItemResult(task_id=TASK, iteration=iteration, item_id=item_id, status=status)

    one = failure_context(TASK, 1, [result("a", "failed", 1), result("b", "succeeded", 1)], [])
    two = plan(spec, iteration=2, failure=one)
    assert ids(two) == ["fix", "a"]
    # Iteration 2: the fix fails, so 'a' (which depends on it) is skipped.
    failure = failure_context(TASK, 2, [result("fix", "failed", 2), result("a", "skipped", 2)], [])
    three = plan(spec, iteration=3, failure=failure)
    assert ids(three)[0] == "fix"
    assert "a" in ids(three)


# --- refusals ----------------------------------------------------------------------

def test_the_ollama_strategy_is_refused_with_a_sentence_that_names_it():
    spec = TaskSpec(title="t", description="write the code", planner={"strategy": "ollama"})
    with pytest.raises(PlannerError) as caught:
        plan(spec)
    assert isinstance(caught.value, HivebusError)
    message = str(caught.value)
    assert "'ollama'" in message and "declarative" in message
    assert message[0].isalpha() and "\n" not in message
