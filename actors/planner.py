"""The planner's core: turns a TaskSpec (and the last failure) into one iteration's plan."""

from __future__ import annotations

from schemas import HivebusError, Plan, PlanRequest, WorkItemSpec, dag_problems


class PlannerError(HivebusError):
    """A plan could not be made; ends the task with exit_reason planner_error."""


class DeclarativePlanner:
    """Plans from the task file alone.

    Iteration 1 runs ``work_items``. A replanned iteration runs the ``on_gate_failure``
    items first, then again every work item that failed last time and the items that
    depend on them (they were skipped); the failure travels with the plan so that the
    executor can hand it to the items in ``$HIVEBUS_FAILURE_CONTEXT``.
    """

    strategy = "declarative"

    def __init__(self, *, agent_id: str = ""):
        self.agent_id = agent_id

    async def plan(self, request: PlanRequest) -> Plan:
        spec = request.spec
        if spec.planner.strategy != "declarative":
            raise PlannerError(
                f"planner strategy {spec.planner.strategy!r} is not available in this hive; "
                "use planner: {strategy: declarative} with work_items"
            )
        if request.failure is None:
            items = list(spec.work_items)
            rationale = "the task's work items"
        else:
            items = self._replan(request)
            rationale = (
                f"iteration {request.failure.iteration} failed: "
                f"{len(spec.on_gate_failure)} fix item(s), then {len(items) - len(spec.on_gate_failure)} "
                "failed work item(s) again"
            )
        problems = dag_problems(items, field="plan")
        if problems:
            raise PlannerError("; ".join(problems))
        return Plan(task_id=request.task_id, iteration=request.iteration, strategy=self.strategy,
                    items=items, rationale=rationale, failure=request.failure,
                    planner_id=self.agent_id)

    @staticmethod
    def _replan(request: PlanRequest) -> list[WorkItemSpec]:
        spec, failure = request.spec, request.failure
        assert failure is not None
        fixes = list(spec.on_gate_failure)
        fix_ids = [item.id for item in fixes]
        rerun = {f.id for f in failure.failed_items}
        # Dependents of a failed item were skipped; they run again too.
        changed = True
        while changed:
            changed = False
            for item in spec.work_items:
                if item.id not in rerun and rerun.intersection(item.depends_on):
                    rerun.add(item.id)
                    changed = True
        again: list[WorkItemSpec] = []
        for item in spec.work_items:
            if item.id in rerun:
                deps = [d for d in item.depends_on if d in rerun] + fix_ids
                again.append(item.model_copy(update={"depends_on": deps}))
        return fixes + again


__all__ = ["DeclarativePlanner", "PlannerError"]
