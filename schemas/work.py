"""Planning, dispatch and verification messages between the orchestrator and agents."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from .base import Ident, Message, Model, TaskId, utcnow
from .task import GateSpec, PlannerSpec, ResourceSpec, TaskSpec, WorkItemSpec

ItemStatus = Literal[
    "succeeded",      # exit code 0 / the callable returned
    "failed",         # non-zero exit code / the callable raised
    "timeout",        # timeout_s ran out; the child tree was killed
    "resource_limit", # a memory, CPU or process limit was hit; the child tree was killed
    "canceled",       # the task was canceled while the item ran
    "error",          # hivebus could not start the item (bad workdir, no such module)
    "skipped",        # a dependency did not succeed
]

#: Last bytes of stdout / stderr kept in results, artifacts and failure context.
TAIL_CHARS = 4000

LimitKind = Literal["memory", "cpu_seconds", "max_procs", "timeout"]
Mechanism = Literal["cgroup-v2", "cgroup-v1", "rlimit", "watchdog"]


class LimitHit(Model):
    """Why a work item's process tree was killed for a limit, and what was measured."""

    limit: LimitKind
    limit_value: float = Field(description="the limit: MB, CPU seconds, processes or seconds")
    peak_value: float = Field(description="the measured peak in the same unit")
    mechanism: Mechanism
    crossed_at: datetime | None = Field(default=None, description="first sample above the limit")
    killed_at: datetime


class PlanAttempt(Model):
    """One answer of an LLM planner: accepted, or refused with the validation errors."""

    attempt: int
    ok: bool
    error: str | None = None
    answer_excerpt: str = ""
    duration_s: float = 0.0


class FailedGate(Model):
    name: str
    exit_code: int | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    problems: list[str] = Field(default_factory=list)


class FailedItem(Model):
    id: str
    status: ItemStatus
    exit_code: int | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    error: str | None = None


class FailureContext(Model):
    """Why the previous iteration failed: what a replanning step (and a fix) reads.

    Work items of a replanned iteration find it as JSON in ``$HIVEBUS_FAILURE_CONTEXT``.
    """

    task_id: TaskId
    iteration: int
    failed_gates: list[FailedGate] = Field(default_factory=list)
    failed_items: list[FailedItem] = Field(default_factory=list)


class PlanRequest(Message):
    """Ask a planner for the work items of one iteration (``agent.planner.plan``)."""

    type: Literal["PlanRequest"] = "PlanRequest"
    task_id: TaskId
    iteration: Annotated[int, Field(ge=1)]
    spec: TaskSpec
    failure: FailureContext | None = None


class Plan(Message):
    """The work items of one iteration, in a valid dependency order."""

    type: Literal["Plan"] = "Plan"
    task_id: TaskId
    iteration: Annotated[int, Field(ge=1)]
    strategy: str
    items: list[WorkItemSpec]
    rationale: str = ""
    failure: FailureContext | None = None
    planner_id: str = ""
    model: str | None = None
    prompt_sha256: str | None = None
    attempts: list[PlanAttempt] = Field(default_factory=list)


class WorkItemAssignment(Message):
    """One attempt of one work item, sent to an executor (``agent.executor.run``)."""

    type: Literal["WorkItemAssignment"] = "WorkItemAssignment"
    task_id: TaskId
    iteration: Annotated[int, Field(ge=1)]
    attempt: Annotated[int, Field(ge=1)] = 1
    item: WorkItemSpec
    workdir: str
    env: dict[str, str] = Field(default_factory=dict)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    failure: FailureContext | None = None
    #: The task's LLM settings, for ``prompt`` items.
    llm: PlannerSpec | None = None

    @property
    def idempotency_key(self) -> str:
        return f"{self.task_id}:{self.iteration}:{self.item.id}:{self.attempt}"


#: The most attempts one batch carries (a batch is one request and one reply).
MAX_BATCH = 256


class WorkItemBatch(Message):
    """Several attempts for one executor, run one after the other under one lease
    (``agent.executor.batch.<hive>.<agent>``). The orchestrator batches only items that
    are known to finish in milliseconds, where a request per item would cost more than
    the item."""

    type: Literal["WorkItemBatch"] = "WorkItemBatch"
    assignments: Annotated[list[WorkItemAssignment], Field(min_length=1, max_length=MAX_BATCH)]


class WorkItemResult(Message):
    """What an executor observed running one attempt of a work item."""

    type: Literal["WorkItemResult"] = "WorkItemResult"
    task_id: TaskId
    iteration: int
    item_id: Ident
    attempt: int = 1
    status: ItemStatus
    exit_code: int | None = None
    error: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    output: Any = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime = Field(default_factory=utcnow)
    duration_s: float = 0.0
    files_changed: list[str] = Field(default_factory=list)
    commands_run: list[str] = Field(default_factory=list)
    tests_run: list[str] = Field(default_factory=list)
    evidence: list[str] = Field(default_factory=list)
    handoff_notes: str = ""
    peak_rss_mb: float = 0.0
    peak_rss_at: datetime | None = None
    cpu_seconds: float = 0.0
    limit: LimitHit | None = None
    agent_id: str = ""
    node_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"


class VerifyRequest(Message):
    """Run the gates of a task against its workdir (``agent.verifier.verify``)."""

    type: Literal["VerifyRequest"] = "VerifyRequest"
    task_id: TaskId
    iteration: Annotated[int, Field(ge=1)]
    workdir: str
    env: dict[str, str] = Field(default_factory=dict)
    gates: list[GateSpec]


class GateResult(Message):
    type: Literal["GateResult"] = "GateResult"
    task_id: TaskId
    iteration: int
    gate: Ident
    kind: Literal["command", "doctor"]
    passed: bool
    exit_code: int | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    problems: list[str] = Field(default_factory=list)
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime = Field(default_factory=utcnow)
    duration_s: float = 0.0
    agent_id: str = ""


class WorkItemResults(Message):
    """The reply to a WorkItemBatch: one result per attempt, in the batch's order."""

    type: Literal["WorkItemResults"] = "WorkItemResults"
    results: list[WorkItemResult]


class GateResults(Message):
    """The verifier's reply: one GateResult per gate, in the task's gate order."""

    type: Literal["GateResults"] = "GateResults"
    results: list[GateResult]

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)
