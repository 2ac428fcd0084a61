"""The LLM cores against the real ``ollama`` client and an HTTP test double of Ollama."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ollama
import pytest
from ollama_double import OllamaDouble, Reply

from actors.llm import LLMError, OllamaPlanner, PlanAnswer, PromptRunner, ollama_settings
from actors.planner import PlannerError
from schemas import (
    FailedGate,
    FailedItem,
    FailureContext,
    Plan,
    PlannerSpec,
    PlanRequest,
    TaskSpec,
    WorkItemAssignment,
    WorkItemResult,
    WorkItemSpec,
)

TASK = "t-llm"

THREE_ITEMS = json.dumps({
    "rationale": "install, then build, then test",
    "items": [
        {"id": "install", "run": "pip install -e ."},
        {"id": "build", "run": "make", "depends_on": ["install"]},
        {"id": "test", "run": "pytest -q", "depends_on": ["build"]},
    ],
})

CYCLE = json.dumps({
    "rationale": "round and round",
    "items": [
        {"id": "a", "run": "true", "depends_on": ["b"]},
        {"id": "b", "run": "true", "depends_on": ["a"]},
    ],
})


def goal_only(host: str, *, model: str = "scripted", attempts: int = 3,
              options: dict[str, Any] | None = None) -> TaskSpec:
    return TaskSpec(
        title="Make the sample service pass its tests",
        description="The service in ./service has a failing test; make it pass.",
        workdir="/srv/sample",
        gates=[{"name": "tests", "run": "pytest -q"}, "doctor"],
        planner={"strategy": "ollama", "model": model, "host": host,
                 "attempts": attempts, "options": options or {}},
    )


def plan(spec: TaskSpec, *, failure: FailureContext | None = None, iteration: int = 1,
         timeout_s: float = 30.0) -> Plan:
    request = PlanRequest(task_id=TASK, iteration=iteration, spec=spec, failure=failure)
    return asyncio.run(OllamaPlanner(agent_id="planner-0", timeout_s=timeout_s).plan(request))


@contextmanager
def closed_port() -> Iterator[str]:
    """A loopback URL whose port is bound but not listening: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- settings ---------------------------------------------------------------------------


def test_the_task_s_host_and_model_win_over_the_environment() -> None:
    spec = PlannerSpec(strategy="ollama", model="m1", host="http://ollama:1234")
    env = {"OLLAMA_HOST": "elsewhere:1", "HIVEBUS_OLLAMA_MODEL": "m2"}
    assert ollama_settings(spec, environ=env) == ("http://ollama:1234", "m1")


def test_the_environment_fills_in_host_and_model_and_a_bare_host_gets_a_scheme() -> None:
    spec = PlannerSpec(strategy="ollama")
    env = {"OLLAMA_HOST": "127.0.0.1:11500", "HIVEBUS_OLLAMA_MODEL": "llama3.2"}
    assert ollama_settings(spec, environ=env) == ("http://127.0.0.1:11500", "llama3.2")
    assert ollama_settings(spec, environ={"OLLAMA_HOST": "gpu-box", "HIVEBUS_OLLAMA_MODEL": "m"}) \
        == ("http://gpu-box:11434", "m")


def test_without_any_setting_the_host_is_ollama_s_default_and_a_model_is_required() -> None:
    spec = PlannerSpec(strategy="ollama")
    assert ollama_settings(spec.model_copy(update={"model": "m"}), environ={}) \
        == ("http://127.0.0.1:11434", "m")
    with pytest.raises(LLMError) as err:
        ollama_settings(spec, environ={})
    assert str(err.value) == \
        "no model: set planner.model in the task, HIVEBUS_OLLAMA_MODEL, or --model"


# -- the test double itself --------------------------------------------------------------


def test_the_double_answers_the_real_client_on_tags_show_generate_and_chat() -> None:
    with OllamaDouble(["generated", "chatted"]) as double, \
            ollama.Client(host=double.url, timeout=10) as client:
        assert [m.model for m in client.list().models] == ["scripted"]
        assert client.show("scripted").capabilities == ["completion"]
        assert client.generate(model="scripted", prompt="hi").response == "generated"
        assert client.chat(model="scripted", messages=[{"role": "user", "content": "hey"}]) \
            .message.content == "chatted"
        with pytest.raises(ollama.ResponseError) as err:
            client.show("absent")
        assert err.value.status_code == 404
        assert double.prompts == ["\nhi", "hey"]
        assert double.chats[0].body["stream"] is False


# -- the planner -------------------------------------------------------------------------


def test_a_goal_only_task_is_planned_by_the_model_into_a_three_item_dag() -> None:
    with OllamaDouble([THREE_ITEMS]) as double:
        spec = goal_only(double.url, options={"temperature": 0})
        result = plan(spec)
    assert result.strategy == "ollama"
    assert [(i.id, i.depends_on) for i in result.items] == \
        [("install", []), ("build", ["install"]), ("test", ["build"])]
    assert result.rationale == "install, then build, then test"
    assert result.model == "scripted"
    assert result.planner_id == "planner-0"
    assert [(a.attempt, a.ok, a.error) for a in result.attempts] == [(1, True, None)]
    assert result.attempts[0].answer_excerpt == THREE_ITEMS[:500]

    (chat,) = double.chats
    assert chat.body["model"] == "scripted"
    assert chat.body["format"] == PlanAnswer.model_json_schema()
    assert chat.body["options"] == {"temperature": 0}
    blob = json.dumps(chat.body["messages"], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    assert result.prompt_sha256 == hashlib.sha256(blob.encode()).hexdigest()
    prompt = double.prompts[0]
    for part in ("Make the sample service pass its tests", "has a failing test",
                 "/srv/sample", "tests: `pytest -q` must exit 0", "doctor"):
        assert part in prompt


def test_the_work_items_of_the_task_file_reach_the_model_as_hints() -> None:
    spec = goal_only("http://unused").model_copy(update={
        "work_items": [WorkItemSpec(id="lint", run="ruff check .")],
        "on_gate_failure": [WorkItemSpec(id="fix", run="python fix.py")],
    })
    with OllamaDouble([THREE_ITEMS]) as double:
        plan(spec.model_copy(update={"planner": spec.planner.model_copy(
            update={"host": double.url})}))
    prompt = double.prompts[0]
    assert "ruff check ." in prompt and "python fix.py" in prompt


def test_an_invalid_json_answer_goes_back_to_the_model_and_the_second_answer_is_used() -> None:
    with OllamaDouble(["Sure! Here is the plan: install, build, test.", THREE_ITEMS]) as double:
        result = plan(goal_only(double.url))
    assert [i.id for i in result.items] == ["install", "build", "test"]
    first, second = result.attempts
    assert (first.attempt, first.ok, second.attempt, second.ok) == (1, False, 2, True)
    assert first.error is not None and "not JSON" in first.error
    assert first.answer_excerpt.startswith("Sure! Here is the plan")
    assert len(double.chats) == 2
    follow_up = double.chats[1].body["messages"]
    assert follow_up[:2] == double.chats[0].body["messages"]
    assert follow_up[2] == {"role": "assistant",
                            "content": "Sure! Here is the plan: install, build, test."}
    assert first.error in follow_up[3]["content"]
    # The hash names the question, not the follow-ups.
    blob = json.dumps(double.chats[0].body["messages"], sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    assert result.prompt_sha256 == hashlib.sha256(blob.encode()).hexdigest()


@pytest.mark.parametrize("answer, error", [
    (CYCLE, "dependency cycle"),
    (json.dumps({"rationale": "", "items": []}), "items: List should have at least 1 item"),
    (json.dumps({"items": [{"id": "a", "run": "true", "depends_on": ["ghost"]}]}),
     "unknown work item 'ghost'"),
    (json.dumps({"items": [{"id": "a", "run": "true"}, {"id": "a", "run": "false"}]}),
     "duplicate id 'a'"),
    (json.dumps({"items": [{"id": "a", "run": "true", "call": "m:f"}]}),
     "needs exactly one of 'run'"),
])
def test_a_model_that_never_answers_a_valid_plan_ends_in_a_planner_error_after_the_attempts(
        answer: str, error: str) -> None:
    with OllamaDouble([answer] * 5) as double:
        with pytest.raises(PlannerError) as err:
            plan(goal_only(double.url, attempts=3))
    assert len(double.chats) == 3
    message = str(err.value)
    assert "3 attempt(s)" in message and error in message
    assert error in double.chats[2].body["messages"][-1]["content"]


def test_on_replanning_the_prompt_contains_the_failed_gates_and_items_with_their_output() -> None:
    failure = FailureContext(
        task_id=TASK, iteration=1,
        failed_gates=[FailedGate(name="tests", exit_code=1,
                                 stdout_tail="FAILED test_app.py::test_sum\nAssertionError: 1 != 2")],
        failed_items=[FailedItem(id="build", status="failed", exit_code=2,
                                 stderr_tail="make: *** [all] Error 2")],
    )
    with OllamaDouble([THREE_ITEMS]) as double:
        result = plan(goal_only(double.url), failure=failure, iteration=2)
    assert result.failure == failure
    prompt = double.prompts[0]
    for part in ("gate tests (exit code 1)", "AssertionError: 1 != 2",
                 "work item build: failed, exit code 2", "make: *** [all] Error 2",
                 "iteration 2 of at most 20", "Iteration 1 failed."):
        assert part in prompt


def test_a_model_too_slow_for_the_timeout_ends_in_a_planner_error_that_names_the_time() -> None:
    with OllamaDouble([Reply(THREE_ITEMS, delay_s=30)] * 2) as double:
        with pytest.raises(PlannerError) as err:
            plan(goal_only(double.url, attempts=2), timeout_s=0.3)
        assert len(double.chats) == 2
    assert "no answer within 0.3 s" in str(err.value)
    assert "2 attempt(s)" in str(err.value)


def test_an_unreachable_ollama_is_one_sentence_naming_the_host_the_model_and_ollama_serve() -> None:
    with closed_port() as url:
        with pytest.raises(LLMError) as err:
            plan(goal_only(url, model="llama3.2"))
    message = str(err.value)
    assert message == (f"cannot reach Ollama at {url} for model 'llama3.2': start it with "
                       "`ollama serve` (or set planner.host / OLLAMA_HOST)")
    assert (err.value.host, err.value.model) == (url, "llama3.2")


def test_a_missing_model_is_one_sentence_saying_ollama_pull() -> None:
    with OllamaDouble([THREE_ITEMS]) as double:
        with pytest.raises(LLMError) as err:
            plan(goal_only(double.url, model="qwen2.5:7b"))
    assert str(err.value) == f"Ollama at {double.url} has no model 'qwen2.5:7b': " \
                             "run `ollama pull qwen2.5:7b`"


def test_a_declarative_task_never_reaches_the_model() -> None:
    spec = TaskSpec(title="t", work_items=[{"id": "a", "run": "true"}])
    with pytest.raises(PlannerError, match="not planned by a model"):
        plan(spec)


# -- prompt work items -------------------------------------------------------------------


def ask(url: str, *, expect: str | dict[str, Any] | None = None, model: str = "scripted",
        failure: FailureContext | None = None, timeout_s: float = 30.0) -> WorkItemResult:
    item = WorkItemSpec(id="haiku", prompt="Write a haiku about queues.", expect=expect)
    assignment = WorkItemAssignment(task_id=TASK, iteration=1, item=item, workdir="/tmp",
                                    failure=failure)
    planner = PlannerSpec(strategy="ollama", model=model, host=url)
    runner = PromptRunner(timeout_s=timeout_s)
    return asyncio.run(runner.run(assignment, planner=planner, agent_id="executor-1"))


HAIKU = "Messages wait in line\nconsumers wake one by one\nthe queue empties out"


def test_an_answer_that_matches_the_expected_regex_succeeds_with_the_answer_as_output() -> None:
    with OllamaDouble([HAIKU]) as double:
        result = ask(double.url, expect=r"queue")
    assert result.status == "succeeded" and result.error is None
    assert result.output == HAIKU and result.stdout_tail == HAIKU
    digest = hashlib.sha256(HAIKU.encode()).hexdigest()[:12]
    assert result.evidence[:2] == ["model: scripted", f"answer sha256:{digest}"]
    assert result.commands_run == ["prompt scripted"]
    assert result.agent_id == "executor-1"
    assert result.started_at <= result.finished_at and result.duration_s >= 0
    assert "format" not in double.chats[0].body
    assert double.prompts == ["Write a haiku about queues."]


def test_an_answer_that_does_not_match_the_expected_regex_fails_with_the_reason() -> None:
    with OllamaDouble([HAIKU]) as double:
        result = ask(double.url, expect=r"^\d+$")
    assert result.status == "failed"
    assert result.error == r"the answer does not match expect /^\d+$/"
    assert result.output == HAIKU


SCORE = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0}},
         "required": ["score"]}


def test_an_answer_valid_against_the_expected_schema_is_stored_as_parsed_json() -> None:
    with OllamaDouble(['{"score": 7}']) as double:
        result = ask(double.url, expect=SCORE)
    assert result.status == "succeeded"
    assert result.output == {"score": 7}
    assert double.chats[0].body["format"] == SCORE


@pytest.mark.parametrize("answer, reason", [
    ('{"score": "high"}', "at score: 'high' is not of type 'integer'"),
    ("{}", "'score' is a required property"),
    ("seven", "the answer is not JSON"),
])
def test_an_answer_invalid_against_the_expected_schema_fails_with_the_validation_error(
        answer: str, reason: str) -> None:
    with OllamaDouble([answer]) as double:
        result = ask(double.url, expect=SCORE)
    assert result.status == "failed"
    assert result.error is not None and reason in result.error


def test_a_prompt_item_sees_the_failure_context_of_the_last_iteration() -> None:
    failure = FailureContext(task_id=TASK, iteration=1, failed_gates=[
        FailedGate(name="lint", exit_code=1, stdout_tail="E501 line too long")])
    with OllamaDouble([HAIKU]) as double:
        ask(double.url, failure=failure)
    assert "gate lint" in double.prompts[0] and "E501 line too long" in double.prompts[0]


def test_a_prompt_item_with_ollama_unreachable_is_an_error_with_one_sentence() -> None:
    with closed_port() as url:
        result = ask(url)
    assert result.status == "error"
    assert result.error is not None and result.error.startswith(f"cannot reach Ollama at {url}")
    assert "`ollama serve`" in result.error


def test_a_prompt_item_whose_model_is_missing_is_an_error_saying_ollama_pull() -> None:
    with OllamaDouble([HAIKU]) as double:
        result = ask(double.url, model="absent")
    assert (result.status, result.error) == \
        ("error", f"Ollama at {double.url} has no model 'absent': run `ollama pull absent`")


def test_a_prompt_item_whose_model_is_too_slow_times_out() -> None:
    with OllamaDouble([Reply(HAIKU, delay_s=30)]) as double:
        result = ask(double.url, timeout_s=0.2)
    assert (result.status, result.error) == ("timeout", "no answer within 0.2 s")


def test_a_broken_expect_regex_is_an_error_before_the_model_is_asked() -> None:
    with OllamaDouble([HAIKU]) as double:
        result = ask(double.url, expect="(unclosed")
    assert result.status == "error"
    assert result.error is not None and "not a valid regular expression" in result.error
    assert double.chats == []
