"""Start and stop the hive's agents as named Ray actors in namespace ``hivebus``."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import ray

from bus.auth import NatsAuth
from schemas import AgentSettings, HiveConfig, HivebusError

from .hosts import HOSTS

NAMESPACE = "hivebus"
MiB = 1024 * 1024


class AgentStartError(HivebusError):
    """An agent could not be placed or did not come up."""


def fit_to_cluster(config: HiveConfig) -> HiveConfig:
    """The config with its totals lowered to what the Ray cluster reports, never raised."""
    cluster = ray.cluster_resources()
    cpu = cluster.get("CPU")
    memory_mb = int(cluster.get("memory", 0) / MiB) or None
    update: dict[str, Any] = {}
    if cpu is not None and config.total_cpu > cpu:
        update["total_cpu"] = float(cpu)
    if memory_mb is not None and config.total_memory_mb > memory_mb:
        update["total_memory_mb"] = memory_mb
    return config.model_copy(update=update) if update else config


def agent_names(config: HiveConfig) -> list[tuple[str, str]]:
    """(role, agent_id) of every agent the config asks for: planner-1.., executor-1.., resources."""
    names = [("resources", "resources")]
    for role in ("planner", "executor", "verifier"):
        names += [(role, f"{role}-{i}") for i in range(1, config.pool(role).replicas + 1)]  # type: ignore[arg-type]
    return names


class AgentPool:
    """The agents of one hive. Ray restarts a crashed agent; ``stop`` ends them for good."""

    def __init__(self, *, config: HiveConfig, nats_url: str, state_dir: str,
                 auth: NatsAuth | None = None):
        self.config = config
        self.nats_url = nats_url
        self.auth = auth
        self.hive_id = uuid.uuid4().hex[:12]
        self.state_dir = state_dir
        self.actors: dict[str, Any] = {}
        self.info: dict[str, dict[str, Any]] = {}

    def _spawn(self) -> list[Any]:
        refs = []
        for role, agent_id in agent_names(self.config):
            pool = self.config.pool(role)  # type: ignore[arg-type]
            try:
                ray.get_actor(agent_id, namespace=NAMESPACE)
            except ValueError:
                pass
            else:
                raise AgentStartError(
                    f"an actor named {agent_id!r} already lives in Ray namespace {NAMESPACE!r}: "
                    "another hive runs on this Ray cluster; stop it first"
                )
            settings = AgentSettings(role=role, agent_id=agent_id, hive_id=self.hive_id,  # type: ignore[arg-type]
                                     nats_url=self.nats_url,
                                     pool=pool, hive=self.config, state_dir=self.state_dir)
            actor = ray.remote(HOSTS[role]).options(  # type: ignore[call-overload]
                name=agent_id, namespace=NAMESPACE, num_cpus=pool.cpu,
                memory=pool.memory_mb * MiB, resources=pool.resources or None,
                max_restarts=-1, max_task_retries=0, max_concurrency=1000,
            ).remote(settings, self.auth)
            self.actors[agent_id] = actor
            refs.append(actor.ready.remote())
        return refs

    def start(self, *, timeout_s: float = 120.0) -> None:
        """Create every agent and wait until each serves its subject."""
        refs = self._spawn()
        try:
            for info in ray.get(refs, timeout=timeout_s):
                self.info[info["agent_id"]] = info
        except (ray.exceptions.RayError, TimeoutError) as exc:
            self.stop()
            raise AgentStartError(f"agents did not start: {exc}") from None

    async def start_async(self, *, timeout_s: float = 120.0) -> None:
        refs = self._spawn()
        try:
            infos = await asyncio.wait_for(asyncio.gather(*refs), timeout=timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            self.stop()
            raise AgentStartError(f"agents did not start: {exc}") from None
        for info in infos:
            self.info[info["agent_id"]] = info

    async def stop_async(self, *, timeout_s: float = 5.0) -> None:
        """Ask every agent to stop (executors kill their children), then kill them."""
        refs = [actor.stop.remote() for actor in self.actors.values()]
        if refs:
            try:
                await asyncio.wait_for(asyncio.gather(*refs, return_exceptions=True), timeout_s)
            except asyncio.TimeoutError:
                pass  # killed below either way
        self.stop()

    def stop(self) -> None:
        """Kill every agent (no restart). Their work item children die with them."""
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except (ValueError, ray.exceptions.RayError):
                pass  # already gone
        self.actors.clear()


__all__ = ["AgentPool", "AgentStartError", "agent_names", "fit_to_cluster", "NAMESPACE"]
