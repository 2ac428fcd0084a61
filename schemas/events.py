"""Events: published on NATS and captured by the ``HIVEBUS_EVENTS`` stream (the audit log)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .base import Message, TaskId, utcnow
from .record import ExitReason, Stage, TaskState
from .resources import Lease
from .work import ItemStatus


class Event(Message):
    ts: datetime = Field(default_factory=utcnow)


class LifecycleEvent(Event):
    """``task.lifecycle.<task_id>``: a state or stage change."""

    type: Literal["LifecycleEvent"] = "LifecycleEvent"
    task_id: TaskId
    state: TaskState
    stage: Stage | None = None
    iteration: int = 0
    exit_reason: ExitReason | None = None
    message: str = ""


class ProgressEvent(Event):
    """``task.progress.<task_id>``: a work item or gate moved."""

    type: Literal["ProgressEvent"] = "ProgressEvent"
    task_id: TaskId
    iteration: int
    kind: Literal[
        "item_queued", "item_started", "item_finished", "item_retried",
        "gate_started", "gate_finished",
    ]
    item_id: str | None = None
    gate: str | None = None
    status: ItemStatus | Literal["passed", "failed"] | None = None
    attempt: int = 1
    agent_id: str = ""
    duration_s: float | None = None
    done: int = 0
    total: int = 0


class CompletionEvent(Event):
    """``task.completion.<task_id>``: the terminal summary."""

    type: Literal["CompletionEvent"] = "CompletionEvent"
    task_id: TaskId
    state: TaskState
    exit_reason: ExitReason
    iterations: int
    duration_s: float
    message: str = ""
    report_path: str | None = None


class LeaseEvent(Event):
    """``resource.allocation.<agent_id>`` and ``resource.release.<agent_id>``."""

    type: Literal["LeaseEvent"] = "LeaseEvent"
    kind: Literal["allocation", "release"]
    lease: Lease
    allocated_cpu: float
    allocated_memory_mb: int


class UsageEvent(Event):
    """``resource.usage.<agent_id>``: sampled CPU and RSS of an agent and its children."""

    type: Literal["UsageEvent"] = "UsageEvent"
    agent_id: str
    pid: int
    cpu_percent: float
    rss_mb: float
    children: int = 0


class LimitExceededEvent(Event):
    """``resource.limit_exceeded.<agent_id>``: a work item killed for its limit."""

    type: Literal["LimitExceededEvent"] = "LimitExceededEvent"
    agent_id: str
    task_id: TaskId
    item_id: str
    limit: Literal["memory", "cpu_seconds", "max_procs", "timeout"]
    limit_value: float
    peak_value: float
    mechanism: str


class ReportEvent(Event):
    """``report.generation|distribution|archival.<task_id>``."""

    type: Literal["ReportEvent"] = "ReportEvent"
    task_id: TaskId
    kind: Literal["generation", "distribution", "archival"]
    path: str
    formats: list[str] = Field(default_factory=list)


class DeadLetterEvent(Event):
    """``hivebus.deadletter``: a request body that could not be served."""

    type: Literal["DeadLetterEvent"] = "DeadLetterEvent"
    subject: str
    code: str
    message: str
    size: int
    head: str = Field(description="the first bytes of the body, hex")
