"""Task files (YAML or JSON) become a TaskSpec, or a TaskFileError that names the file and field."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from schemas import HivebusError, TaskFileError, TaskSpec, load_task_file

VALID_YAML = """\
title: Build and test the sample service
description: free text
priority: high
run_mode: assisted
max_iterations: 5
timeout_s: 600
workdir: ./service
env: {KEY: value}
planner: {strategy: declarative}
gates:
  - name: tests
    run: pytest -q
    timeout_s: 120
work_items:
  - id: lint
    run: ruff check .
  - id: test
    run: pytest -q
    depends_on: [lint]
    timeout_s: 60
    retries: 1
    resources: {cpu: 1, memory_mb: 512}
  - id: step
    call: "examples.calls.steps:build"
    args: {n: 3}
on_gate_failure:
  - id: fix
    run: python fix.py
"""


def write(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refusal(path: Path) -> TaskFileError:
    with pytest.raises(TaskFileError) as caught:
        load_task_file(path)
    error = caught.value
    assert isinstance(error, HivebusError)
    assert error.path == str(path)
    assert str(path) in str(error)
    return error


def minimal(**extra) -> str:
    return json.dumps({"title": "t", "gates": ["doctor"], **extra})


# --- valid files -------------------------------------------------------------------

def test_a_valid_yaml_file_becomes_a_task_spec(tmp_path):
    spec = load_task_file(write(tmp_path, VALID_YAML))
    assert isinstance(spec, TaskSpec)
    assert spec.title == "Build and test the sample service"
    assert (spec.priority, spec.run_mode, spec.max_iterations, spec.timeout_s) == (
        "high", "assisted", 5, 600)
    assert spec.env == {"KEY": "value"}
    assert [g.name for g in spec.gates] == ["tests"]
    assert [i.id for i in spec.work_items] == ["lint", "test", "step"]
    assert spec.work_items[1].depends_on == ["lint"]
    assert spec.work_items[1].resources.memory_mb == 512
    assert [i.kind for i in spec.work_items] == ["shell", "shell", "call"]
    assert spec.work_items[2].args == {"n": 3}
    assert [i.id for i in spec.on_gate_failure] == ["fix"]


def test_a_valid_json_file_becomes_the_same_task_spec_as_its_yaml(tmp_path):
    from_yaml = load_task_file(write(tmp_path, VALID_YAML))
    as_json = json.dumps(yaml.safe_load(VALID_YAML))
    from_json = load_task_file(write(tmp_path, as_json, "task.json"))
    assert from_json == from_yaml


def test_a_json_file_indented_with_tabs_is_a_valid_task_file(tmp_path):
    body = {"title": "t", "gates": ["doctor"], "work_items": [{"id": "a", "run": "true"}]}
    spec = load_task_file(write(tmp_path, json.dumps(body, indent="\t"), "task.json"))
    assert [i.id for i in spec.work_items] == ["a"]


def test_a_relative_workdir_is_made_absolute_relative_to_the_file_not_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "tasks"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_task_file(write(folder, VALID_YAML))
    assert spec.workdir == str((folder / "service").resolve())


def test_a_file_without_a_workdir_works_in_the_files_folder(tmp_path):
    spec = load_task_file(write(tmp_path, minimal()))
    assert spec.workdir == str(tmp_path.resolve())


def test_an_absolute_workdir_is_kept(tmp_path):
    target = tmp_path / "abs"
    spec = load_task_file(write(tmp_path, minimal(workdir=str(target))))
    assert spec.workdir == str(target)


def test_a_blank_workdir_is_refused_or_means_the_files_folder(tmp_path):
    path = write(tmp_path, "title: t\nworkdir:\ngates: [doctor]\n")
    try:
        spec = load_task_file(path)
    except TaskFileError as exc:
        assert "workdir" in str(exc)
    else:
        assert spec.workdir == str(tmp_path.resolve())


def test_a_deadline_with_a_timezone_is_accepted(tmp_path):
    spec = load_task_file(write(tmp_path, "title: t\ngates: [doctor]\ndeadline: 2026-01-01T12:00:00Z\n"))
    assert spec.deadline == datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


@pytest.mark.parametrize("gate", ['"doctor"', "{name: doctor}"])
def test_the_doctor_gate_may_be_written_as_its_name_alone(tmp_path, gate):
    spec = load_task_file(write(tmp_path, f"title: t\ngates:\n  - {gate}\n"))
    (only,) = spec.gates
    assert (only.name, only.builtin, only.run) == ("doctor", "doctor", None)


def test_a_gate_named_doctor_with_its_own_command_runs_the_command(tmp_path):
    spec = load_task_file(write(tmp_path, "title: t\ngates:\n  - {name: doctor, run: make check}\n"))
    assert (spec.gates[0].builtin, spec.gates[0].run) == (None, "make check")


# --- refusals: the file itself ------------------------------------------------------

def test_a_missing_file_is_refused_with_its_path(tmp_path):
    error = refusal(tmp_path / "nope.yaml")
    assert error.problems == ["no such file"]


def test_invalid_yaml_is_refused_with_the_line_and_column(tmp_path):
    error = refusal(write(tmp_path, "title: t\ngates: [doctor\n"))
    (problem,) = error.problems
    assert "not valid YAML" in problem
    assert "line 3, column 1" in problem


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, text):
    error = refusal(write(tmp_path, text))
    assert "mapping" in str(error)


# --- refusals: fields --------------------------------------------------------------

@pytest.mark.parametrize(("body", "field", "reason"), [
    ({"gates": ["doctor"]}, "title", "Field required"),
    ({"title": "", "gates": ["doctor"]}, "title", "at least 1 character"),
    ({"title": "t"}, "work_items", "needs work items or gates"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x", "call": "m:f"}]},
     "work_items.0", "exactly one of 'run'"),
    ({"title": "t", "work_items": [{"id": "a"}]}, "work_items.0", "exactly one of 'run'"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x", "args": {"n": 1}}]},
     "work_items.0", "'args' is only for 'call' items"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x", "depends_on": ["ghost"]}]},
     "work_items[0].depends_on", "unknown work item 'ghost'"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x", "depends_on": ["a"]}]},
     "work_items[0].depends_on", "depends on itself"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x"}, {"id": "a", "run": "y"}]},
     "work_items[1].id", "duplicate id 'a'"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x"}],
      "on_gate_failure": [{"id": "a", "run": "fix"}]},
     "on_gate_failure[0].id", "'a' is also a work item id"),
    ({"title": "t", "gates": [{"name": "t1", "run": "x"}, {"name": "t1", "run": "y"}]},
     "gates[1].name", "duplicate gate 't1'"),
    ({"title": "t", "gates": ["doctor", {"name": "doctor"}]},
     "gates[1].name", "duplicate gate 'doctor'"),
    ({"title": "t", "gates": [{"name": "tests"}]}, "gates.0", "exactly one of 'run'"),
    ({"title": "t", "work_items": [{"id": "a/b", "run": "x"}]}, "work_items.0.id", "pattern"),
    ({"title": "t", "work_items": [{"id": ".hidden", "run": "x"}]}, "work_items.0.id", "pattern"),
    ({"title": "t", "work_items": [{"id": "..", "run": "x"}]}, "work_items.0.id", "pattern"),
    ({"title": "t", "gates": [{"name": "../up", "run": "x"}]}, "gates.0.name", "pattern"),
    ({"title": "t", "gates": ["doctor"], "deadline": "2026-01-01T12:00:00"},
     "deadline", "needs a timezone"),
    ({"title": "t", "gates": ["doctor"], "priority": "urgent"}, "priority", "Input should be"),
    ({"title": "t", "gates": ["doctor"], "colour": "red"}, "colour", "Extra inputs"),
    ({"title": "t", "work_items": [{"id": "a", "call": "not a target"}]},
     "work_items.0.call", "pattern"),
    ({"title": "t", "work_items": [{"id": "a", "run": "x", "resources": {"memory_mb": 0}}]},
     "work_items.0.resources.memory_mb", "greater than 0"),
])
def test_an_invalid_field_is_refused_naming_the_file_the_field_and_the_reason(tmp_path, body, field, reason):
    error = refusal(write(tmp_path, json.dumps(body), "task.json"))
    assert any(field in p and reason in p for p in error.problems), error.problems
    assert field in str(error) and reason in str(error)


def test_a_dependency_cycle_is_refused_naming_the_ids_in_the_cycle(tmp_path):
    body = {"title": "t", "work_items": [
        {"id": "a", "run": "x", "depends_on": ["c"]},
        {"id": "b", "run": "x", "depends_on": ["a"]},
        {"id": "c", "run": "x", "depends_on": ["b"]},
        {"id": "d", "run": "x"},
    ]}
    error = refusal(write(tmp_path, json.dumps(body), "task.json"))
    (problem,) = error.problems
    assert problem.startswith("work_items: dependency cycle")
    cycle = problem.removeprefix("work_items: dependency cycle ").split(" -> ")
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == ["a", "b", "c"]


def test_a_cycle_among_the_fix_items_is_refused_under_on_gate_failure(tmp_path):
    body = {"title": "t", "gates": ["doctor"], "on_gate_failure": [
        {"id": "f1", "run": "x", "depends_on": ["f2"]},
        {"id": "f2", "run": "x", "depends_on": ["f1"]},
    ]}
    error = refusal(write(tmp_path, json.dumps(body), "task.json"))
    assert any(p.startswith("on_gate_failure: dependency cycle") for p in error.problems)


def test_every_problem_of_a_file_is_listed_at_once(tmp_path):
    body = {"gates": ["doctor"], "priority": "urgent", "work_items": [{"id": "a/b", "run": "x"}]}
    error = refusal(write(tmp_path, json.dumps(body), "task.json"))
    fields = [p.split(":")[0] for p in error.problems]
    assert {"title", "priority", "work_items.0.id"} <= set(fields)
    assert all(f"  - {p}" in str(error) for p in error.problems)
