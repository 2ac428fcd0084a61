"""The resource manager on a real hive: leases under the totals, usage samples, snapshots."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgpack
import nats
import pytest

from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration


def test_four_512_mb_items_under_a_1_gib_total_never_run_more_than_two_at_once(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    items = [{"id": f"m{i}", "run": "sleep 0.5", "resources": {"memory_mb": 512}} for i in range(4)]
    spec = TaskSpec(title="leases", workdir=str(tmp_path), work_items=items)

    async def watch() -> tuple[str, list[dict]]:
        nc = await nats.connect(hive.nats_url)
        events: list[dict] = []
        try:
            async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
                events.append({"subject": msg.subject, **msgpack.unpackb(msg.data)})

            await nc.subscribe("resource.allocation.*", cb=on_event)
            await nc.subscribe("resource.release.*", cb=on_event)
            await nc.flush()
            record = await asyncio.to_thread(hive.run, spec, timeout=120)
            # Executors return a lease after their reply: the last release may come
            # after the task's end.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sum(
                    e["lease"]["task_id"] == record.task_id and e["kind"] == "release" for e in events) < 4:
                await asyncio.sleep(0.05)
            await nc.flush()
            return record.task_id, events
        finally:
            await nc.close()

    task_id, events = asyncio.run(watch())

    mine = [e for e in events if e["lease"]["task_id"] == task_id]
    assert len(mine) == 8  # four grants, four returns
    running, most = 0, 0
    for event in mine:
        running += 1 if event["kind"] == "allocation" else -1
        most = max(most, running)
        assert event["allocated_memory_mb"] <= 1024
    assert most == 2
    assert {e["subject"].split(".")[1] for e in mine} == {"allocation", "release"}


def test_every_agent_publishes_its_usage_and_the_snapshot_shows_it(hive) -> None:  # type: ignore[no-untyped-def]
    agents = {"planner-1", "verifier-1", "resources"} | {f"executor-{i}" for i in range(1, 5)}
    deadline = time.monotonic() + 30
    snapshot = hive.resources()
    while {u.agent_id for u in snapshot.usage} != agents and time.monotonic() < deadline:
        time.sleep(0.2)  # samples come once a second
        snapshot = hive.resources()

    assert {u.agent_id for u in snapshot.usage} == agents
    assert all(u.rss_mb > 10 and u.pid > 0 for u in snapshot.usage)
    assert (snapshot.total_cpu, snapshot.total_memory_mb) == (4, 1024)
    assert (snapshot.agent_cpu, snapshot.agent_memory_mb) == (1, 512)


def test_a_work_item_result_carries_peak_rss_and_cpu_seconds(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    burn = "python -c \"b = bytearray(80_000_000); import time; t = time.process_time(); exec('while time.process_time() - t < 0.5: pass')\""
    record = hive.run(TaskSpec(title="measure", workdir=str(tmp_path),
                               work_items=[{"id": "burn", "run": burn}]), timeout=120)

    assert record.state == TaskState.SUCCEEDED
    result = json.loads(Path(record.artifacts_dir, "work_item_burn.json").read_text())
    assert result["peak_rss_mb"] >= 70
    assert result["cpu_seconds"] >= 0.3
    report = Path(record.artifacts_dir, "report.md").read_text()
    assert "peak RSS MB" in report and "CPU s" in report
