"""Configuration of a hive: agent pools, limits, where NATS and state live."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import Model

Role = Literal["planner", "executor", "verifier", "resources"]


class PoolConfig(Model):
    """One agent pool: how many agents, and what each may use (enforced, not only scheduled)."""

    replicas: Annotated[int, Field(ge=1, le=256)] = 1
    cpu: Annotated[float, Field(gt=0, le=1024)] = 1.0
    memory_mb: Annotated[int, Field(ge=64)] = 1024
    #: Ray custom resources each agent of the pool needs, e.g. {"big": 1} pins the pool
    #: to nodes started with ``ray start --resources '{"big": 4}'``.
    resources: dict[str, float] = Field(default_factory=dict)


class HiveConfig(Model):
    """Everything a hive needs to start; every field has a laptop-sized default."""

    planner: PoolConfig = Field(default_factory=lambda: PoolConfig(replicas=1))
    executor: PoolConfig = Field(default_factory=lambda: PoolConfig(replicas=2))
    verifier: PoolConfig = Field(default_factory=lambda: PoolConfig(replicas=1))
    total_cpu: Annotated[float, Field(gt=0)] = 8.0
    total_memory_mb: Annotated[int, Field(gt=0)] = 16 * 1024
    #: Used for items and gates that set no ``timeout_s``.
    default_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    #: Ray ``num_cpus`` of the small always-on agents (resource manager).
    service_cpu: Annotated[float, Field(ge=0)] = 0.1

    def pool(self, role: Role) -> PoolConfig:
        if role == "resources":
            return PoolConfig(replicas=1, cpu=self.service_cpu or 0.1, memory_mb=256)
        return getattr(self, role)


class AgentSettings(Model):
    """What an agent is given when it starts: who it is and where the bus is."""

    role: Role
    agent_id: str
    #: One hive's run: an agent restarted by Ray sweeps up what its predecessor in the
    #: same hive left behind, never what an agent of the same name in another hive runs.
    hive_id: str = ""
    nats_url: str
    pool: PoolConfig
    hive: HiveConfig = Field(default_factory=HiveConfig)
    state_dir: str
