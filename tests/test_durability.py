"""Nothing lost: crashes of the orchestrator and of executors, on a real nats-server and Ray."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgpack
import nats
import psutil
import pytest
import ray

from conftest import Cli, wait_for
from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration


def runs(path: Path) -> int:
    return path.read_text().count("x") if path.exists() else 0


def test_an_orchestrator_killed_mid_task_resumes_and_does_not_rerun_finished_items(
        cli, own_nats, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from orchestrator import Hive

    work = tmp_path / "work"
    work.mkdir()
    state = tmp_path / "state"
    first = Cli(["up", "--nats", own_nats.url, "--state-dir", str(state), "--policy", "local"], cwd=tmp_path)
    cli.append(first)
    first.wait_for_line("hivebus is up")
    spec = TaskSpec(title="survive a crash", workdir=str(work), work_items=[
        {"id": "early", "run": "echo x >> early.count"},
        {"id": "other", "run": "echo x >> other.count"},
        {"id": "slow", "run": "echo x >> slow.count; touch slow.started; sleep 3",
         "depends_on": ["early", "other"]},
        {"id": "last", "run": "echo x >> last.count", "depends_on": ["slow"]},
    ])
    client = Hive.connect(own_nats.url)
    try:
        task_id = client.submit(spec)
        wait_for((work / "slow.started").exists, "the slow item to start")

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        second = Cli(["up", "--nats", own_nats.url, "--state-dir", str(state), "--policy", "local"],
                     cwd=tmp_path)
        cli.append(second)
        second.wait_for_line("hivebus is up")
        record = client.wait(task_id, timeout=120)
    finally:
        client.close()

    assert record.state == TaskState.SUCCEEDED, record.message
    assert runs(work / "early.count") == 1
    assert runs(work / "other.count") == 1
    assert 1 <= runs(work / "slow.count") <= 2
    assert runs(work / "last.count") == 1
    second.proc.send_signal(signal.SIGINT)
    second.finish(timeout=60)


def test_an_executor_killed_mid_item_is_restarted_and_the_item_runs_again(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = TaskSpec(title="executor crash", workdir=str(tmp_path), work_items=[
        {"id": "victim", "run": "echo x >> count; echo $$ > child.pid; sleep 4"},
    ])

    async def started_on() -> tuple[str, str]:
        nc = await nats.connect(hive.nats_url)
        try:
            sub = await nc.subscribe("task.progress.*")
            task_id = await asyncio.to_thread(hive.submit, spec)
            while True:
                event = msgpack.unpackb((await sub.next_msg(timeout=60)).data)
                if event["task_id"] == task_id and event["kind"] == "item_started":
                    return task_id, event["agent_id"]
        finally:
            await nc.close()

    task_id, agent_id = asyncio.run(started_on())
    wait_for((tmp_path / "child.pid").exists, "the item's child to start")
    first_child = int((tmp_path / "child.pid").read_text())
    worker_pid = ray.get(ray.get_actor(agent_id, namespace="hivebus").ready.remote(), timeout=30)["pid"]
    os.kill(worker_pid, signal.SIGKILL)

    record = hive.wait(task_id, timeout=120)

    assert record.state == TaskState.SUCCEEDED, record.message
    assert 1 <= runs(tmp_path / "count") <= 2
    assert not psutil.pid_exists(first_child) or psutil.Process(first_child).status() == psutil.STATUS_ZOMBIE
    assert all(r.state != TaskState.RUNNING for r in hive.list() if r.task_id == task_id)
