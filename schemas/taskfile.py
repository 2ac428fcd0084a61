"""Reading a task file (YAML or JSON) into a TaskSpec, with errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import TaskFileError, validation_problems
from .task import TaskSpec


def load_task_file(path: str | Path, *, planner: dict[str, Any] | None = None) -> TaskSpec:
    """Parse and validate a task file; its ``workdir`` is made absolute relative to the file.

    ``planner`` overrides fields of the file's ``planner`` (``--planner ollama --model x``)
    before validation. Raises TaskFileError (never a traceback for a user mistake).
    """
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(shown, ["no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(shown, [f"cannot be read: {exc}"]) from None
    try:
        # JSON is nearly a subset of YAML, but YAML refuses tab indentation.
        data = json.loads(text) if _looks_like_json(path, text) else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise TaskFileError(shown, [f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TaskFileError(shown, [f"{where}not valid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise TaskFileError(shown, ["the file must hold a mapping with at least a 'title'"])
    if planner:
        given = data.get("planner") if isinstance(data.get("planner"), dict) else {}
        data["planner"] = {**given, **planner}
    workdir = Path(str(data.get("workdir") or "."))
    if not workdir.is_absolute():
        data["workdir"] = str((path.resolve().parent / workdir).resolve())
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as exc:
        raise TaskFileError(shown, validation_problems(exc)) from None


def _looks_like_json(path: Path, text: str) -> bool:
    return path.suffix.lower() == ".json" or text.lstrip().startswith("{")
