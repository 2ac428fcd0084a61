"""Thin Ray actor hosts: each connects to NATS and serves its plain-Python core.

A host does no domain work of its own. Its ``__init__`` starts the NATS subscription in
the actor's event loop, so an actor that Ray restarts after a crash serves again
without anyone calling it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

import psutil
import structlog
from nats.errors import Error as NatsError

from bus import Bus, subjects
from bus.auth import NatsAuth
from bus.logs import configure_logging
from schemas import (
    Ack,
    AgentSettings,
    GateResults,
    AgentUsage,
    Lease,
    LeaseEvent,
    LimitExceededEvent,
    LeaseRelease,
    LeaseRequest,
    Plan,
    PlannerSpec,
    PlanRequest,
    ProgressEvent,
    RequestRejected,
    ResourceSnapshot,
    ResourceSpec,
    SnapshotRequest,
    TaskRef,
    UsageEvent,
    VerifyRequest,
    WorkItemAssignment,
    WorkItemBatch,
    WorkItemResult,
    WorkItemResults,
)

from .executor import ExecutorCore
from .llm import LLMError, OllamaPlanner, PromptRunner
from .planner import DeclarativePlanner, PlannerError
from .resources import LeaseBook, LeaseRefused
from .secrets import SecretError, SecretStore, redact, redact_value, resolve_env, secret_names
from .verifier import VerifierCore

log = structlog.get_logger("hivebus.agent")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or ""
    except Exception:  # outside Ray (unit tests) there is no runtime context
        return ""


class AgentHost:
    """Base of the four agent hosts: owns the bus connection and the start/stop protocol."""

    role: ClassVar[str]
    #: Seconds between two samples of this agent's CPU and RSS (and its children's).
    usage_interval_s: ClassVar[float] = 1.0

    def __init__(self, settings: AgentSettings, auth: NatsAuth | None = None):
        configure_logging(json=True)
        self.settings = settings
        self.auth = auth
        self.agent_id = settings.agent_id
        self.bus: Bus | None = None
        self.log = log.bind(agent=self.agent_id)
        self._sampler: asyncio.Task[None] | None = None
        self._started = asyncio.get_event_loop().create_task(self._start())

    async def _start(self) -> None:
        self.bus = await Bus.connect(self.settings.nats_url, name=self.agent_id, auth=self.auth)
        await self.serve(self.bus)
        self._sampler = asyncio.get_running_loop().create_task(self._sample_usage(self.bus))
        self.log.info("agent serving", role=self.role, pid=os.getpid())

    async def _sample_usage(self, bus: Bus) -> None:
        """Publish this agent's CPU and RSS, children included, every second.

        The samples double as the agent's heartbeat: the orchestrator re-dispatches an
        item whose executor stops sending them or comes back with another pid.
        """
        me = psutil.Process()
        known: dict[int, psutil.Process] = {}
        while True:
            rss, cpu, children = 0, 0.0, 0
            tree = [me]
            try:
                tree += me.children(recursive=True)
            except psutil.Error:
                pass
            alive = set()
            for proc in tree:
                # Reusing Process objects keeps cpu_percent's interval between samples.
                proc = known.setdefault(proc.pid, proc)
                alive.add(proc.pid)
                try:
                    with proc.oneshot():
                        rss += proc.memory_info().rss
                        cpu += proc.cpu_percent(None)
                except psutil.Error:
                    continue
                children += proc is not me
            for pid in set(known) - alive:
                del known[pid]
            try:
                await bus.emit(subjects.usage(self.agent_id), UsageEvent(
                    agent_id=self.agent_id, pid=me.pid, cpu_percent=round(cpu, 1),
                    rss_mb=round(rss / 2**20, 1), children=children))
            except NatsError as exc:  # a sample lost while NATS reconnects is not worth dying for
                self.log.debug("usage sample not sent", error=str(exc))
            await asyncio.sleep(self.usage_interval_s)

    async def serve(self, bus: Bus) -> None:
        raise NotImplementedError

    async def ready(self) -> dict[str, Any]:
        """Wait until the agent serves its subject; its identity for the caller."""
        await self._started
        return {"agent_id": self.agent_id, "role": self.role, "pid": os.getpid(), "node_id": _node_id()}

    async def stop(self) -> None:
        """Stop serving: drain the NATS connection."""
        if self._sampler is not None:
            self._sampler.cancel()
        if self.bus is not None:
            await self.bus.close()


class SecretsMixin:
    """Secrets are resolved by the agent that runs the child, from the hive's encrypted
    store: they never travel on NATS, and whatever comes back is redacted."""

    settings: AgentSettings
    _store: SecretStore | None = None

    def _resolve(self, env: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        if not secret_names(env):
            return env, []
        if self._store is None:
            self._store = SecretStore.open(self.settings.state_dir)
        return resolve_env(env, self._store)


def _redact_result(result: WorkItemResult, secrets: list[str]) -> WorkItemResult:
    if not secrets:
        return result
    stdout = redact(result.stdout_tail, secrets)
    evidence = [redact(e, secrets) for e in result.evidence if not e.startswith("stdout sha256:")]
    if stdout:
        evidence.insert(0, "stdout sha256:" + hashlib.sha256(stdout.encode()).hexdigest()[:12])
    return result.model_copy(update={
        "stdout_tail": stdout, "stderr_tail": redact(result.stderr_tail, secrets),
        "handoff_notes": redact(result.handoff_notes, secrets),
        "error": redact(result.error, secrets) if result.error else result.error,
        "output": redact_value(result.output, secrets), "evidence": evidence,
    })


class PlannerHost(AgentHost):
    role = "planner"

    async def serve(self, bus: Bus) -> None:
        self.declarative = DeclarativePlanner(agent_id=self.agent_id)
        self.ollama = OllamaPlanner(agent_id=self.agent_id)
        await bus.serve(subjects.PLANNER_PLAN, PlanRequest, self._plan, queue=subjects.PLANNERS)

    async def _plan(self, request: PlanRequest) -> Plan:
        """Declarative tasks never touch Ollama; ``strategy: ollama`` asks the model."""
        core = self.ollama if request.spec.planner.strategy == "ollama" else self.declarative
        try:
            return await core.plan(request)
        except (PlannerError, LLMError) as exc:
            raise RequestRejected(subjects.PLANNER_PLAN, "invalid", str(exc)) from None


AGENT_ENV = "HIVEBUS_AGENT_ID"


def agent_mark(settings: AgentSettings) -> str:
    return f"{settings.hive_id}/{settings.agent_id}"


def sweep_orphans(mark: str) -> int:
    """Kill processes left by an earlier life of this agent (it was killed mid-item).

    Every work item child carries ``HIVEBUS_AGENT_ID`` in its environment, which its own
    children inherit, so this finds the whole tree even after it was re-parented.
    """
    killed = 0
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(AGENT_ENV) == mark:
                proc.kill()
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return killed


class ExecutorHost(SecretsMixin, AgentHost):
    """Runs one work item at a time; a request that finds it busy is answered ``busy``.

    Delivery is at least once, so the same attempt (same idempotency key) may arrive
    twice: while it runs, the copy waits for the same result; after it ran, the copy gets
    the remembered result. Every result is also stored in the event stream under its
    idempotency key, where a second copy is dropped.
    """

    role = "executor"
    remembered_results = 512

    async def serve(self, bus: Bus) -> None:
        orphans = await asyncio.to_thread(sweep_orphans, agent_mark(self.settings))
        if orphans:
            self.log.warning("killed processes left by an earlier life of this agent", count=orphans)
        scratch = Path(self.settings.state_dir) / "scratch" / self.agent_id
        scratch.mkdir(parents=True, exist_ok=True)
        pool = self.settings.pool
        self.core = ExecutorCore(agent_id=self.agent_id, node_id=_node_id(),
                                 default_timeout_s=self.settings.hive.default_timeout_s,
                                 scratch_dir=str(scratch),
                                 default_resources=ResourceSpec(cpu=pool.cpu, memory_mb=pool.memory_mb))
        self.prompts = PromptRunner(timeout_s=self.settings.hive.default_timeout_s)
        self._busy = False
        self._releasing: set[asyncio.Task[Ack]] = set()
        self._canceled: OrderedDict[str, None] = OrderedDict()
        self._running: dict[str, asyncio.Future[WorkItemResult]] = {}
        self._recent: OrderedDict[str, WorkItemResult] = OrderedDict()
        await bus.serve(subjects.EXECUTOR_RUN, WorkItemAssignment, self._run, queue=subjects.EXECUTORS)
        await bus.serve(subjects.executor_run(self.settings.hive_id, self.agent_id), WorkItemAssignment, self._run)
        await bus.serve(subjects.executor_batch(self.settings.hive_id, self.agent_id), WorkItemBatch,
                        self._run_batch)
        await bus.subscribe(subjects.EXECUTOR_CANCEL, TaskRef, self._cancel)

    async def _run(self, assignment: WorkItemAssignment) -> WorkItemResult:
        key = assignment.idempotency_key
        if key in self._recent:
            return self._recent[key]
        if key in self._running:
            return await asyncio.shield(self._running[key])
        if self._busy:
            raise RequestRejected(subjects.EXECUTOR_RUN, "busy", f"{self.agent_id} is running another item")
        self._busy = True
        try:
            lease = await self._lease(assignment)
            try:
                return await self._once(assignment)
            finally:
                self._release_soon(lease)
        finally:
            self._busy = False

    async def _run_batch(self, batch: WorkItemBatch) -> WorkItemResults:
        """Run a batch's attempts one after the other under one lease (the largest ask)."""
        if self._busy:
            raise RequestRejected(subjects.EXECUTOR_RUN, "busy", f"{self.agent_id} is running another item")
        self._busy = True
        results = []
        try:
            todo = [a for a in batch.assignments if a.idempotency_key not in self._recent]
            lease = await self._lease(*todo) if todo else None
            try:
                for assignment in batch.assignments:
                    key = assignment.idempotency_key
                    if key in self._recent:
                        results.append(self._recent[key])
                    elif assignment.task_id in self._canceled:
                        results.append(WorkItemResult(
                            task_id=assignment.task_id, iteration=assignment.iteration,
                            item_id=assignment.item.id, attempt=assignment.attempt, status="canceled",
                            error="the task was canceled before this item ran", agent_id=self.agent_id))
                    else:
                        results.append(await self._once(assignment))
            finally:
                if lease is not None:
                    self._release_soon(lease)
        finally:
            self._busy = False
        return WorkItemResults(results=results)

    async def _once(self, assignment: WorkItemAssignment) -> WorkItemResult:
        """One attempt, remembered under its idempotency key (at-least-once delivery)."""
        key = assignment.idempotency_key
        running = self._running[key] = asyncio.get_running_loop().create_future()
        try:
            result = await self._execute(assignment)
        except BaseException:
            # Copies waiting on this attempt get no answer from here; their sender re-sends.
            running.cancel()
            raise
        else:
            running.set_result(result)
            self._recent[key] = result
            while len(self._recent) > self.remembered_results:
                self._recent.popitem(last=False)
            return result
        finally:
            del self._running[key]

    async def _execute(self, assignment: WorkItemAssignment) -> WorkItemResult:
        assert self.bus is not None
        assignment = assignment.model_copy(update={"env": {**assignment.env, AGENT_ENV: agent_mark(self.settings)}})
        self.bus.publish_soon(subjects.progress(assignment.task_id), ProgressEvent(
            task_id=assignment.task_id, iteration=assignment.iteration,
            kind="item_started", item_id=assignment.item.id,
            attempt=assignment.attempt, agent_id=self.agent_id,
        ))
        if assignment.item.kind == "prompt":
            result = await self.prompts.run(assignment, planner=assignment.llm or PlannerSpec(),
                                            agent_id=self.agent_id)
        else:
            try:
                env, secrets = self._resolve(assignment.env)
            except SecretError as exc:
                return WorkItemResult(task_id=assignment.task_id, iteration=assignment.iteration,
                                      item_id=assignment.item.id, attempt=assignment.attempt,
                                      status="error", error=str(exc), agent_id=self.agent_id)
            result = await self.core.run(assignment.model_copy(update={"env": env}))
            result = _redact_result(result, secrets)
        if result.limit is not None and result.status == "resource_limit":
            hit = result.limit
            self.bus.publish_soon(subjects.limit_exceeded(self.agent_id), LimitExceededEvent(
                agent_id=self.agent_id, task_id=result.task_id, item_id=result.item_id,
                limit=hit.limit, limit_value=hit.limit_value, peak_value=hit.peak_value,
                mechanism=hit.mechanism))
        self.bus.publish_soon(subjects.result(result.task_id, result.item_id), result,
                              msg_id=assignment.idempotency_key)
        return result

    def _release_soon(self, lease: Lease) -> None:
        """Return a lease without holding up the reply: the children are gone, and the
        release reaches the resource manager before this executor's next lease request."""
        assert self.bus is not None
        releasing = asyncio.get_running_loop().create_task(self.bus.call(
            subjects.RESOURCES_RELEASE, LeaseRelease(lease_id=lease.lease_id), Ack))
        self._releasing.add(releasing)
        releasing.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[Ack]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The resource manager reclaims a lease whose agent process is gone; a live
            # one that could not return a lease says so.
            self.log.error("lease not returned", error=str(task.exception()))

    async def _lease(self, *assignments: WorkItemAssignment) -> Lease:
        """One lease big enough for each of ``assignments`` (run one after the other)."""
        assert self.bus is not None
        pool = self.settings.pool
        first = assignments[0]
        wait_s = max(a.item.timeout_s or self.settings.hive.default_timeout_s for a in assignments) + 60
        request = LeaseRequest(
            agent_id=self.agent_id, pid=os.getpid(), task_id=first.task_id, item_id=first.item.id,
            cpu=max(a.resources.cpu or pool.cpu for a in assignments),
            memory_mb=max(a.resources.memory_mb or pool.memory_mb for a in assignments), wait_s=wait_s,
        )
        return await self.bus.call(subjects.RESOURCES_LEASE, request, Lease, timeout=wait_s + 5)

    async def _cancel(self, ref: TaskRef) -> None:
        # The rest of a batch of that task is not started either.
        self._canceled[ref.task_id] = None
        while len(self._canceled) > self.remembered_results:
            self._canceled.popitem(last=False)
        killed = self.core.cancel(ref.task_id)
        if killed:
            self.log.info("canceled running items", task_id=ref.task_id, count=killed)

    async def stop(self) -> None:
        """Kill the children of every running item, then stop serving."""
        for key in list(self.core.running):
            self.core.cancel(key.split(":", 1)[0])
        await self.core.close()
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=5.0)
        await super().stop()


class VerifierHost(SecretsMixin, AgentHost):
    role = "verifier"

    async def serve(self, bus: Bus) -> None:
        self.core = VerifierCore(agent_id=self.agent_id,
                                 default_timeout_s=self.settings.hive.default_timeout_s)
        await bus.serve(subjects.VERIFIER_VERIFY, VerifyRequest, self._verify, queue=subjects.VERIFIERS)

    async def _verify(self, request: VerifyRequest) -> GateResults:
        try:
            env, secrets = self._resolve(request.env)
            gates = []
            for gate in request.gates:
                gate_env, used = self._resolve(gate.env)
                secrets += used
                gates.append(gate.model_copy(update={"env": gate_env}))
        except SecretError as exc:
            raise RequestRejected(subjects.VERIFIER_VERIFY, "invalid", str(exc)) from None
        results = await self.core.verify(request.model_copy(update={"env": env, "gates": gates}))
        if not secrets:
            return results
        return GateResults(results=[r.model_copy(update={
            "stdout_tail": redact(r.stdout_tail, secrets), "stderr_tail": redact(r.stderr_tail, secrets),
            "problems": [redact(p, secrets) for p in r.problems]}) for r in results.results])


class ResourceHost(AgentHost):
    """The resource manager: one per hive, the single writer of the lease book."""

    role = "resources"
    #: An agent silent this long is dead (Ray restarts take a few seconds): its leases return.
    silence_s: ClassVar[float] = 10.0

    async def serve(self, bus: Bus) -> None:
        hive, pool = self.settings.hive, self.settings.hive.executor
        self._waiters: dict[int, asyncio.Future[Lease]] = {}
        self._requests: dict[str, asyncio.Future[Lease]] = {}  # request_id -> its lease
        self.usage: dict[str, AgentUsage] = {}
        self.book = LeaseBook(total_cpu=hive.total_cpu, total_memory_mb=hive.total_memory_mb,
                              agent_cpu=pool.cpu, agent_memory_mb=pool.memory_mb)
        await bus.serve(subjects.RESOURCES_LEASE, LeaseRequest, self._lease, queue=subjects.RESOURCE_MANAGERS)
        await bus.serve(subjects.RESOURCES_RELEASE, LeaseRelease, self._release, queue=subjects.RESOURCE_MANAGERS)
        await bus.serve(subjects.RESOURCES_SNAPSHOT, SnapshotRequest, self._snapshot, queue=subjects.RESOURCE_MANAGERS)
        await bus.subscribe(subjects.usage("*"), UsageEvent, self._on_usage)
        self._last_seen: dict[str, float] = {}
        self._reaper = asyncio.get_running_loop().create_task(self._reap_silent())

    async def _on_usage(self, event: UsageEvent) -> None:
        previous = self.usage.get(event.agent_id)
        self.usage[event.agent_id] = AgentUsage(
            agent_id=event.agent_id, pid=event.pid, cpu_percent=event.cpu_percent,
            rss_mb=event.rss_mb, children=event.children, sampled_at=event.ts)
        self._last_seen[event.agent_id] = asyncio.get_running_loop().time()
        if previous is not None and previous.pid != event.pid:
            await self._reclaim(event.agent_id, alive_pid=event.pid, why="restarted")

    async def _reap_silent(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = asyncio.get_running_loop().time()
            for agent, seen in list(self._last_seen.items()):
                if now - seen > self.silence_s:
                    del self._last_seen[agent]
                    await self._reclaim(agent, alive_pid=None, why="silent")

    async def _reclaim(self, agent_id: str, *, alive_pid: int | None, why: str) -> None:
        """Leases of a dead agent process come back; its queued requests are dropped."""
        taken, dropped, granted = self.book.reclaim(agent_id, alive_pid=alive_pid)
        for waiting in dropped:
            future = self._waiters.get(id(waiting))
            if future is not None and not future.done():
                future.cancel()
        for lease in taken:
            await self._announce("release", lease)
        if taken or dropped:
            self.log.warning("reclaimed the leases of a dead agent process", dead=agent_id, why=why,
                             leases=len(taken), queued=len(dropped))
        self._hand_out(granted)

    async def _lease(self, request: LeaseRequest) -> Lease:
        book = self.book
        if request.pid and (
            any(l.agent_id == request.agent_id and l.pid != request.pid for l in book.leases.values())
            or any(w.request.agent_id == request.agent_id and w.request.pid != request.pid for w in book.queue)
        ):
            # An agent is one process at a time: what another process of it holds is left
            # by a dead one, whatever its heartbeats have or have not shown yet.
            await self._reclaim(request.agent_id, alive_pid=request.pid, why="its new process asks")
        earlier = self._requests.get(request.request_id)
        if earlier is not None:  # the same request again: the same lease
            return await asyncio.shield(earlier)
        answer = self._requests[request.request_id] = asyncio.get_running_loop().create_future()
        try:
            lease = await self._admit(request)
        except BaseException:
            del self._requests[request.request_id]
            answer.cancel()
            raise
        answer.set_result(lease)
        return lease

    async def _admit(self, request: LeaseRequest) -> Lease:
        try:
            lease, waiting = self.book.request(request)
        except LeaseRefused as exc:
            raise RequestRejected(subjects.RESOURCES_LEASE, "invalid", str(exc)) from None
        if lease is None:
            assert waiting is not None
            granted = asyncio.get_running_loop().create_future()
            self._waiters[id(waiting)] = granted
            try:
                lease = await asyncio.wait_for(granted, timeout=request.wait_s)
            except asyncio.CancelledError:
                if not granted.cancelled():
                    raise
                raise RequestRejected(subjects.RESOURCES_LEASE, "conflict",
                                      f"{request.agent_id} (pid {request.pid}) is gone") from None
            except asyncio.TimeoutError:
                self._hand_out(self.book.withdraw(waiting))
                raise RequestRejected(subjects.RESOURCES_LEASE, "busy",
                                      f"no room for {request.item_id!r} within {request.wait_s:g} s") from None
            finally:
                self._waiters.pop(id(waiting), None)
        await self._announce("allocation", lease)
        return lease

    async def _release(self, release: LeaseRelease) -> Ack:
        lease, granted = self.book.release(release.lease_id)
        if lease is None:
            return Ack(ok=False, message=f"no lease {release.lease_id!r}")
        self._requests = {rid: f for rid, f in self._requests.items()
                          if not (f.done() and not f.cancelled() and f.result().lease_id == lease.lease_id)}
        await self._announce("release", lease)
        self._hand_out(granted)
        return Ack()

    def _hand_out(self, granted: list) -> None:  # type: ignore[type-arg]
        """Wake the askers of newly granted leases; a grant whose asker is gone goes back."""
        while granted:
            waiting = granted.pop(0)
            future = self._waiters.get(id(waiting))
            if future is not None and not future.done():
                future.set_result(waiting.granted)
            elif waiting.granted is not None:
                granted += self.book.release(waiting.granted.lease_id)[1]

    async def _snapshot(self, _: SnapshotRequest) -> ResourceSnapshot:
        book = self.book
        return ResourceSnapshot(
            total_cpu=book.total_cpu, total_memory_mb=book.total_memory_mb,
            agent_cpu=book.agent_cpu, agent_memory_mb=book.agent_memory_mb,
            allocated_cpu=book.allocated_cpu, allocated_memory_mb=book.allocated_memory_mb,
            leases=list(book.leases.values()), queued=len(book.queue),
            usage=sorted(self.usage.values(), key=lambda u: u.agent_id),
        )

    async def _announce(self, kind: str, lease: Lease) -> None:
        assert self.bus is not None
        subject = subjects.allocation if kind == "allocation" else subjects.release
        self.bus.publish_soon(subject(lease.agent_id), LeaseEvent(
            kind=kind, lease=lease, allocated_cpu=self.book.allocated_cpu,  # type: ignore[arg-type]
            allocated_memory_mb=self.book.allocated_memory_mb,
        ))


HOSTS: dict[str, type[AgentHost]] = {
    "planner": PlannerHost,
    "executor": ExecutorHost,
    "verifier": VerifierHost,
    "resources": ResourceHost,
}

__all__ = ["AgentHost", "PlannerHost", "ExecutorHost", "VerifierHost", "ResourceHost", "HOSTS"]
