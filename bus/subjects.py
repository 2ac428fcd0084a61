"""Every NATS subject, queue group and JetStream name hivebus uses, in one place."""

from __future__ import annotations

# Requests served by the orchestrator.
TASK_SUBMIT = "task.submit"
TASK_GET = "task.get"
TASK_LIST = "task.list"
TASK_CANCEL = "task.cancel"
TASK_APPROVE = "task.approve"

# Requests served by agents, each pool in its queue group.
PLANNER_PLAN = "agent.planner.plan"
EXECUTOR_RUN = "agent.executor.run"
EXECUTOR_CANCEL = "agent.executor.cancel"  # broadcast: every executor kills that task's children


def executor_run(hive_id: str, agent_id: str) -> str:
    """One executor's own subject: its hive's orchestrator sends there when it knows it is
    idle. The hive id keeps two hives' ``executor-1`` apart on one NATS (a restart)."""
    return f"{EXECUTOR_RUN}.{hive_id}.{agent_id}"


def executor_batch(hive_id: str, agent_id: str) -> str:
    """One executor's own subject for a WorkItemBatch (several short items, one request)."""
    return f"agent.executor.batch.{hive_id}.{agent_id}"


VERIFIER_VERIFY = "agent.verifier.verify"
RESOURCES_LEASE = "agent.resources.lease"
RESOURCES_RELEASE = "agent.resources.release"
RESOURCES_SNAPSHOT = "agent.resources.snapshot"

PLANNERS = "planners"
EXECUTORS = "executors"
VERIFIERS = "verifiers"
RESOURCE_MANAGERS = "resources"
ORCHESTRATORS = "orchestrators"

DEADLETTER = "hivebus.deadletter"

# JetStream
EVENTS_STREAM = "HIVEBUS_EVENTS"
TASKS_BUCKET = "hivebus_tasks"

#: What HIVEBUS_EVENTS captures. Request subjects such as task.submit are deliberately
#: not in it: a stream on a request subject would answer requests with its PubAck.
EVENT_SUBJECTS = [
    "task.lifecycle.>",
    "task.progress.>",
    "task.completion.>",
    "task.result.>",
    "resource.allocation.>",
    "resource.release.>",
    "resource.usage.>",
    "resource.limit_exceeded.>",
    "report.generation.>",
    "report.distribution.>",
    "report.archival.>",
    DEADLETTER,
]


def lifecycle(task_id: str) -> str:
    return f"task.lifecycle.{task_id}"


def progress(task_id: str) -> str:
    return f"task.progress.{task_id}"


def completion(task_id: str) -> str:
    return f"task.completion.{task_id}"


def result(task_id: str, item_id: str) -> str:
    """Where an executor stores each WorkItemResult durably (deduplicated by idempotency key)."""
    return f"task.result.{task_id}.{item_id}"


def results(task_id: str) -> str:
    return f"task.result.{task_id}.>"


def allocation(agent_id: str) -> str:
    return f"resource.allocation.{agent_id}"


def release(agent_id: str) -> str:
    return f"resource.release.{agent_id}"


def usage(agent_id: str) -> str:
    return f"resource.usage.{agent_id}"


def limit_exceeded(agent_id: str) -> str:
    return f"resource.limit_exceeded.{agent_id}"


def report(kind: str, task_id: str) -> str:
    return f"report.{kind}.{task_id}"


def task_events(task_id: str) -> str:
    """A filter matching every event about one task (lifecycle, progress, completion, report)."""
    return f"*.*.{task_id}"
