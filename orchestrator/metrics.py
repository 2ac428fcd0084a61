"""The hive's metrics, recorded through ``ray.util.metrics``.

Ray exports them in Prometheus text format from the metrics agent of the node where
they are recorded: the orchestrator records them in the process that runs the hive
(for ``ray job submit -- hivebus up``, the job's driver on the head). The agent listens
on ``ray start --metrics-export-port`` (random when not given; ``ray.nodes()`` reports it
as ``MetricsExportPort``), at ``http://NODE:PORT/metrics``. Ray prefixes every
application metric with ``ray_`` (and appends ``_total`` to a counter whose name lacks it):

========================================  ==========  ===================================
exported name                             type        tags (besides Ray's own)
========================================  ==========  ===================================
``ray_hivebus_tasks``                     gauge       ``state``: tasks now in that state
``ray_hivebus_task_transitions_total``    counter     ``state``: tasks that entered it
``ray_hivebus_items_completed_total``     counter
``ray_hivebus_items_failed_total``        counter     ``status``: failed, timeout, ...
``ray_hivebus_dispatch_latency_seconds``  histogram   (``_bucket``, ``_sum``, ``_count``)
``ray_hivebus_gate_failures_total``       counter     ``gate``
``ray_hivebus_limit_kills_total``         counter     ``limit``: memory, cpu_seconds, ...
========================================  ==========  ===================================

A metric reaches the endpoint within Ray's report interval (``metrics_report_interval_ms``,
10 s by default) after it is first recorded; a series appears only once it has a value.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Protocol

import ray
from ray.util.metrics import Counter, Gauge, Histogram

#: Seconds: from a millisecond hand-off on an idle hive to a minute-long wait for an executor.
DISPATCH_LATENCY_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                               1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


class Metrics(Protocol):
    """What the orchestrator reports; ``HiveMetrics`` under Ray, ``NoMetrics`` elsewhere."""

    def task_state(self, state: str, previous: str | None = None) -> None: ...

    def item_finished(self, status: str, dispatch_latency_s: float | None = None) -> None: ...

    def gate_failed(self, gate: str) -> None: ...

    def limit_killed(self, limit: str) -> None: ...


class HiveMetrics:
    """Ray metrics of one hive process; create it after ``ray.init``."""

    def __init__(self) -> None:
        self._tasks = Gauge("hivebus_tasks", "Tasks of this hive in each state.", tag_keys=("state",))
        self._transitions = Counter("hivebus_task_transitions_total",
                                    "Tasks that entered each state.", tag_keys=("state",))
        self._completed = Counter("hivebus_items_completed_total", "Work items that succeeded.")
        self._failed = Counter("hivebus_items_failed_total",
                               "Work items that ended without success, by status.", tag_keys=("status",))
        self._latency = Histogram("hivebus_dispatch_latency_seconds",
                                  "Seconds from a work item being ready to an executor taking it.",
                                  boundaries=DISPATCH_LATENCY_BOUNDARIES)
        self._gate_failures = Counter("hivebus_gate_failures_total", "Failed quality gates.",
                                      tag_keys=("gate",))
        self._limit_kills = Counter("hivebus_limit_kills_total",
                                    "Work items killed for a resource limit.", tag_keys=("limit",))
        self._in_state: Tally[str] = Tally()

    def task_state(self, state: str, previous: str | None = None) -> None:
        """A task entered ``state``; ``previous`` is the state it left (None: a new or resumed task)."""
        if state == previous:
            return
        self._transitions.inc(tags={"state": state})
        self._in_state[state] += 1
        self._tasks.set(self._in_state[state], tags={"state": state})
        if previous is not None and self._in_state[previous] > 0:
            self._in_state[previous] -= 1
            self._tasks.set(self._in_state[previous], tags={"state": previous})

    def item_finished(self, status: str, dispatch_latency_s: float | None = None) -> None:
        """A work item ended with ``status``; the latency is observed when it was dispatched."""
        if status == "succeeded":
            self._completed.inc()
        else:
            self._failed.inc(tags={"status": status})
        if dispatch_latency_s is not None:
            self._latency.observe(max(dispatch_latency_s, 0.0))

    def gate_failed(self, gate: str) -> None:
        self._gate_failures.inc(tags={"gate": gate})

    def limit_killed(self, limit: str) -> None:
        self._limit_kills.inc(tags={"limit": limit})


class NoMetrics:
    """Records nothing: for an orchestrator that runs without Ray (unit tests)."""

    def task_state(self, state: str, previous: str | None = None) -> None:
        pass

    def item_finished(self, status: str, dispatch_latency_s: float | None = None) -> None:
        pass

    def gate_failed(self, gate: str) -> None:
        pass

    def limit_killed(self, limit: str) -> None:
        pass


def hive_metrics() -> Metrics:
    """``HiveMetrics`` when Ray is initialised in this process, else ``NoMetrics``."""
    return HiveMetrics() if ray.is_initialized() else NoMetrics()


__all__ = ["DISPATCH_LATENCY_BOUNDARIES", "HiveMetrics", "Metrics", "NoMetrics", "hive_metrics"]
