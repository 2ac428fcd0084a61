"""The DAG scheduler: hands out ready work items across the batches of many tasks.

A batch is the work items of one iteration of one task. Pure and single-threaded:
the caller sends what ``take`` returns to executors and reports back with ``finish``.
Every operation costs O(log n) per item it touches, so a batch of n items drains in
O(n log n): in-degree counters and adjacency lists find newly ready items, and one
heap orders them across batches.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from schemas import HivebusError, WorkItemSpec, dag_problems

ItemState = Literal["pending", "ready", "running", "succeeded", "failed", "skipped"]

#: Dropped batches leave stale heap entries behind; past this many (and half the
#: heap) the heap is rebuilt so that memory follows the live work.
_COMPACT_AFTER = 1024


class PlanError(HivebusError):
    """A batch the scheduler refuses (duplicate ids, unknown dependencies, a cycle)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the plan cannot be scheduled:\n{lines}")


@dataclass(frozen=True)
class Ready:
    """A work item whose dependencies all succeeded, handed out and now running."""

    key: Hashable
    item: WorkItemSpec
    priority: int


class _Batch:
    __slots__ = ("seq", "priority", "items", "index", "state", "waiting", "dependents",
                 "ready", "running", "open")

    def __init__(self, seq: int, priority: int, items: Sequence[WorkItemSpec]):
        n = len(items)
        self.seq = seq
        self.priority = priority
        self.items = list(items)
        self.index = {item.id: pos for pos, item in enumerate(items)}
        self.state: list[ItemState] = ["pending"] * n
        self.waiting = [0] * n  # dependencies not yet succeeded
        self.dependents: list[list[int]] = [[] for _ in range(n)]
        self.ready = 0
        self.running = 0
        self.open = 0  # pending + ready + running


class Scheduler:
    """Ready work items of many batches, highest priority first, then in add order,
    then in plan order."""

    def __init__(self) -> None:
        self._batches: dict[Hashable, _Batch] = {}
        self._dropped: set[Hashable] = set()
        # Entries are (-priority, batch seq, position, key); seq and position are
        # unique, so keys (which need not be comparable) are never compared.
        self._heap: list[tuple[int, int, int, Hashable]] = []
        self._stale = 0
        self._seq = itertools.count()
        self._ready = 0
        self._running = 0

    def add(self, key: Hashable, items: Sequence[WorkItemSpec], *, priority: int = 1,
            done: Iterable[str] = ()) -> None:
        """Schedule a batch; raise PlanError if it is not a DAG or ``key`` is taken.

        ``priority`` is a ``schemas.PRIORITY_RANK`` value (larger is more urgent).
        Ids in ``done`` already succeeded (a run recovered after a crash): they are not
        handed out again, and ``depends_on`` may name them even outside ``items``.
        """
        if key in self._batches:
            raise PlanError([f"batch {key!r} is already scheduled"])
        succeeded = set(done)
        problems = dag_problems(items, known=succeeded)
        if problems:
            raise PlanError(problems)
        batch = _Batch(next(self._seq), priority, items)
        for pos, item in enumerate(batch.items):
            if item.id in succeeded:
                batch.state[pos] = "succeeded"
                continue
            batch.open += 1
            for dep in dict.fromkeys(item.depends_on):  # a repeated dependency counts once
                dep_pos = batch.index.get(dep)
                if dep_pos is not None and dep not in succeeded:
                    batch.dependents[dep_pos].append(pos)
                    batch.waiting[pos] += 1
        self._batches[key] = batch
        self._dropped.discard(key)
        for pos in range(len(batch.items)):
            if batch.state[pos] == "pending" and batch.waiting[pos] == 0:
                self._make_ready(key, batch, pos)

    def take(self, limit: int) -> list[Ready]:
        """Up to ``limit`` ready items, best first, each marked running."""
        taken: list[Ready] = []
        while len(taken) < limit and (key := self.best_key()) is not None:
            taken.append(self._take_best(key))
        return taken

    def take_same(self, limit: int) -> list[Ready]:
        """Up to ``limit`` ready items of the batch that has the best one, best first,
        each marked running: what one request to one executor may carry."""
        first = self.best_key()
        taken: list[Ready] = []
        while len(taken) < limit and first is not None and self.best_key() == first:
            taken.append(self._take_best(first))
        return taken

    def best_key(self) -> Hashable | None:
        """The batch of the item ``take`` would hand out next (None: nothing is ready)."""
        while self._heap:
            _, seq, _, key = self._heap[0]
            batch = self._batches.get(key)
            if batch is not None and batch.seq == seq:
                return key
            heapq.heappop(self._heap)
            self._stale -= 1
        return None

    def _take_best(self, key: Hashable) -> Ready:
        _, _, pos, _ = heapq.heappop(self._heap)
        batch = self._batches[key]
        batch.state[pos] = "running"
        batch.ready -= 1
        batch.running += 1
        self._ready -= 1
        self._running += 1
        return Ready(key, batch.items[pos], batch.priority)

    def finish(self, key: Hashable, item_id: str, *, ok: bool) -> list[str]:
        """Record that a running item ended; return the ids this skipped, in plan order.

        Success makes ready every dependent whose dependencies have all succeeded.
        Failure skips every transitive dependent. A batch that was dropped ignores
        late reports (returns []); an unknown batch or item raises KeyError, an item
        that is not running raises ValueError.
        """
        batch = self._batches.get(key)
        if batch is None:
            if key in self._dropped:
                return []
            raise KeyError(f"no batch {key!r} is scheduled")
        pos = batch.index.get(item_id)
        if pos is None:
            raise KeyError(f"batch {key!r} has no work item {item_id!r}")
        if batch.state[pos] != "running":
            raise ValueError(
                f"work item {item_id!r} of batch {key!r} is {batch.state[pos]}, not running"
            )
        batch.running -= 1
        batch.open -= 1
        self._running -= 1
        if ok:
            batch.state[pos] = "succeeded"
            for child in batch.dependents[pos]:
                batch.waiting[child] -= 1
                if batch.waiting[child] == 0 and batch.state[child] == "pending":
                    self._make_ready(key, batch, child)
            return []
        batch.state[pos] = "failed"
        skipped: list[int] = []
        stack = [pos]
        while stack:
            for child in batch.dependents[stack.pop()]:
                # Dependents of an unfinished item are pending; skipped ones were
                # reached through another failure and their dependents with them.
                if batch.state[child] == "pending":
                    batch.state[child] = "skipped"
                    batch.open -= 1
                    skipped.append(child)
                    stack.append(child)
        return [batch.items[p].id for p in sorted(skipped)]

    def outcome(self, key: Hashable) -> dict[str, ItemState]:
        """The state of every item of a batch, by id, in plan order."""
        batch = self._batches[key]
        return {item.id: state for item, state in zip(batch.items, batch.state)}

    def batch_done(self, key: Hashable) -> bool:
        """True when no item of the batch is pending, ready or running."""
        return self._batches[key].open == 0

    def drop(self, key: Hashable) -> list[str]:
        """Forget a batch (its task was canceled); return the ids that were running.

        Its items are never handed out again and later ``finish`` calls for it are
        ignored. Dropping a batch that is not scheduled returns [].
        """
        batch = self._batches.pop(key, None)
        if batch is None:
            return []
        self._dropped.add(key)
        self._ready -= batch.ready
        self._running -= batch.running
        self._stale += batch.ready
        if self._stale > _COMPACT_AFTER and 2 * self._stale > len(self._heap):
            self._heap = [e for e in self._heap
                          if (b := self._batches.get(e[3])) is not None and b.seq == e[1]]
            heapq.heapify(self._heap)
            self._stale = 0
        return [item.id for item, state in zip(batch.items, batch.state)
                if state == "running"]

    @property
    def ready_count(self) -> int:
        """Items of all batches whose dependencies succeeded and that wait for ``take``."""
        return self._ready

    @property
    def running_count(self) -> int:
        """Items handed out by ``take`` and not yet finished."""
        return self._running

    def __contains__(self, key: object) -> bool:
        return key in self._batches

    def _make_ready(self, key: Hashable, batch: _Batch, pos: int) -> None:
        batch.state[pos] = "ready"
        batch.ready += 1
        self._ready += 1
        heapq.heappush(self._heap, (-batch.priority, batch.seq, pos, key))


__all__ = ["Scheduler", "Ready", "PlanError", "ItemState"]
