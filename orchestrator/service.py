"""The orchestrator: serves ``task.*`` and drives each task through plan -> execute -> verify.

Decisions are made by the pure state machine (``machine``) and DAG scheduler
(``scheduler``); this module does the I/O around them: records in the ``hivebus_tasks``
bucket, events on NATS, requests to agents, artifacts on disk.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import structlog

from nats.aio.msg import Msg
from nats.js.errors import NoKeysError, NotFoundError

from bus import Bus, subjects
from bus.connection import RETRY_PATIENCE_S, decode_message
from schemas import (
    PRIORITY_RANK,
    Message,
    Checkpoint,
    CompletionEvent,
    ExitReason,
    GateOutcome,
    GateResult,
    GateResults,
    HiveConfig,
    ItemOutcome,
    IterationRecord,
    LifecycleEvent,
    Plan,
    PlanRequest,
    ProgressEvent,
    ReportEvent,
    RequestRejected,
    ResourceSpec,
    TaskAccepted,
    TaskList,
    TaskQuery,
    TaskRecord,
    TaskRef,
    TaskSpec,
    TaskState,
    TransportError,
    UsageEvent,
    VerifyRequest,
    WorkItemAssignment,
    WorkItemBatch,
    WorkItemResult,
    WorkItemResults,
    WorkItemSpec,
    FailureContext,
    dag_problems,
    encode,
    utcnow,
)
from schemas.codec import CodecError, decode

from actors.policy import Policy
from actors.secrets import SecretError, SecretStore, secret_names

from .artifacts import TaskArtifacts
from .metrics import Metrics, NoMetrics
from .machine import enter_stage, failure_context, fingerprint, judge_iteration, transition
from .report import render_markdown, report_data
from .scheduler import Scheduler
from .validation import limit_problems, task_problems

log = structlog.get_logger("hivebus.orchestrator")
M = TypeVar("M", bound=Message)

#: Extra seconds a dispatch waits beyond the item's own timeout (lease wait, overhead).
DISPATCH_SLACK_S = 60.0
#: How long dispatch keeps trying while no executor serves the subject at all.
NO_EXECUTOR_PATIENCE_S = 120.0
#: An executor whose usage samples (one a second) stop for this long, or that comes
#: back with another pid, has lost the item it was running: it is dispatched again.
HEARTBEAT_TIMEOUT_S = 3.5
#: Items of a task whose runs average less than this go to executors in batches, one
#: request carrying up to MAX_BATCH_ITEMS of them, sized to take about BATCH_TARGET_S.
BATCH_ITEM_S = 0.02
BATCH_TARGET_S = 0.05
MAX_BATCH_ITEMS = 64
#: Only these kinds are batched: a prompt waits on an LLM, a subtask on a whole task.
BATCHABLE_KINDS = frozenset({"shell", "call"})
#: How often the watchdog looks at the heartbeats of the executors running attempts.
WATCHDOG_INTERVAL_S = 0.5
#: How long a changed artifact may wait before it is written (see TaskArtifacts).
ARTIFACTS_WRITE_BEHIND_S = 0.05


class TaskEnded(Exception):
    """Raised inside a task's loop to end it with a terminal state (control flow)."""

    def __init__(self, state: TaskState, exit_reason: ExitReason, message: str):
        super().__init__(message)
        self.state, self.exit_reason, self.message = state, exit_reason, message


def new_task_id() -> str:
    return f"t-{int(time.time() * 1000):x}-{secrets.token_hex(3)}"


@dataclass
class _Batch:
    """The work items of one iteration of one task, while they run."""

    task_id: str
    plan: Plan
    record: TaskRecord
    done: asyncio.Future[None]
    results: dict[str, WorkItemResult] = field(default_factory=dict)
    #: Moving average of its items' run times (s), once one has finished.
    item_s: float | None = None

    def per_request(self, ready: int, slots: int) -> int:
        """How many items one request to one executor should carry: one, unless the
        items are known to be short and there are more ready than free executors."""
        if self.item_s is None or self.item_s > BATCH_ITEM_S or ready <= slots:
            return 1
        fits = int(BATCH_TARGET_S / max(self.item_s, 1e-4))
        return max(1, min(MAX_BATCH_ITEMS, fits, -(-ready // slots)))


@dataclass(eq=False)
class _Running:
    """One attempt waiting for its executor's reply, as the watchdog sees it."""

    request: asyncio.Task[WorkItemResult]
    #: The bus's connection epoch when the request was sent.
    epoch: int
    #: The executor running the attempt once known: at once when it was sent to a named
    #: executor, at its item_started event when it went to the queue group.
    agent: str | None = None
    #: That executor's pid when it took the attempt (0: not known).
    pid: int = 0
    #: Why the watchdog cancelled the request: "executor" (lost) or "reconnect".
    lost: str = ""


@dataclass
class _Task:
    record: TaskRecord
    artifacts: TaskArtifacts
    loop: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    results: list[WorkItemResult] = field(default_factory=list)
    saved: bool = False  # counted in the metrics by this orchestrator


class Orchestrator:
    """Owns every task of a hive. One per hive; agents are reached only through NATS."""

    def __init__(self, *, bus: Bus, config: HiveConfig, state_dir: Path,
                 workdir_root: Path | None = None, policy: Policy | None = None,
                 metrics: Metrics | None = None):
        self.bus = bus
        self.config = config
        self.metrics: Metrics = metrics or NoMetrics()
        #: idempotency key -> when it was first sent / how long until an executor took it
        self._sent_at: dict[str, float] = {}
        self._latency: dict[str, float] = {}
        #: The execution policy every plan is checked against (None: no check).
        self.policy = policy
        self.state_dir = state_dir
        self.artifacts_root = state_dir / "artifacts"
        self.workdir_root = workdir_root or Path.cwd()
        self.tasks: dict[str, _Task] = {}
        self.scheduler = Scheduler()
        self.capacity = config.executor.replicas
        self.in_flight = 0
        self._batches: dict[Hashable, _Batch] = {}
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._kv = None
        self._subs: list[object] = []
        #: agent_id -> (pid, monotonic time) of its latest usage sample
        self._heartbeats: dict[str, tuple[int, float]] = {}
        #: idempotency key -> the attempt waiting for its reply, watched by the watchdog
        self._running: dict[str, _Running] = {}
        self._watchers: list[asyncio.Task[None]] = []
        #: Executors this hive started, in the order work is offered to them; an idle one
        #: gets an attempt on its own subject, so attempts do not collide in the queue group.
        self._executors: list[str] = []
        self._hive_id = ""
        self._assigned: set[str] = set()

    # -- lifecycle of the service -------------------------------------------------

    async def start(self) -> None:
        await self.bus.ensure_streams()
        self._kv = await self.bus.tasks_bucket()
        self.artifacts_root.mkdir(parents=True, exist_ok=True)
        q = subjects.ORCHESTRATORS
        self._subs += [
            await self.bus.serve(subjects.TASK_SUBMIT, TaskSpec, self._on_submit, queue=q),
            await self.bus.serve(subjects.TASK_GET, TaskRef, self._on_get, queue=q),
            await self.bus.serve(subjects.TASK_LIST, TaskQuery, self._on_list, queue=q),
            await self.bus.serve(subjects.TASK_CANCEL, TaskRef, self._on_cancel, queue=q),
            await self.bus.serve(subjects.TASK_APPROVE, TaskRef, self._on_approve, queue=q),
            await self.bus.subscribe(subjects.usage("*"), UsageEvent, self._on_usage),
            # Raw: most progress events are this orchestrator's own and are not decoded.
            await self.bus.nc.subscribe(subjects.progress("*"), cb=self._on_progress),
        ]
        loop = asyncio.get_running_loop()
        self._pump = loop.create_task(self._dispatch_loop())
        self._watchers = [loop.create_task(self._watchdog()),
                          loop.create_task(self._resend_after_reconnects())]

    def use_executors(self, hive_id: str, agent_ids: list[str]) -> None:
        """The executors this hive started: idle ones get attempts on their own subject."""
        self._hive_id = hive_id
        self._executors = list(agent_ids)

    async def resume(self) -> None:
        """Take over every task in ``hivebus_tasks``; continue the ones that had not ended.

        Call it once the agents serve: a resumed task plans and dispatches at once.
        """
        assert self._kv is not None
        try:
            keys = await self._kv.keys()
        except NoKeysError:  # an empty bucket
            return
        for task_id in keys:
            entry = await self._kv.get(task_id)
            record = decode(entry.value or b"", TaskRecord)
            task = _Task(record=record, artifacts=self._artifacts(task_id, load=True))
            self.tasks[task_id] = task
            state = record.state
            if state.terminal:
                continue
            log.info("resuming task", task_id=task_id, state=state.value, stage=record.stage,
                     iteration=record.iteration)
            if state == TaskState.DRAFT:
                self._watch_approval_deadline(task)
            elif state == TaskState.APPROVED:
                await self._save(task, transition(record, TaskState.QUEUED, now=utcnow()))
                task.loop = asyncio.get_running_loop().create_task(self._drive(task))
            else:
                task.loop = asyncio.get_running_loop().create_task(self._drive(task))

    async def _on_usage(self, event: UsageEvent) -> None:
        self._heartbeats[event.agent_id] = (event.pid, time.monotonic())

    def _artifacts(self, task_id: str, *, load: bool = False) -> TaskArtifacts:
        return TaskArtifacts(self.artifacts_root, task_id, load=load,
                             write_behind_s=ARTIFACTS_WRITE_BEHIND_S)

    async def _on_progress(self, msg: Msg) -> None:
        """An executor's item_started: who runs an attempt sent to the queue group, and
        the dispatch latency. The other kinds (most of them this orchestrator's own) are
        told apart by their bytes and never decoded."""
        if b"item_started" not in msg.data:
            return
        try:
            event = decode_message(msg, ProgressEvent)
        except CodecError as exc:
            log.warning("undecodable event", subject=msg.subject, error=exc.message)
            return
        if event.kind != "item_started" or event.item_id is None:
            return
        key = f"{event.task_id}:{event.iteration}:{event.item_id}:{event.attempt}"
        sent = self._sent_at.pop(key, None)
        if sent is not None:
            self._latency[key] = time.monotonic() - sent
        running = self._running.get(key)
        if running is not None and running.agent is None:
            running.agent = event.agent_id
            running.pid = self._heartbeats.get(event.agent_id, (0, 0.0))[0]

    async def stop(self) -> None:
        """Stop serving and abandon running loops (their records stay as they are);
        the artifacts written behind are on disk when it returns."""
        for sub in self._subs:
            await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs.clear()
        loops = [t.loop for t in self.tasks.values() if t.loop and not t.loop.done()]
        for task in loops + ([self._pump] if self._pump else []) + self._watchers:
            task.cancel()
        await asyncio.gather(*loops, *self._watchers, return_exceptions=True)
        self._watchers = []
        await asyncio.gather(*(t.artifacts.close() for t in self.tasks.values()))

    # -- task.* requests ----------------------------------------------------------

    async def _on_submit(self, spec: TaskSpec) -> TaskAccepted:
        record = await self.submit(spec)
        return TaskAccepted(task_id=record.task_id, state=record.state)

    async def _on_get(self, ref: TaskRef) -> TaskRecord:
        return await self.get(ref.task_id)

    async def _on_list(self, query: TaskQuery) -> TaskList:
        records = [t.record for t in self.tasks.values()]
        if query.state is not None:
            records = [r for r in records if r.state == query.state]
        return TaskList(tasks=sorted(records, key=lambda r: r.created_at))

    async def _on_cancel(self, ref: TaskRef) -> TaskRecord:
        return await self.cancel(ref.task_id)

    async def _on_approve(self, ref: TaskRef) -> TaskRecord:
        return await self.approve(ref.task_id)

    # -- the API behind them ------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> TaskRecord:
        """Accept a task: validated, recorded durably, queued (or left DRAFT for approval)."""
        problems = task_problems(spec, self.config) + self._secret_problems(spec)
        if problems:
            raise RequestRejected(subjects.TASK_SUBMIT, "invalid", "; ".join(problems))
        task_id = new_task_id()
        workdir = Path(spec.workdir)
        if not workdir.is_absolute():
            workdir = (self.workdir_root / workdir).resolve()
        now = utcnow()
        deadlines = [d for d in (
            now + timedelta(seconds=spec.timeout_s) if spec.timeout_s else None,
            spec.deadline,
        ) if d is not None]
        artifacts = self._artifacts(task_id)
        record = TaskRecord(
            task_id=task_id, spec=spec, workdir=str(workdir), created_at=now, updated_at=now,
            deadline_at=min(deadlines) if deadlines else None,
            artifacts_dir=str(artifacts.dir),
        )
        task = _Task(record=record, artifacts=artifacts)
        self.tasks[task_id] = task
        await self._save(task, record)
        await self._announce(record)
        if spec.run_mode == "autonomous":
            await self._queue(task)
        else:
            self._watch_approval_deadline(task)
        log.info("task accepted", task_id=task_id, title=spec.title, state=task.record.state.value)
        return task.record

    def _secret_problems(self, spec: TaskSpec) -> list[str]:
        """Every ``${secret:NAME}`` the task names must be in this hive's secret store."""
        envs = [spec.env] + [i.env for i in spec.work_items + spec.on_gate_failure] + [g.env for g in spec.gates]
        names = secret_names([v for env in envs for v in env.values()])
        if not names:
            return []
        try:
            store = SecretStore.open(self.state_dir)
            return [f"env: unknown secret {name!r} (add it with `hivebus secret set {name}`)"
                    for name in names if name not in store]
        except SecretError as exc:
            return [f"env: the task uses secrets, but {exc}"]

    async def get(self, task_id: str) -> TaskRecord:
        task = self.tasks.get(task_id)
        if task is not None:
            return task.record
        if self._kv is not None:
            try:
                entry = await self._kv.get(task_id)
            except NotFoundError:
                pass
            else:
                return decode(entry.value or b"", TaskRecord)
        raise RequestRejected(subjects.TASK_GET, "unknown_task", f"no task {task_id!r}")

    async def cancel(self, task_id: str) -> TaskRecord:
        task = self._known(task_id, subjects.TASK_CANCEL)
        if task.record.state.terminal:
            return task.record
        task.cancel_requested = True
        if task.loop is not None and not task.loop.done():
            task.loop.cancel()
            await asyncio.wait({task.loop}, timeout=10)
        else:
            await self._finish(task, TaskState.CANCELED, "canceled", "canceled before it started")
        return task.record

    async def approve(self, task_id: str) -> TaskRecord:
        task = self._known(task_id, subjects.TASK_APPROVE)
        state = task.record.state
        if state == TaskState.DRAFT:
            await self._queue(task)
        elif state.terminal:
            raise RequestRejected(subjects.TASK_APPROVE, "conflict",
                                  f"task {task_id} already ended ({state.value})")
        return task.record

    def _known(self, task_id: str, subject: str) -> _Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise RequestRejected(subject, "unknown_task", f"no task {task_id!r}")
        return task

    async def wait(self, task_id: str) -> TaskRecord:
        """In-process wait for a task's end (the Hive API uses NATS instead)."""
        task = self.tasks[task_id]
        if task.loop is not None:
            await asyncio.wait({task.loop})
        return task.record

    # -- records and events -------------------------------------------------------

    async def _save(self, task: _Task, record: TaskRecord, *, announce: bool = True) -> None:
        changed = (record.state, record.stage, record.iteration) != (
            task.record.state, task.record.stage, task.record.iteration)
        if record.state != task.record.state or not task.saved:
            self.metrics.task_state(record.state.value,
                                    previous=task.record.state.value if task.saved else None)
            task.saved = True
        task.record = record
        data, _ = encode(record)
        kv = self._kv
        assert kv is not None
        await self.bus.retry(lambda: kv.put(record.task_id, data), what=f"store task {record.task_id}")
        if announce and changed:
            await self._announce(record)

    async def _announce(self, record: TaskRecord) -> None:
        await self.bus.publish(subjects.lifecycle(record.task_id), LifecycleEvent(
            task_id=record.task_id, state=record.state, stage=record.stage,
            iteration=record.iteration, exit_reason=record.exit_reason, message=record.message,
        ))

    async def _queue(self, task: _Task) -> None:
        now = utcnow()
        record = transition(task.record, TaskState.APPROVED, now=now)
        await self._save(task, record)
        await self._save(task, transition(record, TaskState.QUEUED, now=now))
        task.loop = asyncio.get_running_loop().create_task(self._drive(task))

    def _watch_approval_deadline(self, task: _Task) -> None:
        deadline = task.record.deadline_at
        if deadline is None:
            return

        async def expire() -> None:
            await asyncio.sleep(max(0.0, (deadline - utcnow()).total_seconds()))
            if task.record.state == TaskState.DRAFT:
                await self._finish(task, TaskState.BLOCKED, "approval_required",
                                   "the task was not approved before its deadline")

        task.loop = asyncio.get_running_loop().create_task(expire())

    # -- one task's loop ----------------------------------------------------------

    async def _drive(self, task: _Task) -> None:
        structlog.contextvars.bind_contextvars(task_id=task.record.task_id)
        log_ = log.bind(task_id=task.record.task_id)
        try:
            deadline = task.record.deadline_at
            when = None
            if deadline is not None:
                when = asyncio.get_running_loop().time() + (deadline - utcnow()).total_seconds()
            async with asyncio.timeout_at(when):
                await self._iterate(task)
        except TaskEnded as end:
            await self._finish(task, end.state, end.exit_reason, end.message)
        except TimeoutError:
            await self._stop_children(task)
            await self._finish(task, TaskState.FAILED, "deadline_exceeded",
                               f"the task passed its deadline ({task.record.deadline_at:%Y-%m-%d %H:%M:%S} UTC); "
                               "running work items were killed")
        except asyncio.CancelledError:
            await self._stop_children(task)
            if task.cancel_requested:
                await self._finish(task, TaskState.CANCELED, "canceled", "canceled on request")
            raise
        except Exception as exc:  # the task must end with a reason, whatever broke
            log_.exception("task loop failed")
            await self._finish(task, TaskState.FAILED, "internal_error",
                               f"hivebus failed while running the task: {type(exc).__name__}: {exc}")

    async def _iterate(self, task: _Task) -> None:
        spec = task.record.spec
        resuming = task.record.state == TaskState.RUNNING and task.record.checkpoint is not None
        if resuming:
            checkpoint = task.record.checkpoint
            assert checkpoint is not None
        else:
            await self._save(task, transition(task.record, TaskState.RUNNING, now=utcnow(), stage="planning"))
            checkpoint = Checkpoint(iteration=1)
        previous_fp = checkpoint.previous_fingerprint
        failure = checkpoint.failure
        for iteration in itertools.count(checkpoint.iteration):
            checkpoint = Checkpoint(iteration=iteration, failure=failure, previous_fingerprint=previous_fp)
            record = enter_stage(task.record, "planning", now=utcnow(), iteration=iteration)
            await self._save(task, record.model_copy(update={"checkpoint": checkpoint}))
            iteration_record = IterationRecord(iteration=iteration)
            plan = await self._plan(task, iteration, failure)
            if not (resuming and task.artifacts.has_plan(iteration)):
                task.artifacts.add_plan(plan)

            await self._save(task, enter_stage(task.record, "executing", now=utcnow()))
            finished = await self._stored_results(task, iteration) if resuming else {}
            resuming = False
            results = await self._execute(task, plan, finished=finished)
            item_results = list(results.values())
            failed = [r for r in item_results if r.status not in ("succeeded", "skipped")]

            gate_results: list[GateResult] | None = None
            if not failed:
                gate_results = []
                if spec.gates:
                    await self._save(task, enter_stage(task.record, "verifying", now=utcnow()))
                    gate_results = await self._verify(task, iteration)
                    task.artifacts.add_gates(gate_results)

            verdict = judge_iteration(
                iteration=iteration, max_iterations=spec.max_iterations,
                item_results=item_results, gate_results=gate_results,
                previous_fingerprint=previous_fp,
                can_replan=bool(spec.on_gate_failure) or spec.planner.strategy == "ollama",
            )
            current_fp = fingerprint(item_results, gate_results or [])
            iteration_record = iteration_record.model_copy(update={
                "items": [self._outcome(task, r) for r in item_results],
                "gates": [GateOutcome(name=g.gate, passed=g.passed, duration_s=g.duration_s,
                                      exit_code=g.exit_code) for g in gate_results or []],
                "fingerprint": current_fp, "finished_at": utcnow(),
            })
            # A resumed task starts again at its checkpoint's iteration: the files of the
            # iterations before it must be on disk before the checkpoint moves past them.
            await task.artifacts.settle()
            await self._save(task, task.record.model_copy(update={
                "iterations": [*task.record.iterations, iteration_record]}), announce=False)
            if verdict.action == "succeed":
                raise TaskEnded(TaskState.SUCCEEDED, "done", verdict.message)
            if verdict.action == "fail":
                assert verdict.exit_reason is not None
                state = TaskState.CANCELED if verdict.exit_reason == "canceled" else TaskState.FAILED
                raise TaskEnded(state, verdict.exit_reason, verdict.message)
            previous_fp = current_fp
            failure = failure_context(task.record.task_id, iteration, item_results, gate_results or [])

    @staticmethod
    def _outcome(task: _Task, result: WorkItemResult) -> ItemOutcome:
        attempts = len(task.artifacts.attempts.get(result.item_id, [])) or result.attempt
        return ItemOutcome(id=result.item_id, status=result.status, attempts=attempts,
                           exit_code=result.exit_code, duration_s=result.duration_s,
                           peak_rss_mb=result.peak_rss_mb, cpu_seconds=result.cpu_seconds,
                           agent_id=result.agent_id)

    async def _agent_call(self, subject: str, request: Message, reply_type: type[M], *,
                          timeout: float) -> M:
        """A request to an agent pool that waits a while for an agent to serve (restarts)."""
        patience = time.monotonic() + NO_EXECUTOR_PATIENCE_S
        while True:
            try:
                return await self.bus.call(subject, request, reply_type, timeout=timeout)
            except TransportError as exc:
                if "nobody is serving" not in str(exc) or time.monotonic() > patience:
                    raise
            await asyncio.sleep(0.2)

    async def _plan(self, task: _Task, iteration: int, failure: FailureContext | None) -> Plan:
        record = task.record
        request = PlanRequest(task_id=record.task_id, iteration=iteration, spec=record.spec,
                              failure=failure)
        try:
            plan = await self._agent_call(subjects.PLANNER_PLAN, request, Plan, timeout=120)
        except (RequestRejected, TransportError) as exc:
            raise TaskEnded(TaskState.FAILED, "planner_error", f"planning failed: {exc}") from None
        # A plan is checked like a task file, whoever made it.
        problems = dag_problems(plan.items, field="plan") + limit_problems(plan.items, self.config, field="plan")
        if problems:
            raise TaskEnded(TaskState.FAILED, "planner_error",
                            "the plan was refused: " + "; ".join(problems))
        if self.policy is not None:
            items = plan.items + [i for i in record.spec.on_gate_failure if i not in plan.items]
            violations = self.policy.check(items, workdir=record.workdir, gates=record.spec.gates,
                                           env=record.spec.env)
            if violations:
                raise TaskEnded(TaskState.BLOCKED, "policy_denied",
                                f"refused by the {self.policy.name} policy before anything ran: "
                                + "; ".join(str(v) for v in violations))
        return plan

    async def _verify(self, task: _Task, iteration: int) -> list[GateResult]:
        record = task.record
        request = VerifyRequest(task_id=record.task_id, iteration=iteration,
                                workdir=record.workdir, env=record.spec.env, gates=record.spec.gates)
        timeout = sum(g.timeout_s or self.config.default_timeout_s for g in record.spec.gates) + DISPATCH_SLACK_S
        for gate in record.spec.gates:
            await self._progress(task, iteration, "gate_started", gate=gate.name)
        try:
            reply = await self._agent_call(subjects.VERIFIER_VERIFY, request, GateResults, timeout=timeout)
        except (RequestRejected, TransportError) as exc:
            raise TaskEnded(TaskState.FAILED, "internal_error", f"verification failed: {exc}") from None
        for result in reply.results:
            if not result.passed:
                self.metrics.gate_failed(result.gate)
            await self._progress(task, iteration, "gate_finished", gate=result.gate,
                                 status="passed" if result.passed else "failed",
                                 duration_s=result.duration_s, agent_id=result.agent_id)
        return reply.results

    async def _progress(self, task: _Task, iteration: int, kind: str, **fields: object) -> None:
        self.bus.publish_soon(subjects.progress(task.record.task_id), ProgressEvent(
            task_id=task.record.task_id, iteration=iteration, kind=kind, **fields))  # type: ignore[arg-type]

    # -- executing: the dispatcher shared by every task ---------------------------

    async def _execute(self, task: _Task, plan: Plan, *,
                       finished: dict[str, WorkItemResult] | None = None) -> dict[str, WorkItemResult]:
        """Run a plan's items on the executors. ``finished`` (after a crash): items whose
        successful result is already stored; they are not run again."""
        if not plan.items:
            return {}
        key = (task.record.task_id, plan.iteration)
        batch = _Batch(task_id=task.record.task_id, plan=plan, record=task.record,
                       done=asyncio.get_running_loop().create_future())
        planned = {item.id for item in plan.items}
        done = {i: r for i, r in (finished or {}).items() if i in planned and r.ok}
        batch.results.update(done)
        if len(done) == len(plan.items):
            return {item.id: batch.results[item.id] for item in plan.items}
        self.scheduler.add(key, plan.items, priority=PRIORITY_RANK[task.record.spec.priority],
                           done=done)
        self._batches[key] = batch
        self._wake.set()
        try:
            await batch.done
        finally:
            self._batches.pop(key, None)
            if key in self.scheduler:
                self.scheduler.drop(key)
        return {item.id: batch.results[item.id] for item in plan.items}

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            loop = asyncio.get_running_loop()
            while self.in_flight < self.capacity and (key := self.scheduler.best_key()) is not None:
                batch = self._batches.get(key)
                per = 1 if batch is None else batch.per_request(
                    self.scheduler.ready_count, self.capacity - self.in_flight)
                taken = self.scheduler.take_same(per)
                self.in_flight += 1
                if len(taken) == 1:
                    loop.create_task(self._dispatch(key, taken[0].item))
                else:
                    loop.create_task(self._dispatch_many(key, [r.item for r in taken]))

    async def _dispatch(self, key: Hashable, item: WorkItemSpec) -> None:
        holds_slot = True
        try:
            batch = self._batches.get(key)
            if batch is None:
                return
            if item.kind == "subtask":
                # A subtask's own items need the executors; waiting for it must not hold one.
                holds_slot = False
                self.in_flight -= 1
                self._wake.set()
                result = await self._subtask(batch, item)
                self.tasks[batch.task_id].artifacts.add_result(result)
            else:
                result = await self._attempts(batch, item)
        finally:
            if holds_slot:
                self.in_flight -= 1
            self._wake.set()
        await self._finished(key, batch, item, result)

    async def _dispatch_many(self, key: Hashable, items: list[WorkItemSpec]) -> None:
        """Several short items of one batch in one slot: the batchable ones in one
        request to one executor, the rest (and retries) one after the other."""
        batch = self._batches.get(key)
        done: list[tuple[WorkItemSpec, WorkItemResult]] = []
        try:
            if batch is None:
                return
            together = [i for i in items if i.kind in BATCHABLE_KINDS]
            results = await self._attempt_together(batch, together) if len(together) > 1 else {}
            for item in items:
                result = results.get(item.id)
                if result is not None and not result.ok and result.status not in (
                        "canceled", "resource_limit") and item.retries:
                    result = await self._attempts(batch, item, first=2)
                elif result is None:
                    result = await self._attempts(batch, item)
                done.append((item, result))
        finally:
            self.in_flight -= 1
            self._wake.set()
        for item, result in done:
            await self._finished(key, batch, item, result)

    async def _attempt_together(self, batch: _Batch, items: list[WorkItemSpec]) -> dict[str, WorkItemResult]:
        """First attempts of ``items`` as one WorkItemBatch to one idle executor of this
        hive; {} when there is none or the batch did not come back (each item is then
        sent on its own, with the same idempotency key)."""
        agent = self._pick_executor()
        if agent is None:
            return {}
        task = self.tasks[batch.task_id]
        assignments = [self._assignment(batch, item, 1, env={**batch.record.spec.env, **item.env},
                                        resources=self._resources(item)) for item in items]
        now = time.monotonic()
        for assignment in assignments:
            self._sent_at.setdefault(assignment.idempotency_key, now)
            await self._progress(task, batch.plan.iteration, "item_queued", item_id=assignment.item.id,
                                 attempt=1, done=len(batch.results), total=len(batch.plan.items))
        timeout = sum(a.item.timeout_s or self.config.default_timeout_s for a in assignments) + DISPATCH_SLACK_S
        key = f"batch:{assignments[0].idempotency_key}"
        request = asyncio.get_running_loop().create_task(self.bus.request(
            subjects.executor_batch(self._hive_id, agent), WorkItemBatch.model_construct(assignments=assignments),
            WorkItemResults, timeout=timeout))
        running = self._running[key] = _Running(request=request, epoch=self.bus.epoch, agent=agent,
                                                pid=self._heartbeats.get(agent, (0, 0.0))[0])
        try:
            reply = await request
        except asyncio.CancelledError:
            if not running.lost or _cancelled_from_outside():
                raise
            log.warning("executor lost with a batch; its items are sent one by one", agent=agent,
                        items=len(items), why=running.lost)
            return {}
        except (RequestRejected, TransportError) as exc:
            log.info("batch not taken; its items are sent one by one", agent=agent, error=str(exc))
            return {}
        finally:
            if self._running.get(key) is running:
                del self._running[key]
            self._release_executor(agent)
        wanted = {a.item.id for a in assignments}
        found = {r.item_id: r for r in reply.results if r.item_id in wanted and r.attempt == 1}
        for result in found.values():
            task.artifacts.add_result(result)
        return found

    async def _finished(self, key: Hashable, batch: _Batch | None, item: WorkItemSpec,
                        result: WorkItemResult) -> None:
        """What follows an item's end: its result recorded, progress, dependents freed."""
        if batch is None or self._batches.get(key) is not batch:
            return  # the task ended (canceled, deadline) while the item ran
        if item.kind in BATCHABLE_KINDS and result.status != "skipped":
            batch.item_s = result.duration_s if batch.item_s is None else 0.8 * batch.item_s + 0.2 * result.duration_s
        task = self.tasks[batch.task_id]
        batch.results[item.id] = result
        task.results.append(result)
        attempt_key = f"{result.task_id}:{result.iteration}:{result.item_id}:{result.attempt}"
        self._sent_at.pop(attempt_key, None)
        self.metrics.item_finished(result.status, self._latency.pop(attempt_key, None))
        if result.status == "resource_limit" and result.limit is not None:
            self.metrics.limit_killed(result.limit.limit)
        total = len(batch.plan.items)
        await self._progress(task, batch.plan.iteration, "item_finished", item_id=item.id,
                             status=result.status, attempt=result.attempt, agent_id=result.agent_id,
                             duration_s=result.duration_s, done=len(batch.results), total=total)
        for skipped_id in self.scheduler.finish(key, item.id, ok=result.ok):
            skipped = WorkItemResult(task_id=batch.task_id, iteration=batch.plan.iteration,
                                     item_id=skipped_id, status="skipped",
                                     error=f"skipped: a dependency of {skipped_id!r} did not succeed")
            batch.results[skipped_id] = skipped
            task.artifacts.add_result(skipped)
            await self._progress(task, batch.plan.iteration, "item_finished", item_id=skipped_id,
                                 status="skipped", done=len(batch.results), total=total)
        if self.scheduler.batch_done(key) and not batch.done.done():
            batch.done.set_result(None)
        self._wake.set()  # dependents may be ready now

    async def _subtask(self, batch: _Batch, item: WorkItemSpec) -> WorkItemResult:
        """Run a child task through the same pipeline; its end is this item's result."""
        parent = batch.record
        assert item.subtask is not None
        workdir = Path(item.subtask.workdir)
        if not workdir.is_absolute():
            workdir = Path(parent.workdir) / workdir
        spec = item.subtask.model_copy(update={"parent_task": parent.task_id, "workdir": str(workdir)})
        started = utcnow()
        try:
            child = await self.submit(spec)
        except RequestRejected as exc:
            return WorkItemResult(task_id=batch.task_id, iteration=batch.plan.iteration,
                                  item_id=item.id, status="error", error=f"subtask refused: {exc.message}")
        task = self.tasks[batch.task_id]
        await self._progress(task, batch.plan.iteration, "item_started", item_id=item.id,
                             agent_id=f"subtask {child.task_id}")
        try:
            record = await self.wait(child.task_id)
        except asyncio.CancelledError:
            await self.cancel(child.task_id)
            raise
        finished = utcnow()
        ok = record.state == TaskState.SUCCEEDED
        return WorkItemResult(
            task_id=batch.task_id, iteration=batch.plan.iteration, item_id=item.id,
            status="succeeded" if ok else "failed",
            error=None if ok else f"subtask {child.task_id} ended {record.state.value} ({record.exit_reason}): {record.message}",
            output={"task_id": child.task_id, "state": record.state.value,
                    "exit_reason": record.exit_reason, "report": record.report_path},
            evidence=[f"subtask {child.task_id}", f"state {record.state.value}",
                      f"iterations {record.iteration}"],
            started_at=started, finished_at=finished,
            duration_s=round((finished - started).total_seconds(), 3),
            agent_id="orchestrator",
        )

    def _resources(self, item: WorkItemSpec) -> ResourceSpec:
        pool = self.config.executor
        return ResourceSpec(
            cpu=item.resources.cpu or pool.cpu, memory_mb=item.resources.memory_mb or pool.memory_mb,
            cpu_seconds=item.resources.cpu_seconds, max_procs=item.resources.max_procs,
        )

    async def _attempts(self, batch: _Batch, item: WorkItemSpec, *, first: int = 1) -> WorkItemResult:
        task = self.tasks[batch.task_id]
        record = batch.record
        resources = self._resources(item)
        env = {**record.spec.env, **item.env}
        result: WorkItemResult | None = None
        for attempt in range(first, item.retries + 2):
            assignment = self._assignment(batch, item, attempt, env=env, resources=resources)
            kind = "item_queued" if attempt == 1 else "item_retried"
            await self._progress(task, batch.plan.iteration, kind, item_id=item.id, attempt=attempt,
                                 done=len(batch.results), total=len(batch.plan.items))
            result = await self._send(assignment)
            task.artifacts.add_result(result)
            if result.ok or result.status in ("canceled", "resource_limit"):
                break
        assert result is not None
        return result

    @staticmethod
    def _assignment(batch: _Batch, item: WorkItemSpec, attempt: int, *, env: dict[str, str],
                    resources: ResourceSpec) -> WorkItemAssignment:
        """One attempt of ``item``, built from parts that are validated already (the task
        record, the plan, ``env`` merged from the two, the resources): not validated again."""
        record = batch.record
        return WorkItemAssignment.model_construct(
            task_id=batch.task_id, iteration=batch.plan.iteration, attempt=attempt, item=item,
            workdir=record.workdir, env=env, resources=resources, failure=batch.plan.failure,
            llm=record.spec.planner,
        )

    async def _send(self, assignment: WorkItemAssignment) -> WorkItemResult:
        """One attempt on whichever executor is free; ``busy`` replies are retried at once.

        If the executor that took the attempt dies (its heartbeat stops, or Ray restarts it
        with a new pid), the attempt's stored result is used when there is one, and it is
        dispatched again otherwise (the same idempotency key: at least once). After a NATS
        reconnect the request is sent again as it was, since its reply may have been lost
        with the old connection (executors answer a repeated key once).
        """
        item_timeout = assignment.item.timeout_s or self.config.default_timeout_s
        timeout = 2 * item_timeout + DISPATCH_SLACK_S
        key = assignment.idempotency_key
        self._sent_at.setdefault(key, time.monotonic())
        backoff = 0.001
        patience = time.monotonic() + NO_EXECUTOR_PATIENCE_S
        agent: str | None = None
        again: _Running | None = None  # the request to send again as it was
        try:
            while True:
                if again is None:
                    agent = self._pick_executor()
                running = self._request(key, assignment, agent, timeout=timeout, like=again)
                again = None
                try:
                    return await running.request
                except asyncio.CancelledError:
                    if not running.lost or _cancelled_from_outside():
                        raise
                    if running.lost == "reconnect":
                        log.info("request sent again after a reconnect", key=key, epoch=self.bus.epoch)
                        again = running
                        continue
                    self._release_executor(agent)
                    agent = None
                    stored = await self._stored_result(assignment)
                    if stored is not None:
                        return stored
                    log.warning("executor lost; dispatching the item again", key=key, agent=running.agent)
                    continue
                except RequestRejected as exc:
                    if exc.code != "busy":
                        return self._error_result(assignment, exc.message)
                    if agent is not None:  # busy with someone else's work: offer it last
                        self._executors.remove(agent)
                        self._executors.append(agent)
                except TransportError as exc:
                    if not self.bus.nc.is_connected and await self._connected_again():
                        again = running
                        continue
                    if "nobody is serving" not in str(exc) or time.monotonic() > patience:
                        return self._error_result(assignment, str(exc))
                    if agent is not None:  # restarting: the queue group finds another
                        continue
                finally:
                    if self._running.get(key) is running:
                        del self._running[key]
                    if again is None:
                        self._release_executor(agent)
                        agent = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.05)
        finally:
            self._release_executor(agent)

    def _request(self, key: str, assignment: WorkItemAssignment, agent: str | None, *,
                 timeout: float, like: _Running | None) -> _Running:
        """Send one request for an attempt, to ``agent`` or to the queue group, and let the
        watchdog see it. ``like``: the same request sent before a reconnect."""
        subject = (subjects.EXECUTOR_RUN if agent is None
                   else subjects.executor_run(self._hive_id, agent))
        request = asyncio.get_running_loop().create_task(
            self.bus.request(subject, assignment, WorkItemResult, timeout=timeout))
        running = _Running(request=request, epoch=self.bus.epoch)
        if like is not None:
            running.agent, running.pid = like.agent, like.pid
        elif agent is not None:
            running.agent, running.pid = agent, self._heartbeats.get(agent, (0, 0.0))[0]
        self._running[key] = running
        return running

    async def _connected_again(self) -> bool:
        """Wait while NATS is away; False if it stays away longer than the bus retries."""
        deadline = time.monotonic() + RETRY_PATIENCE_S
        nc = self.bus.nc
        while not nc.is_connected:
            if nc.is_closed or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _pick_executor(self) -> str | None:
        """An executor of this hive that is neither working for us nor silent, taken."""
        now = time.monotonic()
        for agent in self._executors:
            beat = self._heartbeats.get(agent)
            if agent in self._assigned or (beat is not None and now - beat[1] > HEARTBEAT_TIMEOUT_S):
                continue
            self._assigned.add(agent)
            return agent
        return None

    def _release_executor(self, agent: str | None) -> None:
        if agent is not None:
            self._assigned.discard(agent)

    # -- the watchdog: one for every running attempt ------------------------------

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            self._check_attempts(time.monotonic())

    async def _resend_after_reconnects(self) -> None:
        while True:
            await self.bus.reconnected()
            self._check_attempts(time.monotonic())

    def _check_attempts(self, now: float) -> list[str]:
        """Cancel the request of every attempt whose executor stopped beating or came back
        with another pid, or that was sent before the last reconnect; its ``_send`` then
        decides what comes next. Returns their keys."""
        interrupted = []
        epoch = self.bus.epoch
        for key, running in self._running.items():
            if running.request.done():
                continue
            lost = ""
            if running.epoch != epoch:
                lost = "reconnect"
            elif running.agent is not None:
                beat = self._heartbeats.get(running.agent)
                if beat is not None and ((running.pid and beat[0] != running.pid)
                                         or now - beat[1] > HEARTBEAT_TIMEOUT_S):
                    lost = "executor"
            if lost and running.request.cancel():
                running.lost = lost
                interrupted.append(key)
        return interrupted

    async def _stored_result(self, assignment: WorkItemAssignment) -> WorkItemResult | None:
        """The result an executor stored for exactly this attempt, if any."""
        found = await self.bus.last_event(subjects.result(assignment.task_id, assignment.item.id))
        if found is None:
            return None
        try:
            result = decode(found[0], WorkItemResult, headers=found[1])
        except CodecError:
            return None
        if (result.iteration, result.attempt) == (assignment.iteration, assignment.attempt):
            return result
        return None

    async def _stored_results(self, task: _Task, iteration: int) -> dict[str, WorkItemResult]:
        """Every stored result of one iteration of a task: the latest attempt per item."""
        found: dict[str, WorkItemResult] = {}
        async for _, data, headers in self.bus.history(subjects.results(task.record.task_id)):
            try:
                result = decode(data, WorkItemResult, headers=headers)
            except CodecError:
                continue
            if result.iteration == iteration:
                found[result.item_id] = result
        for result in found.values():
            task.artifacts.add_result(result)
        return found

    @staticmethod
    def _error_result(assignment: WorkItemAssignment, message: str) -> WorkItemResult:
        return WorkItemResult(task_id=assignment.task_id, iteration=assignment.iteration,
                              item_id=assignment.item.id, attempt=assignment.attempt,
                              status="error", error=message)

    async def _stop_children(self, task: _Task) -> None:
        """Tell every executor to kill this task's running children, and forget its batches."""
        task_id = task.record.task_id
        for key in [k for k in self._batches if k[0] == task_id]:  # type: ignore[index]
            batch = self._batches.pop(key)
            self.scheduler.drop(key)
            if not batch.done.done():
                batch.done.cancel()
        await self.bus.emit(subjects.EXECUTOR_CANCEL, TaskRef(task_id=task_id))

    # -- the end of a task ------------------------------------------------------

    async def _finish(self, task: _Task, state: TaskState, exit_reason: ExitReason, message: str) -> None:
        """Terminal record, artifacts, report, audit trail; the completion event comes last."""
        if task.record.state.terminal:
            return
        record = transition(task.record, state, now=utcnow(), exit_reason=exit_reason, message=message)
        artifacts = task.artifacts
        await asyncio.to_thread(artifacts.ensure_all)  # what was written behind, too
        data = report_data(record, list(artifacts.latest.values()))
        report_json, report_md = artifacts.path("report.json"), artifacts.path("report.md")
        report_json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        report_md.write_text(render_markdown(data), encoding="utf-8")
        record = record.model_copy(update={"report_path": str(report_md)})
        await self._save(task, record)
        await self.bus.publish(subjects.report("generation", record.task_id), ReportEvent(
            task_id=record.task_id, kind="generation", path=str(report_md), formats=["md", "json"]))
        duration = (record.finished_at - (record.started_at or record.created_at)).total_seconds()  # type: ignore[operator]
        completion = CompletionEvent(
            task_id=record.task_id, state=record.state, exit_reason=exit_reason,
            iterations=record.iteration, duration_s=round(duration, 3), message=message,
            report_path=str(report_md),
        )
        await self.bus.settle()
        lines = [line async for line in self._audit_lines(record.task_id)]
        subject = subjects.completion(record.task_id)
        lines.append(json.dumps({"subject": subject, **completion.model_dump(mode="json")},
                                separators=(",", ":")))
        artifacts.write_events(lines)
        await self.bus.publish(subject, completion)
        log.info("task ended", task_id=record.task_id, state=state.value, exit_reason=exit_reason)

    async def _audit_lines(self, task_id: str):  # type: ignore[no-untyped-def]
        """The task's events as stored in HIVEBUS_EVENTS, one JSON line each, oldest first."""
        async for subject, body in self.bus.stored_events(subjects.task_events(task_id)):
            yield json.dumps({"subject": subject, **body}, separators=(",", ":"))


def _cancelled_from_outside() -> bool:
    """Whether the current task itself is being cancelled (not only a request it awaits)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


__all__ = ["Orchestrator", "new_task_id"]
