"""A task's artifacts folder and its report, without NATS or Ray."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from orchestrator.artifacts import TaskArtifacts, UnsafePath, safe_child
from orchestrator.report import render_markdown, report_data
from schemas import (
    GateOutcome,
    GateResult,
    HivebusError,
    IterationRecord,
    ItemOutcome,
    LifecycleEvent,
    Plan,
    ProgressEvent,
    TaskRecord,
    TaskSpec,
    TaskState,
    WorkItemResult,
    WorkItemSpec,
    encode_json_line,
)

TASK = "t-abc"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)

LISTED = ["open_plan.json", "work_items.json", "work_items_summary.json", "gate_results.json"]


def result(item_id: str, status: str = "succeeded", *, iteration: int = 1, attempt: int = 1,
           cpu_seconds: float = 0.0, peak_rss_mb: float = 0.0, duration_s: float = 0.0) -> WorkItemResult:
    return WorkItemResult(task_id=TASK, iteration=iteration, item_id=item_id, attempt=attempt,
                          status=status, exit_code=0 if status == "succeeded" else 1,
                          cpu_seconds=cpu_seconds, peak_rss_mb=peak_rss_mb, duration_s=duration_s,
                          agent_id="executor-1", started_at=T0, finished_at=T0)


def gate(name: str, passed: bool, iteration: int = 1) -> GateResult:
    return GateResult(task_id=TASK, iteration=iteration, gate=name, kind="command", passed=passed,
                      exit_code=0 if passed else 1, started_at=T0, finished_at=T0)


def a_plan(iteration: int, *item_ids: str) -> Plan:
    return Plan(task_id=TASK, iteration=iteration, strategy="declarative",
                items=[WorkItemSpec(id=i, run="true") for i in item_ids])


# --- safe names ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "a/b", "", "a\x00b", "../escape", "a\\b", "/etc"])
def test_a_name_that_could_leave_the_folder_is_refused(tmp_path, name):
    with pytest.raises(UnsafePath) as caught:
        safe_child(tmp_path, name)
    assert isinstance(caught.value, HivebusError)
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize("name", ["work_item_a.json", "a..b", ".events.jsonl.tmp", "t-abc"])
def test_a_plain_file_name_stays_inside_the_folder(tmp_path, name):
    path = safe_child(tmp_path, name)
    assert path == tmp_path / name
    assert path.resolve().parent == tmp_path.resolve()


def test_a_task_folder_cannot_be_named_to_leave_the_artifacts_root(tmp_path):
    with pytest.raises(UnsafePath):
        TaskArtifacts(tmp_path, "../elsewhere")
    assert list(tmp_path.iterdir()) == []


# --- the files -----------------------------------------------------------------------

def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_task_writes_every_listed_artifact_and_each_parses_as_json(tmp_path):
    art = TaskArtifacts(tmp_path, TASK)
    assert art.dir == tmp_path / TASK and art.dir.is_dir()

    art.add_plan(a_plan(1, "a", "b"))
    art.add_result(result("a", "failed", attempt=1, cpu_seconds=1.0))
    art.add_result(result("a", "succeeded", attempt=2, cpu_seconds=0.5, peak_rss_mb=30.0))
    art.add_result(result("b", "succeeded", cpu_seconds=0.25, peak_rss_mb=12.0, duration_s=2.0))
    summary = art.write_summary()
    art.add_gates([gate("tests", False)])
    art.add_plan(a_plan(2, "b"))
    art.add_gates([gate("tests", True, iteration=2)])
    events = [
        LifecycleEvent(task_id=TASK, state=TaskState.RUNNING, stage="planning", iteration=1, ts=T0),
        ProgressEvent(task_id=TASK, iteration=1, kind="item_finished", item_id="a", ts=T0),
    ]
    art.write_events([encode_json_line(e) for e in events])

    names = {p.name for p in art.dir.iterdir()}
    assert names == {*LISTED, "events.jsonl", "work_item_a.json", "work_item_b.json"}

    plans = read(art.dir / "open_plan.json")
    assert [p["iteration"] for p in plans] == [1, 2]
    assert [i["id"] for i in plans[0]["items"]] == ["a", "b"]

    items = read(art.dir / "work_items.json")
    assert [(i["iteration"], i["id"]) for i in items] == [(1, "a"), (1, "b"), (2, "b")]

    item_a = read(art.dir / "work_item_a.json")
    assert item_a["status"] == "succeeded"
    assert item_a["attempts"] == 2
    assert [h["status"] for h in item_a["history"]] == ["failed", "succeeded"]
    assert read(art.dir / "work_item_b.json")["attempts"] == 1

    on_disk = read(art.dir / "work_items_summary.json")
    assert on_disk == summary
    assert on_disk["items"] == 2
    assert on_disk["by_status"] == {"succeeded": 2}
    assert on_disk["total_cpu_seconds"] == 0.75
    assert on_disk["max_peak_rss_mb"] == 30.0
    assert on_disk["total_duration_s"] == 2.0
    assert {(w["id"], w["attempts"]) for w in on_disk["work_items"]} == {("a", 2), ("b", 1)}

    gates = read(art.dir / "gate_results.json")
    assert [(g["iteration"], g["passed"]) for g in gates] == [(1, False), (2, True)]

    lines = (art.dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["LifecycleEvent", "ProgressEvent"]


def test_no_temporary_file_is_left_behind_after_writing(tmp_path):
    art = TaskArtifacts(tmp_path, TASK)
    art.add_plan(a_plan(1, "a"))
    art.add_result(result("a"))
    art.write_events(["{}"])
    art.ensure_all()
    assert not [p.name for p in art.dir.iterdir() if p.name.endswith(".tmp")]


def test_ensure_all_creates_the_missing_artifacts_of_a_task_that_never_ran_an_item(tmp_path):
    art = TaskArtifacts(tmp_path, TASK)
    art.ensure_all()
    assert read(art.dir / "open_plan.json") == []
    assert read(art.dir / "work_items.json") == []
    assert read(art.dir / "gate_results.json") == []
    summary = read(art.dir / "work_items_summary.json")
    assert (summary["items"], summary["work_items"], summary["max_peak_rss_mb"]) == (0, [], 0.0)


def test_ensure_all_keeps_the_artifacts_that_exist(tmp_path):
    art = TaskArtifacts(tmp_path, TASK)
    art.add_plan(a_plan(1, "a"))
    art.add_gates([gate("tests", True)])
    art.ensure_all()
    assert [p["iteration"] for p in read(art.dir / "open_plan.json")] == [1]
    assert [i["id"] for i in read(art.dir / "work_items.json")] == ["a"]
    assert [g["gate"] for g in read(art.dir / "gate_results.json")] == ["tests"]


# --- the report ----------------------------------------------------------------------

def two_iterations() -> tuple[TaskRecord, list[WorkItemResult]]:
    spec = TaskSpec(title="Fix the tests", gates=[{"name": "tests", "run": "pytest"}],
                    work_items=[{"id": "build", "run": "make"}],
                    on_gate_failure=[{"id": "fix", "run": "python fix.py"}])
    record = TaskRecord(
        task_id=TASK, spec=spec, state=TaskState.SUCCEEDED, iteration=2, exit_reason="done",
        message="every gate passed", created_at=T0, started_at=T0,
        finished_at=T0 + timedelta(seconds=90),
        iterations=[
            IterationRecord(iteration=1, started_at=T0,
                            items=[ItemOutcome(id="build", status="succeeded", exit_code=0,
                                               duration_s=3.0, cpu_seconds=1.5, peak_rss_mb=20.0,
                                               agent_id="executor-1")],
                            gates=[GateOutcome(name="tests", passed=False, exit_code=1, duration_s=1.0)]),
            IterationRecord(iteration=2, started_at=T0,
                            items=[ItemOutcome(id="fix", status="succeeded", exit_code=0,
                                               attempts=2, cpu_seconds=0.25, agent_id="executor-2")],
                            gates=[GateOutcome(name="tests", passed=True, exit_code=0, duration_s=1.0)]),
        ],
    )
    results = [result("build", cpu_seconds=1.5, peak_rss_mb=20.0),
               result("fix", iteration=2, cpu_seconds=0.25, peak_rss_mb=45.04)]
    return record, results


def test_report_data_sums_the_items_and_cpu_seconds_and_states_how_the_task_ended():
    record, results = two_iterations()
    data = report_data(record, results)
    assert (data["task_id"], data["title"], data["state"], data["exit_reason"]) == (
        TASK, "Fix the tests", "SUCCEEDED", "done")
    assert data["iterations"] == 2
    assert data["duration_s"] == 90.0
    assert data["totals"] == {"items_run": 2, "cpu_seconds": 1.75, "max_peak_rss_mb": 45.0}
    assert [it["iteration"] for it in data["per_iteration"]] == [1, 2]
    assert json.loads(json.dumps(data)) == data  # report.json is this dict


def test_report_data_of_a_task_that_never_started_has_no_duration():
    record, _ = two_iterations()
    record = record.model_copy(update={"started_at": None, "finished_at": None, "iterations": []})
    data = report_data(record, [])
    assert data["duration_s"] is None and data["finished_at"] is None
    assert data["totals"] == {"items_run": 0, "cpu_seconds": 0.0, "max_peak_rss_mb": 0.0}


def test_the_markdown_report_has_a_table_per_iteration_with_item_and_gate_rows():
    record, results = two_iterations()
    text = render_markdown(report_data(record, results))
    lines = text.splitlines()
    assert lines[0] == "# Fix the tests"
    assert "- state: **SUCCEEDED**, exit reason: `done`" in lines
    assert "- iterations: 2; duration: 90.00 s" in lines
    assert "> every gate passed" in lines
    assert "CPU seconds (all items): 1.75" in text

    first, second = text.split("## Iteration 1")[1].split("## Iteration 2")
    assert "| build | succeeded | 1 | 0 | 3.00 s | 20.0 | 1.50 | executor-1 |" in first
    assert "| tests | FAILED | 1 | 1.00 s |" in first
    assert "| fix | succeeded | 2 | 0 | 0.00 s | 0.0 | 0.25 | executor-2 |" in second
    assert "| tests | passed | 0 | 1.00 s |" in second
    assert "build" not in second
    assert text.count("| work item | status |") == 2
    assert text.count("| gate | result |") == 2


def test_an_iteration_without_items_says_so_in_the_report():
    record, results = two_iterations()
    record = record.model_copy(update={"iterations": [IterationRecord(iteration=1, started_at=T0)]})
    text = render_markdown(report_data(record, results))
    assert "## Iteration 1\n\nNo work items ran." in text
    assert "| gate |" not in text
