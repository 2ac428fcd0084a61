"""A task's artifacts folder: ``<state dir>/artifacts/<task_id>/``.

Every file name that comes from a user (work item ids) is checked to stay inside the
task's folder, on top of the schema's id pattern.

With ``write_behind_s``, files are written behind the task: the in-memory state changes
at once and a coalescing writer rewrites each changed file once per period, in a worker
thread (still write-then-rename), so that a result costs the orchestrator's event loop no
disk I/O. ``settle``/``flush`` write what is pending. Executors store every result in
JetStream too, so what a crash catches unwritten is read back when the task resumes.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import structlog

from schemas import GateResult, HivebusError, Plan, WorkItemResult

log = structlog.get_logger("hivebus.artifacts")

OPEN_PLAN = "open_plan.json"
WORK_ITEMS = "work_items.json"
GATE_RESULTS = "gate_results.json"


class UnsafePath(HivebusError):
    """A name that would leave the artifacts folder."""


def _dump(path: Path, data: Any) -> None:
    # Write then rename, so a reader (or a crash) never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class TaskArtifacts:
    """The files of one task, kept in memory as they grow and rewritten atomically.

    Without ``write_behind_s`` every change is written before the call returns. With it,
    changes are written at most ``write_behind_s`` later by a task of the running event
    loop; the owner calls ``settle`` (or ``flush``) before it relies on the files.
    """

    def __init__(self, root: Path, task_id: str, *, load: bool = False,
                 write_behind_s: float | None = None):
        self.dir = safe_child(root, task_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.plans: list[dict[str, Any]] = []
        self.items: list[dict[str, Any]] = []
        self.attempts: dict[str, list[dict[str, Any]]] = {}
        self.latest: dict[str, WorkItemResult] = {}
        self.gates: list[dict[str, Any]] = []
        self.write_behind_s = write_behind_s
        #: file name -> the work item it records (None: a file of the whole task), for
        #: every file whose newest content is not on disk yet.
        self._dirty: dict[str, str | None] = {}
        # The in-memory state is changed on the event loop and read by the writer thread;
        # flushes take turns, so that the newest snapshot of a file is the last one written.
        self._state = threading.Lock()
        self._writing = threading.Lock()
        self._writer: asyncio.Task[None] | None = None
        if load:
            self._load()

    def _load(self) -> None:
        """Pick up the files of a task that an earlier orchestrator was running."""
        def read(name: str, default: Any) -> Any:
            try:
                return json.loads(self.path(name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return default

        self.plans = read(OPEN_PLAN, [])
        self.items = read(WORK_ITEMS, [])
        self.gates = read(GATE_RESULTS, [])
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

    # -- changes ----------------------------------------------------------------------

    def add_plan(self, plan: Plan) -> None:
        dumped = plan.model_dump(mode="json")
        items = [{"iteration": plan.iteration, **item} for item in dumped["items"]]
        with self._state:
            self.plans.append(dumped)
            self.items.extend(items)
            self._mark(OPEN_PLAN)
            self._mark(WORK_ITEMS)
        self._changed()

    def add_result(self, result: WorkItemResult) -> None:
        entry = result.model_dump(mode="json")
        name = f"work_item_{result.item_id}.json"
        _plain_name(name)  # refused at once; the writer checks the path it writes again
        with self._state:
            history = self.attempts.setdefault(result.item_id, [])
            if entry in history:  # the same attempt recorded twice (a resumed task): once is enough
                return
            history.append(entry)
            self.latest[result.item_id] = result
            self._dirty[name] = result.item_id
        self._changed()

    def add_gates(self, results: list[GateResult]) -> None:
        dumped = [r.model_dump(mode="json") for r in results]
        with self._state:
            self.gates += dumped
            self._mark(GATE_RESULTS)
        self._changed()

    def _mark(self, name: str) -> None:
        self._dirty[name] = None

    def _changed(self) -> None:
        if self.write_behind_s is None:
            self.flush()
        elif self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_behind(self.write_behind_s))

    async def _write_behind(self, period_s: float) -> None:
        """Flush every ``period_s`` while there are changes; changes made meanwhile wait
        for the next flush, so a file that changes often is written once per period."""
        try:
            while self._dirty:
                await asyncio.sleep(period_s)
                await asyncio.to_thread(self.flush)
        except (OSError, UnsafePath) as exc:
            # The files stay pending: the next change, settle or ensure_all tries again
            # (and ensure_all, before the task's terminal record, raises).
            log.error("artifacts not written", dir=str(self.dir), error=str(exc))

    # -- writing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Write every pending file now (from any thread)."""
        with self._writing:
            with self._state:
                if not self._dirty:
                    return
                names = list(self._dirty.items())
                contents = [self._content(name, item_id) for name, item_id in names]
                self._dirty.clear()
            for done, ((name, _), data) in enumerate(zip(names, contents)):
                try:
                    _dump(self.path(name), data)
                except BaseException:
                    with self._state:  # what was not written stays pending
                        for name, item_id in names[done:]:
                            self._dirty.setdefault(name, item_id)
                    raise

    def _content(self, name: str, item_id: str | None) -> Any:
        """What file ``name`` holds now: fresh containers, so the writer may encode them
        while the state grows (the entries themselves never change)."""
        if item_id is not None:
            history = self.attempts[item_id]
            return {**history[-1], "attempts": len(history), "history": list(history)}
        if name == OPEN_PLAN:
            return list(self.plans)
        if name == WORK_ITEMS:
            return list(self.items)
        return list(self.gates)

    @property
    def pending(self) -> bool:
        """Whether some change is not on disk yet (or being written)."""
        return bool(self._dirty) or self._writing.locked()

    async def settle(self) -> None:
        """Return once every change made so far is on disk; the writing is done in a thread."""
        if self.pending:
            await asyncio.to_thread(self.flush)

    async def close(self) -> None:
        """Stop writing behind, after writing what is pending."""
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        await self.settle()

    def write_summary(self) -> dict[str, Any]:
        with self._state:
            results = list(self.latest.values())
            attempts = {r.item_id: len(self.attempts[r.item_id]) for r in results}
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
                    "attempts": attempts[r.item_id], "exit_code": r.exit_code,
                    "duration_s": r.duration_s, "peak_rss_mb": r.peak_rss_mb,
                    "cpu_seconds": r.cpu_seconds, "agent_id": r.agent_id,
                }
                for r in results
            ],
        }
        _dump(self.path("work_items_summary.json"), summary)
        return summary

    def write_events(self, lines: list[str]) -> None:
        tmp = self.path(".events.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path("events.jsonl"))

    def ensure_all(self) -> None:
        """Every artifact DESIGN.md lists is on disk and complete, even for a task that
        never ran an item: what is pending is written first (from any thread)."""
        with self._state:
            for name in (OPEN_PLAN, WORK_ITEMS, GATE_RESULTS):
                if name not in self._dirty and not self.path(name).exists():
                    self._mark(name)
        self.flush()
        self.write_summary()


def _plain_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePath(f"{name!r} is not a safe file name")


def safe_child(root: Path, name: str) -> Path:
    """``root / name``, refused if it would resolve outside ``root``."""
    _plain_name(name)
    path = root / name
    # A plain name resolves inside root unless it is a symlink: only then is the (costly,
    # one lstat per component) resolution needed.
    if os.path.islink(path) and path.resolve().parent != root.resolve():
        raise UnsafePath(f"{name!r} would leave {root}")
    return path


__all__ = ["TaskArtifacts", "safe_child", "UnsafePath"]
