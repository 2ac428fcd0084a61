"""The task a user hands to hivebus: TaskSpec and its parts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Ident, Message, Model
from .dag import dag_problems

Priority = Literal["low", "normal", "high", "critical"]
RunMode = Literal["autonomous", "assisted"]

#: Larger is more urgent; the scheduler serves higher ranks first.
PRIORITY_RANK: dict[str, int] = {"low": 0, "normal": 1, "high": 2, "critical": 3}

Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
CallTarget = Annotated[
    str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
]


class ResourceSpec(Model):
    """What one work item may use. Unset fields take the executor pool's per-agent limit."""

    cpu: Annotated[float, Field(gt=0, le=1024)] | None = None
    memory_mb: Annotated[int, Field(gt=0, le=4 * 1024 * 1024)] | None = None
    cpu_seconds: Annotated[float, Field(gt=0)] | None = None
    max_procs: Annotated[int, Field(gt=0, le=100_000)] | None = None


class PlannerSpec(Model):
    """How a task is planned. ``declarative`` uses the task file's own work items."""

    strategy: Literal["declarative", "ollama"] = "declarative"
    model: str | None = None
    host: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    attempts: Annotated[int, Field(ge=1, le=20)] = 3


class WorkItemSpec(Model):
    """One unit of work, exactly one of: a shell command (``run``), a Python callable
    (``call`` with ``args``), a question to the task's LLM (``prompt``, answer checked by
    ``expect``: a regex or a JSON Schema), or a child task (``subtask``)."""

    id: Ident
    description: str = ""
    run: Annotated[str, Field(min_length=1)] | None = None
    call: CallTarget | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    prompt: Annotated[str, Field(min_length=1)] | None = None
    expect: str | dict[str, Any] | None = None
    subtask: TaskSpec | None = None
    depends_on: list[Ident] = Field(default_factory=list)
    timeout_s: Seconds | None = None
    retries: Annotated[int, Field(ge=0, le=20)] = 0
    env: dict[str, str] = Field(default_factory=dict)
    resources: ResourceSpec = Field(default_factory=ResourceSpec)

    @model_validator(mode="after")
    def _one_kind(self) -> WorkItemSpec:
        given = [k for k in ("run", "call", "prompt", "subtask") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"work item {self.id!r} needs exactly one of 'run' (a shell command), "
                "'call' (\"package.module:function\"), 'prompt' or 'subtask'"
                + (f"; it has {' and '.join(given)}" if given else "")
            )
        if self.args and self.call is None:
            raise ValueError(f"work item {self.id!r}: 'args' is only for 'call' items")
        if self.expect is not None and self.prompt is None:
            raise ValueError(f"work item {self.id!r}: 'expect' is only for 'prompt' items")
        return self

    @property
    def kind(self) -> Literal["shell", "call", "prompt", "subtask"]:
        if self.run is not None:
            return "shell"
        if self.call is not None:
            return "call"
        return "prompt" if self.prompt is not None else "subtask"


class GateSpec(Model):
    """A quality gate: a command that must exit 0, or the built-in ``doctor``.

    A gate written as just ``doctor`` (or ``{name: doctor}``) is the built-in check
    that the workdir exists and is writable and that the gates' commands are on PATH.
    """

    name: Ident
    run: Annotated[str, Field(min_length=1)] | None = None
    builtin: Literal["doctor"] | None = None
    timeout_s: Seconds | None = None
    env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"name": data}
        if isinstance(data, dict) and data.get("name") == "doctor":
            if data.get("run") is None and data.get("builtin") is None:
                data = {**data, "builtin": "doctor"}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> GateSpec:
        if (self.run is None) == (self.builtin is None):
            raise ValueError(
                f"gate {self.name!r} needs exactly one of 'run' (a command) or "
                "'builtin: doctor'"
            )
        return self


class TaskSpec(Message):
    """A task as a user writes it (task file, ``task.submit`` body, ``Hive.run``)."""

    type: Literal["TaskSpec"] = "TaskSpec"
    title: Annotated[str, Field(min_length=1, max_length=300)]
    description: str = ""
    priority: Priority = "normal"
    run_mode: RunMode = "autonomous"
    max_iterations: Annotated[int, Field(ge=1, le=1000)] = 20
    timeout_s: Seconds | None = None
    deadline: datetime | None = None
    workdir: str = "."
    env: dict[str, str] = Field(default_factory=dict)
    planner: PlannerSpec = Field(default_factory=PlannerSpec)
    gates: list[GateSpec] = Field(default_factory=list)
    work_items: list[WorkItemSpec] = Field(default_factory=list)
    on_gate_failure: list[WorkItemSpec] = Field(default_factory=list)
    #: Set by hivebus on a subtask: the task whose work item it is.
    parent_task: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{2,63}$")] | None = None

    @field_validator("deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("deadline needs a timezone, e.g. 2026-01-01T12:00:00Z")
        return value

    @model_validator(mode="after")
    def _plan_is_sound(self) -> TaskSpec:
        problems: list[str] = []
        if not self.work_items and not self.gates and self.planner.strategy == "declarative":
            problems.append(
                "work_items: a declarative task needs work items or gates "
                "(or planner.strategy: ollama with a description)"
            )
        problems += dag_problems(self.work_items, field="work_items")
        problems += dag_problems(self.on_gate_failure, field="on_gate_failure")
        main_ids = {item.id for item in self.work_items}
        for pos, item in enumerate(self.on_gate_failure):
            if item.id in main_ids:
                problems.append(
                    f"on_gate_failure[{pos}].id: {item.id!r} is also a work item id"
                )
        seen: set[str] = set()
        for pos, gate in enumerate(self.gates):
            if gate.name in seen:
                problems.append(f"gates[{pos}].name: duplicate gate {gate.name!r}")
            seen.add(gate.name)
        if problems:
            raise ValueError("; ".join(problems))
        return self


WorkItemSpec.model_rebuild()
