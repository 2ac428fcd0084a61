"""The resource manager's core: a lease book that never over-commits."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from schemas import HivebusError, Lease, LeaseRequest


class LeaseRefused(HivebusError):
    """A request that can never fit (above the per-agent limit)."""


@dataclass
class _Waiting:
    request: LeaseRequest
    since: float
    granted: Lease | None = None


@dataclass
class LeaseBook:
    """Admits leases against per-agent and total CPU and memory, FIFO, never over-committing.

    ``request`` grants at once or queues; ``release`` returns the leases granted from
    the queue as a consequence. A queued request is served before any later one, so a
    large request is not starved by a stream of small ones.
    """

    total_cpu: float
    total_memory_mb: int
    agent_cpu: float
    agent_memory_mb: int
    leases: dict[str, Lease] = field(default_factory=dict)
    queue: deque[_Waiting] = field(default_factory=deque)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def allocated_cpu(self) -> float:
        return sum(lease.cpu for lease in self.leases.values())

    @property
    def allocated_memory_mb(self) -> int:
        return sum(lease.memory_mb for lease in self.leases.values())

    def request(self, request: LeaseRequest) -> tuple[Lease | None, _Waiting | None]:
        """A lease now, or the queue entry that will hold it once granted."""
        cpu_cap = min(self.agent_cpu, self.total_cpu)
        memory_cap = min(self.agent_memory_mb, self.total_memory_mb)
        if request.cpu > cpu_cap + 1e-9 or request.memory_mb > memory_cap:
            raise LeaseRefused(
                f"work item {request.item_id!r} asks for {request.cpu:g} CPU and "
                f"{request.memory_mb} MB; it can never fit: an agent may use at most "
                f"{self.agent_cpu:g} CPU and {self.agent_memory_mb} MB, all agents together "
                f"{self.total_cpu:g} CPU and {self.total_memory_mb} MB"
            )
        if not self.queue and self._fits(request):
            return self._grant(request, waited_s=0.0), None
        waiting = _Waiting(request, time.monotonic())
        self.queue.append(waiting)
        return None, waiting

    def release(self, lease_id: str) -> tuple[Lease | None, list[_Waiting]]:
        """Return a lease; the queued requests that now fit are granted, in order."""
        lease = self.leases.pop(lease_id, None)
        return lease, self._grant_queued()

    def _grant_queued(self) -> list[_Waiting]:
        granted: list[_Waiting] = []
        while self.queue and self._fits(self.queue[0].request):
            waiting = self.queue.popleft()
            waiting.granted = self._grant(waiting.request, waited_s=time.monotonic() - waiting.since)
            granted.append(waiting)
        return granted

    def withdraw(self, waiting: _Waiting) -> list[_Waiting]:
        """A queued request whose asker gave up; returns the requests behind it now granted."""
        try:
            self.queue.remove(waiting)
        except ValueError:
            return []
        return self._grant_queued()

    def reclaim(self, agent_id: str, *, alive_pid: int | None = None) -> tuple[list[Lease], list[_Waiting], list[_Waiting]]:
        """Take back what a dead process of ``agent_id`` held: every lease and queued
        request not made by ``alive_pid`` (all of them when None).

        Returns (leases taken back, queued requests dropped, queued requests now granted).
        """
        def dead(pid: int, agent: str) -> bool:
            return agent == agent_id and (alive_pid is None or pid != alive_pid)

        taken = [lease for lease in self.leases.values() if dead(lease.pid, lease.agent_id)]
        for lease in taken:
            del self.leases[lease.lease_id]
        dropped = [w for w in self.queue if dead(w.request.pid, w.request.agent_id)]
        for waiting in dropped:
            self.queue.remove(waiting)
        return taken, dropped, self._grant_queued()

    def _fits(self, request: LeaseRequest) -> bool:
        agent = [l for l in self.leases.values() if l.agent_id == request.agent_id]
        return (
            self.allocated_cpu + request.cpu <= self.total_cpu + 1e-9
            and self.allocated_memory_mb + request.memory_mb <= self.total_memory_mb
            and sum(l.cpu for l in agent) + request.cpu <= self.agent_cpu + 1e-9
            and sum(l.memory_mb for l in agent) + request.memory_mb <= self.agent_memory_mb
        )

    def _grant(self, request: LeaseRequest, *, waited_s: float) -> Lease:
        lease = Lease(
            lease_id=f"lease-{next(self._ids)}", agent_id=request.agent_id, pid=request.pid,
            task_id=request.task_id, item_id=request.item_id, cpu=request.cpu,
            memory_mb=request.memory_mb, waited_s=round(waited_s, 4),
        )
        self.leases[lease.lease_id] = lease
        return lease


__all__ = ["LeaseBook", "LeaseRefused"]
