"""Enforced limits through the whole hive: the item dies, its sibling and its agent do not."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import datetime
from pathlib import Path

import msgpack
import nats
import pytest
import ray

from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration

MEMORY_BOMB = (
    "python -c \"import time\nchunks = []\nfor step in range(128):\n"
    "    chunks.append(bytearray(16 << 20))\n    time.sleep(0.02)\""
)
BUSY_LOOP = "python -c \"while True: pass\""
FORK_BOMB = "python -c \"import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.01)\""


def result(record, item: str) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(Path(record.artifacts_dir, f"work_item_{item}.json").read_text())


def executor_pids() -> dict[str, int]:
    return {name: ray.get(ray.get_actor(name, namespace="hivebus").ready.remote(), timeout=30)["pid"]
            for name in (f"executor-{i}" for i in range(1, 5))}


def test_a_memory_bomb_is_killed_at_its_limit_while_its_sibling_finishes(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pids_before = executor_pids()
    spec = TaskSpec(title="bomb", workdir=str(tmp_path), work_items=[
        {"id": "bomb", "run": MEMORY_BOMB, "resources": {"memory_mb": 256}},
        {"id": "sibling", "run": "sleep 1 && echo fine > sibling.txt"},
    ])

    async def run_and_watch() -> tuple:  # type: ignore[type-arg]
        nc = await nats.connect(hive.nats_url)
        try:
            kills = await nc.subscribe("resource.limit_exceeded.*")
            record = await asyncio.to_thread(hive.run, spec, timeout=120)
            event = msgpack.unpackb((await kills.next_msg(timeout=10)).data)
            return record, event
        finally:
            await nc.close()

    record, event = asyncio.run(run_and_watch())

    assert record.state == TaskState.FAILED and record.exit_reason == "resource_limit"
    bomb = result(record, "bomb")
    assert bomb["status"] == "resource_limit"
    assert bomb["limit"]["limit"] == "memory" and bomb["limit"]["limit_value"] == 256
    assert 200 <= bomb["limit"]["peak_value"] < 2048
    crossed = bomb["limit"]["crossed_at"] or bomb["peak_rss_at"]
    killed = datetime.fromisoformat(bomb["limit"]["killed_at"])
    assert (killed - datetime.fromisoformat(crossed)).total_seconds() <= 1.0
    assert result(record, "sibling")["status"] == "succeeded"
    assert (tmp_path / "sibling.txt").read_text() == "fine\n"
    assert event["item_id"] == "bomb" and event["limit"] == "memory" and event["peak_value"] >= 200
    # The executor that ran the bomb survived (same process) and serves the next tasks.
    assert executor_pids() == pids_before
    served = set()
    for _ in range(10):
        again = hive.run(TaskSpec(title="next", workdir=str(tmp_path),
                                  work_items=[{"id": f"n{i}", "run": "true"} for i in range(4)]), timeout=60)
        assert again.state == TaskState.SUCCEEDED
        served |= {i.agent_id for i in again.iterations[0].items}
        if bomb["agent_id"] in served:
            break
    assert bomb["agent_id"] in served


def test_a_busy_loop_gets_half_a_core_and_is_stopped_after_its_cpu_budget(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = TaskSpec(title="spin", workdir=str(tmp_path), work_items=[
        {"id": "spin", "run": BUSY_LOOP, "resources": {"cpu": 0.5, "cpu_seconds": 2}},
    ])

    record = hive.run(spec, timeout=120)

    spin = result(record, "spin")
    assert spin["status"] == "resource_limit" and spin["limit"]["limit"] == "cpu_seconds"
    assert 1.5 <= spin["cpu_seconds"] <= 3.5
    # Half a core over time: about 4 s of wall time for 2 CPU seconds.
    assert spin["cpu_seconds"] / spin["duration_s"] <= 0.75


def test_a_fork_bomb_is_contained_and_cleaned_up(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = TaskSpec(title="forks", workdir=str(tmp_path), work_items=[
        {"id": "forks", "run": FORK_BOMB, "resources": {"max_procs": 50}, "timeout_s": 60},
    ])

    record = hive.run(spec, timeout=120)

    forks = result(record, "forks")
    assert forks["status"] == "resource_limit" and forks["limit"]["limit"] == "max_procs"
    assert subprocess.run(["true"]).returncode == 0  # the machine still forks
    leftover = subprocess.run(["pgrep", "-f", "while True:\n    try: os.fork"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
