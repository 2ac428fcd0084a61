"""pydantic v2 models of everything that crosses a process boundary, and their codec."""

from .base import SCHEMA_VERSION, Message, Model, utcnow
from .codec import JSON, MSGPACK, CodecError, decode, encode, encode_json_line
from .config import AgentSettings, HiveConfig, PoolConfig
from .dag import dag_problems, find_cycle
from .errors import HivebusError, RequestRejected, TaskFileError, TransportError
from .events import (
    CompletionEvent,
    DeadLetterEvent,
    Event,
    LeaseEvent,
    LifecycleEvent,
    LimitExceededEvent,
    ProgressEvent,
    ReportEvent,
    UsageEvent,
)
from .record import (
    TERMINAL_STATES,
    Checkpoint,
    ErrorDetail,
    ExitReason,
    GateOutcome,
    ItemOutcome,
    IterationRecord,
    Rejected,
    Stage,
    TaskAccepted,
    TaskList,
    TaskQuery,
    TaskRecord,
    TaskRef,
    TaskState,
)
from .resources import (
    Ack,
    AgentUsage,
    Lease,
    LeaseRelease,
    LeaseRequest,
    ResourceSnapshot,
    SnapshotRequest,
)
from .task import PRIORITY_RANK, GateSpec, PlannerSpec, ResourceSpec, TaskSpec, WorkItemSpec
from .taskfile import load_task_file
from .work import (
    TAIL_CHARS,
    FailedGate,
    FailedItem,
    FailureContext,
    GateResult,
    GateResults,
    ItemStatus,
    LimitHit,
    Plan,
    PlanAttempt,
    PlanRequest,
    VerifyRequest,
    WorkItemAssignment,
    WorkItemBatch,
    WorkItemResult,
    WorkItemResults,
)

#: Every message body, by its ``type``; ``hivebus schema`` prints their JSON Schemas.
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        TaskSpec, TaskAccepted, TaskRef, TaskQuery, TaskList, TaskRecord, Rejected,
        PlanRequest, Plan, WorkItemAssignment, WorkItemResult, WorkItemBatch, WorkItemResults,
        VerifyRequest,
        GateResult, GateResults, LeaseRequest, Lease, LeaseRelease, Ack,
        SnapshotRequest, ResourceSnapshot, LifecycleEvent, ProgressEvent,
        CompletionEvent, LeaseEvent, UsageEvent, LimitExceededEvent, ReportEvent,
        DeadLetterEvent,
    )
}

__all__ = [
    # messages: tasks
    "TaskSpec", "WorkItemSpec", "GateSpec", "PlannerSpec", "ResourceSpec", "PRIORITY_RANK",
    "TaskRecord", "TaskState", "TERMINAL_STATES", "Stage", "ExitReason", "IterationRecord",
    "ItemOutcome", "GateOutcome", "Checkpoint", "TaskAccepted", "TaskRef", "TaskQuery", "TaskList",
    "Rejected", "ErrorDetail",
    # messages: agents
    "PlanRequest", "Plan", "FailureContext", "FailedGate", "FailedItem",
    "WorkItemAssignment", "WorkItemResult", "WorkItemBatch", "WorkItemResults", "ItemStatus", "TAIL_CHARS", "LimitHit", "PlanAttempt",
    "VerifyRequest", "GateResult", "GateResults",
    "LeaseRequest", "Lease", "LeaseRelease", "Ack", "SnapshotRequest", "ResourceSnapshot",
    "AgentUsage",
    # events
    "Event", "LifecycleEvent", "ProgressEvent", "CompletionEvent", "LeaseEvent",
    "UsageEvent", "LimitExceededEvent", "ReportEvent", "DeadLetterEvent",
    # configuration
    "HiveConfig", "PoolConfig", "AgentSettings",
    # codec and base
    "Message", "Model", "SCHEMA_VERSION", "MESSAGE_TYPES", "encode", "decode",
    "encode_json_line", "CodecError", "JSON", "MSGPACK", "utcnow",
    # rules and files
    "dag_problems", "find_cycle", "load_task_file",
    # errors
    "HivebusError", "TaskFileError", "TransportError", "RequestRejected",
]
