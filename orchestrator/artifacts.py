"""A task's artifacts folder: ``<state dir>/artifacts/<task_id>/``.

Every file name that comes from a user (work item ids) is checked to stay inside the
task's folder, on top of the schema's id pattern.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from schemas import GateResult, HivebusError, Plan, WorkItemResult


class UnsafePath(HivebusError):
    """A name that would leave the artifacts folder."""


def _dump(path: Path, data: Any) -> None:
    # Write then rename, so a reader (or a crash) never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class TaskArtifacts:
    """The files of one task, kept in memory as they grow and rewritten atomically."""

    def __init__(self, root: Path, task_id: str, *, load: bool = False):
        self.dir = safe_child(root, task_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plans: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        self.attempts: dict[str, list[dict[str, Any]]] = {}
        self.latest: dict[str, WorkItemResult] = {}
        self.gates: list[dict[str, Any]] = []
        if load:
            self._load()

    def _load(self) -> None:
        """Pick up the files of a task that an earlier orchestrator was running."""
        def read(name: str, default: Any) -> Any:
            try:
                return json.loads(self.path(name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return default

        self.plans = read("open_plan.json", [])
        self.items = read("work_items.json", [])
        self.gates = read("gate_results.json", [])
        for path in self.dir.glob("work_item_*.json"):
            record = read(path.name, None)
            if not isinstance(record, dict) or "history" not in record:
                continue
            self.attempts[record["item_id"]] = record["history"]
            self.latest[record["item_id"]] = WorkItemResult.model_validate(record["history"][-1])

    def has_plan(self, iteration: int) -> bool:
        return any(plan.get("iteration") == iteration for plan in self.plans)

    def path(self, name: str) -> Path:
        return safe_child(self.dir, name)

    def add_plan(self, plan: Plan) -> None:
        self.plans.append(plan.model_dump(mode="json"))
        _dump(self.path("open_plan.json"), self.plans)
        for item in plan.items:
            self.items.append({"iteration": plan.iteration, **item.model_dump(mode="json")})
        _dump(self.path("work_items.json"), self.items)

    def add_result(self, result: WorkItemResult) -> None:
        history = self.attempts.setdefault(result.item_id, [])
        entry = result.model_dump(mode="json")
        if entry in history:  # the same attempt recorded twice (a resumed task): once is enough
            return
        history.append(entry)
        self.latest[result.item_id] = result
        record = {
            **result.model_dump(mode="json"),
            "attempts": len(self.attempts[result.item_id]),
            "history": self.attempts[result.item_id],
        }
        _dump(self.path(f"work_item_{result.item_id}.json"), record)

    def write_summary(self) -> dict[str, Any]:
        results = list(self.latest.values())
        by_status: dict[str, int] = {}
        for result in results:
            by_status[result.status] = by_status.get(result.status, 0) + 1
        summary = {
            "items": len(results),
            "by_status": by_status,
            "total_duration_s": round(sum(r.duration_s for r in results), 3),
            "total_cpu_seconds": round(sum(r.cpu_seconds for r in results), 3),
            "max_peak_rss_mb": round(max((r.peak_rss_mb for r in results), default=0.0), 1),
            "work_items": [
                {
                    "id": r.item_id, "iteration": r.iteration, "status": r.status,
                    "attempts": len(self.attempts[r.item_id]), "exit_code": r.exit_code,
                    "duration_s": r.duration_s, "peak_rss_mb": r.peak_rss_mb,
                    "cpu_seconds": r.cpu_seconds, "agent_id": r.agent_id,
                }
                for r in results
            ],
        }
        _dump(self.path("work_items_summary.json"), summary)
        return summary

    def add_gates(self, results: list[GateResult]) -> None:
        self.gates += [r.model_dump(mode="json") for r in results]
        _dump(self.path("gate_results.json"), self.gates)

    def write_events(self, lines: list[str]) -> None:
        tmp = self.path(".events.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path("events.jsonl"))

    def ensure_all(self) -> None:
        """Every artifact DESIGN.md lists exists, even for a task that never ran an item."""
        if not self.path("open_plan.json").exists():
            _dump(self.path("open_plan.json"), self.plans)
        if not self.path("work_items.json").exists():
            _dump(self.path("work_items.json"), self.items)
        if not self.path("gate_results.json").exists():
            _dump(self.path("gate_results.json"), self.gates)
        self.write_summary()


def safe_child(root: Path, name: str) -> Path:
    """``root / name``, refused if it would resolve outside ``root``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePath(f"{name!r} is not a safe file name")
    path = (root / name).resolve()
    if path.parent != root.resolve():
        raise UnsafePath(f"{name!r} would leave {root}")
    return root / name


__all__ = ["TaskArtifacts", "safe_child", "UnsafePath"]
