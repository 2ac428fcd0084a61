"""A task's durable record and the replies of the ``task.*`` request subjects."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import Field

from .base import Message, Model, TaskId, utcnow
from .task import TaskSpec
from .work import FailureContext, ItemStatus


class TaskState(str, Enum):
    DRAFT = "DRAFT"
    APPROVED = "APPROVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    BLOCKED = "BLOCKED"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {TaskState.SUCCEEDED, TaskState.FAILED, TaskState.BLOCKED, TaskState.CANCELED}
)

Stage = Literal["planning", "executing", "verifying"]

ExitReason = Literal[
    "done",
    "max_iterations",
    "no_progress",
    "work_item_failed",
    "resource_limit",
    "deadline_exceeded",
    "canceled",
    "approval_required",
    "policy_denied",
    "planner_error",
    "internal_error",
]


class ItemOutcome(Model):
    """The latest attempt of one work item in one iteration."""

    id: str
    status: ItemStatus
    attempts: int = 1
    exit_code: int | None = None
    duration_s: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    agent_id: str = ""


class GateOutcome(Model):
    name: str
    passed: bool
    duration_s: float = 0.0
    exit_code: int | None = None


class IterationRecord(Model):
    """What one plan -> execute -> verify round did."""

    iteration: int
    items: list[ItemOutcome] = Field(default_factory=list)
    gates: list[GateOutcome] = Field(default_factory=list)
    fingerprint: str | None = None
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None


class Checkpoint(Model):
    """Where a running task's loop stands: enough to resume it after a crash.

    Finished work items are not listed here: their results are in the event stream
    (``task.result.<task_id>.<item_id>``), which the resumed loop reads back.
    """

    iteration: int
    failure: FailureContext | None = None
    previous_fingerprint: str | None = None


class TaskRecord(Message):
    """Everything hivebus knows about a task; the value kept in ``hivebus_tasks``."""

    type: Literal["TaskRecord"] = "TaskRecord"
    task_id: TaskId
    spec: TaskSpec
    state: TaskState = TaskState.DRAFT
    stage: Stage | None = None
    iteration: int = 0
    exit_reason: ExitReason | None = None
    message: str = ""
    workdir: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    artifacts_dir: str = ""
    report_path: str | None = None
    iterations: list[IterationRecord] = Field(default_factory=list)
    checkpoint: Checkpoint | None = None


class TaskAccepted(Message):
    """Reply to ``task.submit``: once sent, the task is durable."""

    type: Literal["TaskAccepted"] = "TaskAccepted"
    task_id: TaskId
    state: TaskState


class TaskRef(Message):
    """Body of ``task.get``, ``task.cancel`` and ``task.approve``: ``{"task_id": ...}``."""

    type: Literal["TaskRef"] = "TaskRef"
    task_id: TaskId


class TaskQuery(Message):
    """Body of ``task.list``: ``{}`` or ``{"state": "RUNNING"}``."""

    type: Literal["TaskQuery"] = "TaskQuery"
    state: TaskState | None = None


class TaskList(Message):
    """Reply to ``task.list``."""

    type: Literal["TaskList"] = "TaskList"
    tasks: list[TaskRecord]


class ErrorDetail(Model):
    loc: str
    msg: str


class Rejected(Message):
    """The reply to any request that cannot be served, with a sentence that says why."""

    type: Literal["Rejected"] = "Rejected"
    code: Literal[
        "bad_encoding",   # bytes that are neither msgpack nor JSON
        "invalid",        # a body that fails its schema
        "wrong_type",     # a valid message of another type
        "unknown_task",
        "conflict",       # e.g. approving a task that is already running
        "busy",           # an agent with no free slot; retry elsewhere
        "too_large",
        "internal_error",
    ]
    message: str
    errors: list[ErrorDetail] = Field(default_factory=list)
