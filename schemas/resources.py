"""Resource leases: ``agent.resources.lease`` / ``.release`` / ``.snapshot``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from .base import Message, Model, utcnow


class LeaseRequest(Message):
    """An agent asks for CPU and memory before it starts a work item.

    The resource manager replies when the lease fits under the per-agent and total
    limits; requests that do not fit yet wait in FIFO order for up to ``wait_s``.
    """

    type: Literal["LeaseRequest"] = "LeaseRequest"
    #: The same request sent again (after a reconnect) gets the same lease.
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    agent_id: str
    #: The asking agent's process: its leases are reclaimed when that process is gone.
    pid: int = 0
    task_id: str
    item_id: str
    cpu: Annotated[float, Field(ge=0)]
    memory_mb: Annotated[int, Field(ge=0)]
    wait_s: Annotated[float, Field(gt=0)] = 3600.0


class Lease(Message):
    type: Literal["Lease"] = "Lease"
    lease_id: str
    agent_id: str
    pid: int = 0
    task_id: str
    item_id: str
    cpu: float
    memory_mb: int
    granted_at: datetime = Field(default_factory=utcnow)
    waited_s: float = 0.0


class LeaseRelease(Message):
    type: Literal["LeaseRelease"] = "LeaseRelease"
    lease_id: str


class Ack(Message):
    type: Literal["Ack"] = "Ack"
    ok: bool = True
    message: str = ""


class SnapshotRequest(Message):
    type: Literal["SnapshotRequest"] = "SnapshotRequest"


class AgentUsage(Model):
    agent_id: str
    pid: int
    cpu_percent: float
    rss_mb: float
    children: int = 0
    sampled_at: datetime = Field(default_factory=utcnow)


class ResourceSnapshot(Message):
    """Reply to ``agent.resources.snapshot``: limits, current leases, queue and usage."""

    type: Literal["ResourceSnapshot"] = "ResourceSnapshot"
    total_cpu: float
    total_memory_mb: int
    agent_cpu: float
    agent_memory_mb: int
    allocated_cpu: float
    allocated_memory_mb: int
    leases: list[Lease] = Field(default_factory=list)
    queued: int = 0
    usage: list[AgentUsage] = Field(default_factory=list)
