"""The hive end to end: real nats-server, real Ray, agents as actors, one session-wide hive."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import nats
import psutil
import pytest
import ray
from conftest import wait_for

from schemas import TaskSpec, TaskState

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.integration

ARTIFACTS = [
    "open_plan.json", "work_items.json", "work_items_summary.json", "gate_results.json",
    "events.jsonl", "report.md", "report.json",
]


def spec(tmp_path: Path, **fields) -> TaskSpec:  # type: ignore[no-untyped-def]
    return TaskSpec.model_validate({"title": "test task", "workdir": str(tmp_path), **fields})


def lifecycle_states(artifacts_dir: str) -> list[str]:
    lines = Path(artifacts_dir, "events.jsonl").read_text().splitlines()
    return [json.loads(line)["state"] for line in lines if json.loads(line)["type"] == "LifecycleEvent"]


def test_the_pipeline_example_succeeds_and_leaves_every_artifact(hive) -> None:  # type: ignore[no-untyped-def]
    record = hive.run(EXAMPLES / "pipeline" / "task.yaml", timeout=120)

    assert record.state == TaskState.SUCCEEDED
    assert record.exit_reason == "done"
    folder = Path(record.artifacts_dir)
    for name in ARTIFACTS:
        path = folder / name
        assert path.is_file(), name
        if name.endswith(".json"):
            json.loads(path.read_text())
    for line in (folder / "events.jsonl").read_text().splitlines():
        json.loads(line)
    for item in ("fetch", "evens", "odds", "squares", "total"):
        result = json.loads((folder / f"work_item_{item}.json").read_text())
        assert result["status"] == "succeeded"
        assert result["attempts"] == 1
    assert "| total | succeeded |" in (folder / "report.md").read_text()
    states = lifecycle_states(record.artifacts_dir)
    assert states[:4] == ["DRAFT", "APPROVED", "QUEUED", "RUNNING"]
    assert states[-1] == "SUCCEEDED"
    assert set(states[3:-1]) == {"RUNNING"}


def test_a_failed_gate_sends_the_task_back_to_planning_with_the_failure(hive) -> None:  # type: ignore[no-untyped-def]
    record = hive.run(EXAMPLES / "fix-the-tests" / "task.yaml", timeout=120)

    assert record.state == TaskState.SUCCEEDED, record.message
    assert record.iteration == 2
    first, second = record.iterations
    assert [g.passed for g in first.gates] == [True, False]
    assert [i.id for i in second.items] == ["fix"]
    assert all(g.passed for g in second.gates)
    fix = json.loads(Path(record.artifacts_dir, "work_item_fix.json").read_text())
    assert "failed gates: ['tests']" in fix["stdout_tail"]
    assert "replaced it" in fix["handoff_notes"]
    plans = json.loads(Path(record.artifacts_dir, "open_plan.json").read_text())
    assert plans[1]["failure"]["failed_gates"][0]["name"] == "tests"


def test_a_gate_that_never_changes_ends_with_no_progress_after_two_iterations(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, max_iterations=5, gates=[{"name": "never", "run": "echo nope; exit 1"}],
                work_items=[{"id": "noop", "run": "true"}],
                on_gate_failure=[{"id": "try-fix", "run": "true"}])

    record = hive.run(task, timeout=120)

    assert record.state == TaskState.FAILED
    assert record.exit_reason == "no_progress"
    assert record.iteration == 2


def test_a_gate_that_fails_differently_each_time_ends_at_max_iterations(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, max_iterations=3,
                gates=[{"name": "moving", "run": "echo x >> count; wc -l < count; exit 1"}],
                work_items=[{"id": "noop", "run": "true"}])

    record = hive.run(task, timeout=120)

    assert record.state == TaskState.FAILED
    assert record.exit_reason == "max_iterations"
    assert record.iteration == 3
    assert (tmp_path / "count").read_text().count("x") == 3


def test_two_independent_items_run_at_the_same_time_on_two_executors(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, work_items=[{"id": "left", "run": "sleep 1"}, {"id": "right", "run": "sleep 1"}])

    record = hive.run(task, timeout=120)

    assert record.state == TaskState.SUCCEEDED
    folder = Path(record.artifacts_dir)
    left, right = (json.loads((folder / f"work_item_{i}.json").read_text()) for i in ("left", "right"))
    assert left["agent_id"] != right["agent_id"]
    assert left["started_at"] < right["finished_at"] and right["started_at"] < left["finished_at"]


def test_call_items_run_python_functions_and_record_their_return_value(hive) -> None:  # type: ignore[no-untyped-def]
    record = hive.run(EXAMPLES / "calls" / "task.yaml", timeout=120)

    assert record.state == TaskState.SUCCEEDED, record.message
    generate = json.loads(Path(record.artifacts_dir, "work_item_generate.json").read_text())
    assert generate["output"] == {"count": 2000}
    histogram = json.loads(Path(record.artifacts_dir, "work_item_histogram.json").read_text())
    assert sum(histogram["output"]) == 2000


def test_a_flaky_item_is_retried_and_its_attempts_are_recorded(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    flaky = "echo x >> tries; test $(wc -l < tries) -ge 2"
    record = hive.run(spec(tmp_path, work_items=[{"id": "flaky", "run": flaky, "retries": 2}]), timeout=120)

    assert record.state == TaskState.SUCCEEDED
    result = json.loads(Path(record.artifacts_dir, "work_item_flaky.json").read_text())
    assert result["attempts"] == 2
    assert [a["status"] for a in result["history"]] == ["failed", "succeeded"]


def test_a_failed_item_with_no_way_to_replan_ends_work_item_failed_and_skips_its_dependents(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, work_items=[
        {"id": "broken", "run": "echo oops >&2; exit 3"},
        {"id": "after", "run": "touch after-ran", "depends_on": ["broken"]},
    ])

    record = hive.run(task, timeout=120)

    assert record.state == TaskState.FAILED
    assert record.exit_reason == "work_item_failed"
    statuses = {i.id: i.status for i in record.iterations[0].items}
    assert statuses == {"broken": "failed", "after": "skipped"}
    assert not (tmp_path / "after-ran").exists()
    broken = json.loads(Path(record.artifacts_dir, "work_item_broken.json").read_text())
    assert broken["exit_code"] == 3 and "oops" in broken["stderr_tail"]


def test_cancel_kills_the_running_child_and_records_canceled(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, work_items=[{"id": "long", "run": "echo $$ > pid; exec sleep 60"}])
    task_id = hive.submit(task)
    pid_file = tmp_path / "pid"
    wait_for(pid_file.exists, "the item to start")
    child = int(pid_file.read_text())

    record = hive.cancel(task_id)
    record = hive.wait(task_id, timeout=30)

    assert record.state == TaskState.CANCELED
    assert record.exit_reason == "canceled"
    wait_for(lambda: not _alive(child), "the child to die")


def test_a_task_past_its_timeout_ends_deadline_exceeded_and_its_child_is_killed(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, timeout_s=3, work_items=[{"id": "long", "run": "echo $$ > pid; exec sleep 60"}])

    record = hive.run(task, timeout=60)

    assert record.state == TaskState.FAILED
    assert record.exit_reason == "deadline_exceeded"
    wait_for(lambda: not _alive(int((tmp_path / "pid").read_text())), "the child to die")


def test_an_assisted_task_waits_in_draft_until_it_is_approved(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task = spec(tmp_path, run_mode="assisted", work_items=[{"id": "a", "run": "touch ran"}])
    task_id = hive.submit(task)

    assert hive.get(task_id).state == TaskState.DRAFT
    assert not (tmp_path / "ran").exists()
    hive.approve(task_id)
    record = hive.wait(task_id, timeout=60)

    assert record.state == TaskState.SUCCEEDED
    assert (tmp_path / "ran").exists()


def test_a_body_that_is_not_a_task_gets_rejected_and_a_dead_letter(hive) -> None:  # type: ignore[no-untyped-def]
    async def probe() -> tuple[dict, dict, dict]:
        nc = await nats.connect(hive.nats_url)
        try:
            letters = await nc.subscribe("hivebus.deadletter")
            bad_json = await nc.request("task.submit", b'{"title": 42, "surprise": true}', timeout=5)
            bad_bytes = await nc.request("task.submit", b"\xc1\x00\xff garbage", timeout=5)
            letter = await letters.next_msg(timeout=5)
            import msgpack

            return json.loads(bad_json.data), msgpack.unpackb(bad_bytes.data), msgpack.unpackb(letter.data)
        finally:
            await nc.close()

    rejected_json, rejected_bytes, dead_letter = asyncio.run(probe())

    assert rejected_json["type"] == "Rejected" and rejected_json["code"] == "invalid"
    assert {e["loc"] for e in rejected_json["errors"]} >= {"title", "surprise"}
    assert rejected_bytes["type"] == "Rejected" and rejected_bytes["code"] == "bad_encoding"
    assert dead_letter["subject"] == "task.submit"


def test_task_list_and_get_answer_from_the_records(hive, tmp_path) -> None:  # type: ignore[no-untyped-def]
    task_id = hive.submit(spec(tmp_path, work_items=[{"id": "a", "run": "true"}]))
    hive.wait(task_id, timeout=60)

    assert task_id in {r.task_id for r in hive.list()}
    assert task_id in {r.task_id for r in hive.list("SUCCEEDED")}
    assert hive.get(task_id).state == TaskState.SUCCEEDED


def test_the_agents_are_named_ray_actors_in_namespace_hivebus(hive) -> None:  # type: ignore[no-untyped-def]
    for name in ("planner-1", "executor-1", "executor-2", "verifier-1", "resources"):
        actor = ray.get_actor(name, namespace="hivebus")
        info = ray.get(actor.ready.remote(), timeout=30)
        assert info["agent_id"] == name


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
