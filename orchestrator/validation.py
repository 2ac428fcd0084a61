"""Checks of a task against the hive it is submitted to (beyond the schema's own rules)."""

from __future__ import annotations

from collections.abc import Sequence

from schemas import HiveConfig, TaskSpec, WorkItemSpec


def limit_problems(items: Sequence[WorkItemSpec], config: HiveConfig, *, field: str = "work_items") -> list[str]:
    """Each resource request above the executor pool's per-agent limit, as a sentence."""
    pool = config.executor
    problems = []
    for pos, item in enumerate(items):
        res = item.resources
        if res.cpu is not None and res.cpu > pool.cpu:
            problems.append(
                f"{field}[{pos}].resources.cpu: work item {item.id!r} asks for {res.cpu:g} CPU; "
                f"an executor may use at most {pool.cpu:g}"
            )
        if res.memory_mb is not None and res.memory_mb > pool.memory_mb:
            problems.append(
                f"{field}[{pos}].resources.memory_mb: work item {item.id!r} asks for "
                f"{res.memory_mb} MB; an executor may use at most {pool.memory_mb} MB"
            )
    return problems


def task_problems(spec: TaskSpec, config: HiveConfig) -> list[str]:
    return (limit_problems(spec.work_items, config)
            + limit_problems(spec.on_gate_failure, config, field="on_gate_failure"))


__all__ = ["limit_problems", "task_problems"]
