"""The Hive: start (or connect to) NATS, Ray, the agents and the orchestrator, and use them.

``AsyncHive`` is the asyncio API; ``Hive`` is its synchronous twin for driver scripts::

    from orchestrator import Hive
    with Hive.start() as hive:
        record = hive.run(spec)
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import ray
import structlog

from actors import NAMESPACE, AgentPool, agent_names, fit_to_cluster
from actors.policy import Policy
from bus import Bus, EmbeddedNats, subjects
from bus.auth import NatsAuth, load_role
from schemas import (
    CompletionEvent,
    HiveConfig,
    ResourceSnapshot,
    SnapshotRequest,
    TaskAccepted,
    TaskList,
    TaskQuery,
    TaskRecord,
    TaskRef,
    TaskSpec,
    TaskState,
    load_task_file,
)

from .metrics import hive_metrics
from .service import Orchestrator

log = structlog.get_logger("hivebus.hive")
T = TypeVar("T")
MiB = 1024 * 1024


def default_state_dir() -> Path:
    return Path(os.environ.get("HIVEBUS_STATE_DIR") or ".hivebus").resolve()


def as_spec(task: TaskSpec | dict[str, Any] | str | Path) -> TaskSpec:
    """A TaskSpec from a model, a dict, or the path of a task file."""
    if isinstance(task, TaskSpec):
        return task
    if isinstance(task, dict):
        return TaskSpec.model_validate(task)
    return load_task_file(task)


def init_ray(config: HiveConfig, ray_address: str | None) -> bool:
    """Start or join Ray in namespace ``hivebus``; True when this process started it."""
    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        return False
    # Logical CPUs: every agent must be placeable even on a 2-core laptop; the limits
    # that protect the machine are enforced on the work items themselves.
    needed = sum(config.pool(r).cpu * config.pool(r).replicas  # type: ignore[arg-type]
                 for r in ("planner", "executor", "verifier", "resources"))
    ray.init(
        namespace=NAMESPACE, num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=False, log_to_driver=False, object_store_memory=128 * MiB,
        configure_logging=False,
    )
    return True


class AsyncHive:
    """A running hive (``start``) or a client of one (``connect``)."""

    def __init__(self, *, bus: Bus, state_dir: Path, orchestrator: Orchestrator | None = None,
                 pool: AgentPool | None = None, nats: EmbeddedNats | None = None,
                 owns_ray: bool = False):
        self.bus = bus
        self.state_dir = state_dir
        self.orchestrator = orchestrator
        self.pool = pool
        self.nats = nats
        self.owns_ray = owns_ray

    @property
    def nats_url(self) -> str:
        return self.nats.url if self.nats else self.bus.url

    @classmethod
    async def start(cls, *, config: HiveConfig | None = None, state_dir: str | Path | None = None,
                    nats_url: str | None = None, ray_address: str | None = None,
                    workdir_root: str | Path | None = None, owns_ray: bool | None = None,
                    nats_auth: NatsAuth | None = None, agent_auth: NatsAuth | None = None,
                    policy: Policy | None | str = "local") -> AsyncHive:
        """Start what is not given: an embedded nats-server, a local Ray, the agents, the orchestrator.

        The embedded server requires credentials, generated into ``<state_dir>/auth``: the
        orchestrator connects as ``orchestrator``, the agents as ``agent``. With ``nats_url``,
        ``nats_auth`` is what both present (``agent_auth``, if given, is the agents' own).

        ``policy`` is the execution policy every plan must pass: a Policy, or ``"local"``
        (the default: workdirs inside ``workdir_root`` or the current directory, and the
        commands a developer expects), or None for no check.
        """
        config = config or HiveConfig()
        state = Path(state_dir).resolve() if state_dir else default_state_dir()
        state.mkdir(parents=True, exist_ok=True)
        nats = None
        bus = orchestrator = pool = None
        started_ray = False
        try:
            if not nats_url:
                nats = EmbeddedNats(state)
                nats_url = nats.start()
                nats_auth, agent_auth = nats.credentials("orchestrator"), nats.credentials("agent")
            started_ray = init_ray(config, ray_address) if owns_ray is None else owns_ray
            config = fit_to_cluster(config)
            metrics = hive_metrics()
            bus = await Bus.connect(nats_url, name="hivebus-orchestrator", auth=nats_auth)
            root = Path(workdir_root).resolve() if workdir_root else Path.cwd()
            if policy == "local":
                policy = Policy.local(root)
            orchestrator = Orchestrator(bus=bus, config=config, state_dir=state, workdir_root=root,
                                        policy=policy, metrics=metrics)  # type: ignore[arg-type]
            await orchestrator.start()
            pool = AgentPool(config=config, nats_url=nats_url, state_dir=str(state),
                             auth=agent_auth or nats_auth)
            await pool.start_async()
            orchestrator.use_executors(pool.hive_id, [a for r, a in agent_names(config) if r == "executor"])
            await orchestrator.resume()
        except BaseException:
            await _close(orchestrator, pool, bus, nats, started_ray)
            raise
        # Everything allocated so far (Ray, pydantic, nats) lives as long as the hive: keep
        # it out of the collector's full passes, whose cost otherwise grows with big plans.
        gc.freeze()
        return cls(bus=bus, state_dir=state, orchestrator=orchestrator, pool=pool, nats=nats,
                   owns_ray=started_ray)

    @classmethod
    async def connect(cls, nats_url: str, ray_address: str | None = None, *,
                      state_dir: str | Path | None = None, auth: NatsAuth | None = None) -> AsyncHive:
        """A client of a hive that runs elsewhere (``hivebus up``); talks NATS only.

        Without ``auth`` it presents the ``client`` credentials of the state dir's embedded
        server, if there are any. With ``ray_address`` it also joins that Ray cluster.
        """
        state = Path(state_dir).resolve() if state_dir else default_state_dir()
        if ray_address and not ray.is_initialized():
            ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False)
        bus = await Bus.connect(nats_url, name="hivebus-client", auth=auth or load_role(state, "client"))
        return cls(bus=bus, state_dir=state)

    async def close(self) -> None:
        """Stop everything this hive started; a client only disconnects."""
        orchestrator, pool, nats = self.orchestrator, self.pool, self.nats
        self.orchestrator = self.pool = self.nats = None
        await _close(orchestrator, pool, self.bus, nats, self.owns_ray)
        self.owns_ray = False

    async def __aenter__(self) -> AsyncHive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- tasks ----------------------------------------------------------------------

    async def submit(self, task: TaskSpec | dict[str, Any] | str | Path) -> str:
        reply = await self.bus.request(subjects.TASK_SUBMIT, as_spec(task), TaskAccepted)
        return reply.task_id

    async def get(self, task_id: str) -> TaskRecord:
        return await self.bus.request(subjects.TASK_GET, TaskRef(task_id=task_id), TaskRecord)

    async def list(self, state: TaskState | str | None = None) -> list[TaskRecord]:
        query = TaskQuery(state=TaskState(state) if state else None)
        return (await self.bus.request(subjects.TASK_LIST, query, TaskList)).tasks

    async def cancel(self, task_id: str) -> TaskRecord:
        return await self.bus.request(subjects.TASK_CANCEL, TaskRef(task_id=task_id), TaskRecord,
                                      timeout=20)

    async def approve(self, task_id: str) -> TaskRecord:
        return await self.bus.request(subjects.TASK_APPROVE, TaskRef(task_id=task_id), TaskRecord)

    async def resources(self) -> ResourceSnapshot:
        """Limits, current leases and the latest usage sample of every agent."""
        return await self.bus.request(subjects.RESOURCES_SNAPSHOT, SnapshotRequest(), ResourceSnapshot)

    async def wait(self, task_id: str, *, timeout: float | None = None) -> TaskRecord:
        """Wait for the task's completion event (sent after its artifacts are written)."""
        done = asyncio.get_running_loop().create_future()

        async def on_completion(_: CompletionEvent) -> None:
            if not done.done():
                done.set_result(None)

        sub = await self.bus.subscribe(subjects.completion(task_id), CompletionEvent, on_completion)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            # The live event is the fast path; the stored one covers an event that went by
            # while this client was reconnecting.
            while not done.done() and not await self._completed(task_id):
                left = 1.0 if deadline is None else min(1.0, deadline - asyncio.get_running_loop().time())
                if left <= 0:
                    raise asyncio.TimeoutError(f"task {task_id} did not end within {timeout:g} s")
                await asyncio.wait({done}, timeout=left)
            return await self.bus.call(subjects.TASK_GET, TaskRef(task_id=task_id), TaskRecord)
        finally:
            await sub.unsubscribe()

    async def _completed(self, task_id: str) -> bool:
        return await self.bus.last_event(subjects.completion(task_id)) is not None

    async def run(self, task: TaskSpec | dict[str, Any] | str | Path, *,
                  timeout: float | None = None) -> TaskRecord:
        """Submit a task and wait for its end."""
        return await self.wait(await self.submit(task), timeout=timeout)


async def _close(orchestrator: Orchestrator | None, pool: AgentPool | None, bus: Bus | None,
                 nats: EmbeddedNats | None, owns_ray: bool) -> None:
    # Order matters: agents first (their children die with them), then the service,
    # the connection, Ray and finally the server everyone was talking through.
    try:
        if pool is not None:
            await pool.stop_async()
        if orchestrator is not None:
            await orchestrator.stop()
        if bus is not None:
            await bus.close()
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        if nats is not None:
            nats.stop()


class Hive:
    """Synchronous twin of AsyncHive; runs the hive's event loop in a background thread."""

    def __init__(self, inner: AsyncHive, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self._inner = inner
        self._loop = loop
        self._thread = thread

    @classmethod
    def start(cls, **kwargs: Any) -> Hive:
        """Same arguments as AsyncHive.start."""
        config = kwargs.get("config") or HiveConfig()
        # ray.init belongs on the caller's (main) thread, where it may install signal handlers.
        owns_ray = init_ray(config, kwargs.get("ray_address"))
        loop, thread = _loop_thread()
        try:
            inner = _call(loop, AsyncHive.start(**kwargs, owns_ray=owns_ray))
        except BaseException:
            if owns_ray:
                ray.shutdown()
            _stop_loop(loop, thread)
            raise
        return cls(inner, loop, thread)

    @classmethod
    def connect(cls, nats_url: str, ray_address: str | None = None, **kwargs: Any) -> Hive:
        loop, thread = _loop_thread()
        try:
            inner = _call(loop, AsyncHive.connect(nats_url, ray_address, **kwargs))
        except BaseException:
            _stop_loop(loop, thread)
            raise
        return cls(inner, loop, thread)

    @property
    def nats_url(self) -> str:
        return self._inner.nats_url

    @property
    def state_dir(self) -> Path:
        return self._inner.state_dir

    def submit(self, task: TaskSpec | dict[str, Any] | str | Path) -> str:
        return _call(self._loop, self._inner.submit(task))

    def get(self, task_id: str) -> TaskRecord:
        return _call(self._loop, self._inner.get(task_id))

    def list(self, state: TaskState | str | None = None) -> list[TaskRecord]:
        return _call(self._loop, self._inner.list(state))

    def cancel(self, task_id: str) -> TaskRecord:
        return _call(self._loop, self._inner.cancel(task_id))

    def approve(self, task_id: str) -> TaskRecord:
        return _call(self._loop, self._inner.approve(task_id))

    def resources(self) -> ResourceSnapshot:
        return _call(self._loop, self._inner.resources())

    def wait(self, task_id: str, *, timeout: float | None = None) -> TaskRecord:
        return _call(self._loop, self._inner.wait(task_id, timeout=timeout))

    def run(self, task: TaskSpec | dict[str, Any] | str | Path, *, timeout: float | None = None) -> TaskRecord:
        return _call(self._loop, self._inner.run(task, timeout=timeout))

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                _call(self._loop, self._inner.close())
            finally:
                if self._inner.owns_ray and ray.is_initialized():
                    ray.shutdown()
                _stop_loop(self._loop, self._thread)

    def __enter__(self) -> Hive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hivebus-loop", daemon=True)
    thread.start()
    return loop, thread


def _call(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    future: Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()
        raise


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


__all__ = ["AsyncHive", "Hive", "as_spec", "init_ray", "default_state_dir"]
