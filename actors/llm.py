"""The LLM cores: a planner and a prompt-item runner that ask a model through Ollama.

Both speak to Ollama with the official ``ollama`` client. A model's plan is a typed
answer: it is validated by pydantic and by the same DAG rules as a task file, and an
invalid answer goes back to the model with the errors, a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import ollama
from pydantic import Field, ValidationError

from schemas.errors import validation_problems
from schemas import (
    FailureContext,
    HivebusError,
    Model,
    Plan,
    PlanAttempt,
    PlannerSpec,
    PlanRequest,
    TaskSpec,
    WorkItemAssignment,
    WorkItemResult,
    WorkItemSpec,
    dag_problems,
    utcnow,
)
from schemas.work import TAIL_CHARS, ItemStatus

from .planner import PlannerError

DEFAULT_HOST = "http://127.0.0.1:11434"
_DEFAULT_PORT = 11434
#: How much of a refused answer a PlanAttempt keeps.
_EXCERPT_CHARS = 500


class LLMError(HivebusError):
    """Ollama cannot serve the model: not reachable, no such model, or no model named."""

    def __init__(self, message: str, *, host: str, model: str | None):
        self.host = host
        self.model = model
        super().__init__(message)


def ollama_settings(spec: PlannerSpec, *,
                    environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The Ollama host URL and the model name for ``spec``.

    The task's ``planner.host`` / ``planner.model`` win, then ``$OLLAMA_HOST`` /
    ``$HIVEBUS_OLLAMA_MODEL``; the host defaults to Ollama's own default.
    """
    env = os.environ if environ is None else environ
    host = _normalise_host(spec.host or env.get("OLLAMA_HOST") or DEFAULT_HOST)
    model = spec.model or env.get("HIVEBUS_OLLAMA_MODEL")
    if not model:
        raise LLMError("no model: set planner.model in the task, HIVEBUS_OLLAMA_MODEL, or --model",
                       host=host, model=None)
    return host, model


def _normalise_host(raw: str) -> str:
    """``host:port`` as Ollama accepts it in OLLAMA_HOST, as a URL with scheme and port."""
    raw = raw.strip().rstrip("/")
    if "://" in raw:
        return raw
    parts = urlsplit(f"http://{raw}")
    netloc = parts.netloc if parts.port is not None else f"{parts.netloc}:{_DEFAULT_PORT}"
    return f"http://{netloc}{parts.path}"


class _NoAnswer(Exception):
    """The model did not answer within the client timeout."""


class _BadItem(Exception):
    """A prompt item that cannot be asked: not a prompt, or an ``expect`` that is broken."""


async def _chat(*, host: str, model: str, timeout_s: float, messages: list[dict[str, str]],
                format: dict[str, Any] | None, options: Mapping[str, Any]) -> str:
    """The model's answer to ``messages``; Ollama's failures as one-sentence LLMErrors."""
    try:
        async with ollama.AsyncClient(host=host, timeout=timeout_s) as client:
            response = await client.chat(model=model, messages=messages, format=format,
                                         options=dict(options) or None)
    except httpx.ConnectTimeout:
        raise _unreachable(host, model) from None
    except httpx.TimeoutException:
        raise _NoAnswer from None
    except ConnectionError:  # the ollama client's translation of httpx.ConnectError
        raise _unreachable(host, model) from None
    except httpx.TransportError as exc:
        raise LLMError(
            f"the connection to Ollama at {host} broke while asking model {model!r} "
            f"({exc.__class__.__name__}): check that `ollama serve` is running there",
            host=host, model=model) from None
    except ollama.ResponseError as exc:
        raise _refused(host, model, exc) from None
    except (ValidationError, json.JSONDecodeError):
        raise LLMError(
            f"{host} did not answer like Ollama's /api/chat for model {model!r}: "
            "check planner.host or OLLAMA_HOST", host=host, model=model) from None
    return response.message.content or ""


def _unreachable(host: str, model: str) -> LLMError:
    return LLMError(f"cannot reach Ollama at {host} for model {model!r}: "
                    "start it with `ollama serve` (or set planner.host / OLLAMA_HOST)",
                    host=host, model=model)


def _refused(host: str, model: str, exc: ollama.ResponseError) -> LLMError:
    reason = str(exc.error).strip()
    if exc.status_code == 404 and "model" in reason.lower():
        return LLMError(f"Ollama at {host} has no model {model!r}: run `ollama pull {model}`",
                        host=host, model=model)
    if exc.status_code == 404:
        return LLMError(f"{host} has no Ollama API (HTTP 404 on /api/chat) for model {model!r}: "
                        "check planner.host or OLLAMA_HOST", host=host, model=model)
    return LLMError(f"Ollama at {host} refused to run model {model!r} "
                    f"(HTTP {exc.status_code}: {reason})", host=host, model=model)


# -- the planner -------------------------------------------------------------------------


class PlanAnswer(Model):
    """What the planner asks the model for; its JSON Schema is the chat's ``format``."""

    rationale: str = Field(default="", description="why these items, in a few sentences")
    items: list[WorkItemSpec] = Field(
        min_length=1, description="the work items of this iteration, a dependency DAG")


_PLANNER_SYSTEM = """\
You are the planner of hivebus, a system that runs tasks as work items on a pool of \
executors and then runs quality gates. Break the task below into the work items of one \
iteration.

Answer with exactly one JSON object, nothing else: {"rationale": "...", "items": [...]}.
Each item has a unique "id" (letters, digits, '.', '_' or '-'; at most 64 characters) and \
exactly one of:
- "run": a shell command, run with /bin/sh -c in the workdir;
- "call": "package.module:function" with "args": {...};
- "prompt": a question for the language model, optionally with "expect" (a regex or a \
JSON Schema the answer must meet);
- "subtask": a child task with its own "title", "description" and "gates".
"depends_on" lists ids of items of this same plan that must succeed first; no cycles. \
Independent items run in parallel. Optional: "description", "timeout_s", "retries", \
"env", "resources" ({"cpu", "memory_mb"}).
After the items, the gates run; the task is done only when every gate passes."""


def planner_messages(request: PlanRequest) -> list[dict[str, str]]:
    """The system and user messages that ask the model for ``request``'s plan."""
    spec = request.spec
    parts = [f"Task: {spec.title}"]
    if spec.description:
        parts.append(f"Description:\n{spec.description}")
    parts.append(f"Workdir (shell items run here): {spec.workdir}")
    if spec.env:
        parts.append("Environment variables set for every item: " + ", ".join(sorted(spec.env)))
    parts.append(_gates_text(spec))
    if spec.work_items:
        parts.append("Work items the task file suggests (keep, change or replace them):\n"
                     + _items_json(spec.work_items))
    if spec.on_gate_failure:
        parts.append("Items the task file suggests when a gate fails:\n"
                     + _items_json(spec.on_gate_failure))
    parts.append(f"This is iteration {request.iteration} of at most {spec.max_iterations}.")
    if request.failure is not None:
        parts.append(failure_text(request.failure))
        parts.append("Plan the next iteration so that the failed gates pass: fix the cause "
                     "first, then run again what failed.")
    return [{"role": "system", "content": _PLANNER_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)}]


def _gates_text(spec: TaskSpec) -> str:
    if not spec.gates:
        return "Gates: none; the work items themselves must succeed."
    lines = ["Gates (run after the work items, in the workdir; each must pass):"]
    for gate in spec.gates:
        if gate.builtin == "doctor":
            lines.append(f"- {gate.name}: built-in check that the workdir exists and is "
                         "writable and that the gates' commands are on PATH")
        else:
            lines.append(f"- {gate.name}: `{gate.run}` must exit 0")
    return "\n".join(lines)


def _items_json(items: list[WorkItemSpec]) -> str:
    return json.dumps([item.model_dump(mode="json", exclude_defaults=True) for item in items],
                      indent=1)


def failure_text(failure: FailureContext) -> str:
    """The failure context as prompt text: every failed gate and item with its output tails."""
    lines = [f"Iteration {failure.iteration} failed."]
    if failure.failed_gates:
        lines.append("Failed gates:")
        for gate in failure.failed_gates:
            code = "" if gate.exit_code is None else f" (exit code {gate.exit_code})"
            lines.append(f"- gate {gate.name}{code}")
            lines += [f"  problem: {p}" for p in gate.problems]
            lines += _tails(gate.stdout_tail, gate.stderr_tail)
    if failure.failed_items:
        lines.append("Failed work items:")
        for item in failure.failed_items:
            code = "" if item.exit_code is None else f", exit code {item.exit_code}"
            lines.append(f"- work item {item.id}: {item.status}{code}")
            if item.error:
                lines.append(f"  error: {item.error}")
            lines += _tails(item.stdout_tail, item.stderr_tail)
    return "\n".join(lines)


def _tails(stdout: str, stderr: str) -> list[str]:
    lines = []
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if text.strip():
            lines.append(f"  {name} tail:\n```\n{text.rstrip()}\n```")
    return lines


def _prompt_sha256(messages: list[dict[str, str]]) -> str:
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class OllamaPlanner:
    """Plans with a model through Ollama; refuses and re-asks until a plan is valid.

    Every answer is checked like a task file's work items (schema, unique ids, known
    dependencies, no cycles). An invalid answer goes back to the model with the
    errors, up to ``planner.attempts`` answers in all; a model that does not answer
    within ``timeout_s`` uses up an attempt too.
    """

    strategy = "ollama"

    def __init__(self, *, agent_id: str = "", timeout_s: float = 120.0,
                 environ: Mapping[str, str] | None = None):
        self.agent_id = agent_id
        self.timeout_s = timeout_s
        self.environ = environ

    async def plan(self, request: PlanRequest) -> Plan:
        """The plan of one iteration.

        Raises ``PlannerError`` when no valid plan came in ``attempts`` answers and
        ``LLMError`` when Ollama or the model is not there.
        """
        planner = request.spec.planner
        if planner.strategy != self.strategy:
            raise PlannerError(f"planner strategy {planner.strategy!r} is not planned by a model; "
                               "use planner: {strategy: ollama, model: NAME}")
        host, model = ollama_settings(planner, environ=self.environ)
        initial = planner_messages(request)
        messages = list(initial)
        schema = PlanAnswer.model_json_schema()
        attempts: list[PlanAttempt] = []
        error = ""
        for number in range(1, planner.attempts + 1):
            started = time.perf_counter()
            try:
                text = await _chat(host=host, model=model, timeout_s=self.timeout_s,
                                   messages=messages, format=schema, options=planner.options)
            except _NoAnswer:
                error = f"no answer within {self.timeout_s:g} s"
                attempts.append(PlanAttempt(attempt=number, ok=False, error=error,
                                            duration_s=time.perf_counter() - started))
                continue
            answer, error = _check_plan(text)
            attempts.append(PlanAttempt(attempt=number, ok=answer is not None,
                                        error=error or None, answer_excerpt=text[:_EXCERPT_CHARS],
                                        duration_s=time.perf_counter() - started))
            if answer is not None:
                return Plan(task_id=request.task_id, iteration=request.iteration,
                            strategy=self.strategy, items=answer.items,
                            rationale=answer.rationale, failure=request.failure,
                            planner_id=self.agent_id, model=model,
                            prompt_sha256=_prompt_sha256(initial), attempts=attempts)
            messages += [
                {"role": "assistant", "content": text},
                {"role": "user", "content": (
                    f"That answer was refused: {error}. Answer again with the whole plan as "
                    'one JSON object {"rationale": ..., "items": [...]} that fixes every '
                    "problem.")},
            ]
        raise PlannerError(f"model {model!r} at {host} gave no valid plan in "
                           f"{planner.attempts} attempt(s); the last error: {error}")


def _check_plan(text: str) -> tuple[PlanAnswer | None, str]:
    """The answer as a valid plan, or None and every problem in one line."""
    try:
        data = json.loads(_strip_fence(text))
    except json.JSONDecodeError as exc:
        return None, (f"the answer is not JSON ({exc.msg} at line {exc.lineno}, "
                      f"column {exc.colno})")
    try:
        answer = PlanAnswer.model_validate(data)
    except ValidationError as exc:
        return None, "the answer does not fit the plan schema: " + "; ".join(validation_problems(exc))
    problems = dag_problems(answer.items, field="items")
    if problems:
        return None, "the plan is not a valid DAG: " + "; ".join(problems)
    return answer, ""


def _strip_fence(text: str) -> str:
    """Text without one surrounding Markdown code fence, which some models add anyway."""
    match = re.fullmatch(r"\s*```[A-Za-z]*\n(.*?)\n?```\s*", text, re.DOTALL)
    return match.group(1) if match else text


# -- prompt work items -------------------------------------------------------------------


class PromptRunner:
    """Runs ``prompt`` work items: asks the model, checks the answer against ``expect``."""

    def __init__(self, *, timeout_s: float = 120.0, environ: Mapping[str, str] | None = None):
        self.timeout_s = timeout_s
        self.environ = environ

    async def run(self, assignment: WorkItemAssignment, *, planner: PlannerSpec,
                  agent_id: str = "") -> WorkItemResult:
        """One attempt of a prompt item, as the executor reports every item."""
        item = assignment.item
        started_at, started = utcnow(), time.perf_counter()
        model = planner.model or ""
        fields: dict[str, Any]
        try:
            if item.prompt is None:
                raise _BadItem(f"work item {item.id!r} is a {item.kind} item, not a prompt item")
            host, model = ollama_settings(planner, environ=self.environ)
            fields = await self._ask(assignment, host=host, model=model, planner=planner)
        except (LLMError, _BadItem) as exc:
            fields = {"status": "error", "error": str(exc)}
        return WorkItemResult(
            task_id=assignment.task_id, iteration=assignment.iteration, item_id=item.id,
            attempt=assignment.attempt, started_at=started_at, finished_at=utcnow(),
            duration_s=time.perf_counter() - started, agent_id=agent_id,
            commands_run=[f"prompt {model}".rstrip()], **fields,
        )

    async def _ask(self, assignment: WorkItemAssignment, *, host: str, model: str,
                   planner: PlannerSpec) -> dict[str, Any]:
        item = assignment.item
        assert item.prompt is not None
        expect = item.expect
        validator = _schema_validator(item.id, expect) if isinstance(expect, dict) else None
        pattern = _regex(item.id, expect) if isinstance(expect, str) else None
        content = item.prompt
        if assignment.failure is not None:
            content += "\n\nThe previous iteration failed; take this into account.\n"
            content += failure_text(assignment.failure)
        timeout = item.timeout_s or self.timeout_s
        try:
            text = await _chat(host=host, model=model, timeout_s=timeout,
                               messages=[{"role": "user", "content": content}],
                               format=expect if isinstance(expect, dict) else None,
                               options=planner.options)
        except _NoAnswer:
            return {"status": "timeout", "error": f"no answer within {timeout:g} s",
                    "evidence": [f"model: {model}"]}
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        evidence = [f"model: {model}", f"answer sha256:{digest}", f"answer: {len(text)} chars"]
        status: ItemStatus = "succeeded"
        error: str | None = None
        output: Any = text
        if pattern is not None:
            if pattern.search(text):
                evidence.append(f"expect /{pattern.pattern}/ matched")
            else:
                status, error = "failed", f"the answer does not match expect /{pattern.pattern}/"
        elif validator is not None:
            output, error = _validate_json(text, validator)
            if error:
                status = "failed"
            else:
                evidence.append("expect: the answer is valid against the JSON Schema")
        return {"status": status, "error": error, "output": output,
                "stdout_tail": text[-TAIL_CHARS:], "evidence": evidence}


def _regex(item_id: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise _BadItem(f"work item {item_id!r}: expect /{pattern}/ is not a valid "
                         f"regular expression: {exc}") from None


def _schema_validator(item_id: str, schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise _BadItem(f"work item {item_id!r}: expect is not a valid JSON Schema: "
                         f"{exc.message}") from None
    return cls(schema)


def _validate_json(text: str, validator: jsonschema.protocols.Validator) -> tuple[Any, str | None]:
    """The answer parsed, and why it does not meet the schema (None when it does)."""
    try:
        data = json.loads(_strip_fence(text))
    except json.JSONDecodeError as exc:
        return text, (f"the answer is not JSON ({exc.msg} at line {exc.lineno}, "
                      f"column {exc.colno}), so it does not meet the expect schema")
    best = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if best is None:
        return data, None
    where = "/".join(str(p) for p in best.absolute_path) or "the answer"
    return data, f"the answer does not meet the expect schema: at {where}: {best.message}"


__all__ = [
    "LLMError", "OllamaPlanner", "PromptRunner", "PlanAnswer",
    "ollama_settings", "planner_messages", "failure_text", "DEFAULT_HOST",
]
