"""LLM planning and prompt items through a whole hive, against an HTTP test double of Ollama."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ollama_double import OllamaDouble

from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration

THREE_ITEMS = json.dumps({
    "rationale": "make the data, count it, then check it",
    "items": [
        {"id": "make", "run": "seq 1 10 > numbers.txt"},
        {"id": "count", "run": "wc -l < numbers.txt > count.txt", "depends_on": ["make"]},
        {"id": "check", "run": "test $(cat count.txt) -eq 10", "depends_on": ["count"]},
    ],
})


def goal_only(host: str, workdir: Path, **fields) -> TaskSpec:  # type: ignore[no-untyped-def]
    return TaskSpec.model_validate({
        "title": "Count ten numbers", "description": "Write 1..10 to a file and count them.",
        "workdir": str(workdir), "gates": [{"name": "counted", "run": "test -s count.txt"}],
        "planner": {"strategy": "ollama", "model": "scripted", "host": host}, **fields,
    })


def test_a_goal_only_task_is_planned_by_the_model_and_succeeds(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with OllamaDouble([THREE_ITEMS]) as model:
        record = hive.run(goal_only(model.url, tmp_path), timeout=120)

    assert record.state == TaskState.SUCCEEDED, record.message
    assert (tmp_path / "count.txt").read_text().strip() == "10"
    [plan] = json.loads(Path(record.artifacts_dir, "open_plan.json").read_text())
    assert plan["strategy"] == "ollama" and plan["model"] == "scripted"
    assert len(plan["prompt_sha256"]) == 64
    assert [a["ok"] for a in plan["attempts"]] == [True]
    assert [i["id"] for i in plan["items"]] == ["make", "count", "check"]


def test_a_model_that_answers_garbage_first_succeeds_on_its_second_attempt(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with OllamaDouble(["this is not json", THREE_ITEMS]) as model:
        record = hive.run(goal_only(model.url, tmp_path), timeout=120)

    assert record.state == TaskState.SUCCEEDED, record.message
    [plan] = json.loads(Path(record.artifacts_dir, "open_plan.json").read_text())
    assert [a["ok"] for a in plan["attempts"]] == [False, True]
    assert plan["attempts"][0]["error"]


def test_a_model_that_never_answers_a_valid_plan_ends_planner_error(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with OllamaDouble(["nope"] * 5) as model:
        record = hive.run(goal_only(model.url, tmp_path, planner={
            "strategy": "ollama", "model": "scripted", "host": model.url, "attempts": 2}), timeout=120)
        asked = len(model.chats)

    assert record.state == TaskState.FAILED
    assert record.exit_reason == "planner_error"
    assert asked == 2
    assert "2" in record.message and "attempt" in record.message


def test_after_a_failed_gate_the_next_prompt_carries_the_failure(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    failing_first = json.dumps({"rationale": "oops", "items": [{"id": "make", "run": "echo 3 > count.txt"}]})
    with OllamaDouble([failing_first, THREE_ITEMS]) as model:
        spec = goal_only(model.url, tmp_path, gates=[
            {"name": "ten", "run": "echo \"got $(cat count.txt) lines\"; test $(cat count.txt) -eq 10"}])
        record = hive.run(spec, timeout=120)
        second_prompt = model.chats[1].text

    assert record.state == TaskState.SUCCEEDED, record.message
    assert record.iteration == 2
    assert "ten" in second_prompt and "got 3 lines" in second_prompt


def test_prompt_items_ask_the_model_and_check_its_answer(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with OllamaDouble(["The answer is 42.", "I do not know."]) as model:
        spec = TaskSpec.model_validate({
            "title": "ask", "workdir": str(tmp_path),
            "planner": {"strategy": "declarative", "model": "scripted", "host": model.url},
            "work_items": [
                {"id": "good", "prompt": "What is six times seven?", "expect": r"\b42\b"},
                {"id": "bad", "prompt": "And the meaning of life?", "expect": r"\b42\b",
                 "depends_on": ["good"]},
            ],
        })
        record = hive.run(spec, timeout=120)

    good = json.loads(Path(record.artifacts_dir, "work_item_good.json").read_text())
    bad = json.loads(Path(record.artifacts_dir, "work_item_bad.json").read_text())
    assert good["status"] == "succeeded" and "42" in good["output"]
    assert bad["status"] == "failed" and "expect" in bad["error"]
    assert record.exit_reason == "work_item_failed"


def test_a_subtask_runs_through_the_same_pipeline_and_the_parent_sees_its_result(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = TaskSpec.model_validate({
        "title": "parent", "workdir": str(tmp_path),
        "work_items": [
            {"id": "child", "subtask": {"title": "child", "workdir": ".",
                                        "work_items": [{"id": "touch", "run": "touch from-child"}],
                                        "gates": [{"name": "made", "run": "test -f from-child"}]}},
            {"id": "after", "run": "test -f from-child", "depends_on": ["child"]},
        ],
    })

    record = hive.run(spec, timeout=120)

    assert record.state == TaskState.SUCCEEDED, record.message
    child = json.loads(Path(record.artifacts_dir, "work_item_child.json").read_text())
    assert child["output"]["state"] == "SUCCEEDED"
    child_record = hive.get(child["output"]["task_id"])
    assert child_record.spec.parent_task == record.task_id


def test_with_ollama_unreachable_run_says_one_sentence_and_exits_1(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    task = tmp_path / "goal.yaml"
    task.write_text(f"title: goal\ndescription: do it\nplanner: {{strategy: ollama, model: tiny, "
                    f"host: 'http://127.0.0.1:{closed_port}'}}\n")

    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(task), "--json",
                           "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=180)

    assert done.returncode == 1, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["state"] == "FAILED" and line["exit_reason"] == "planner_error"
    assert "Traceback" not in done.stderr
    report = json.loads(Path(line["report"]).with_name("report.json").read_text())
    assert f"127.0.0.1:{closed_port}" in report["message"] and "ollama serve" in report["message"]
    assert "tiny" in report["message"]
