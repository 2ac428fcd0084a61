"""``python actors/_callrunner.py pkg.module:function``: call a function in a child process.

Keyword arguments come as a JSON object on stdin; the return value goes as JSON to the
file named by ``$HIVEBUS_CALL_OUTPUT`` (stdout when unset). Exit codes: 0 returned,
1 raised (traceback on stderr), 2 bad target or arguments (one sentence on stderr).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from typing import Any

OUTPUT_ENV = "HIVEBUS_CALL_OUTPUT"


class _BadTarget(Exception):
    """The target or its arguments are unusable; str() is the sentence to print."""


def _resolve(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise _BadTarget(f"{target!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing target module is a bad target; a module that fails to import
        # one of its own dependencies is a bug in the task, shown with its traceback.
        if exc.name is None or (module_name + ".").startswith(exc.name + "."):
            raise _BadTarget(f"no module named {module_name!r} (cwd: {os.getcwd()})") from None
        raise
    try:
        func = getattr(module, attr)
    except AttributeError:
        raise _BadTarget(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(func):
        raise _BadTarget(f"{target} is not callable (it is {type(func).__name__!r})")
    return func


def _read_kwargs() -> dict[str, Any]:
    raw = sys.stdin.read()
    try:
        kwargs = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        raise _BadTarget(f"the arguments on stdin are not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise _BadTarget("the arguments on stdin must be a JSON object of keyword arguments")
    return kwargs


def _call(func: Any, kwargs: dict[str, Any]) -> Any:
    result = func(**kwargs)
    if hasattr(result, "__await__"):
        # Imported here: asyncio (with ssl and concurrent.futures) costs ~30 ms at start-up,
        # which every synchronous call item would pay for nothing.
        import asyncio

        async def _await() -> Any:
            return await result

        result = asyncio.run(_await())
    return result


def _write(result: Any) -> None:
    text = json.dumps(result, default=str)
    path = os.environ.get(OUTPUT_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)


def main(argv: list[str]) -> int:
    """Run the call; returns the process exit code."""
    if len(argv) != 1:
        print("usage: _callrunner.py package.module:function", file=sys.stderr)
        return 2
    cwd = os.getcwd()
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run as a file: our own folder would shadow the task's modules
    if sys.path[:1] != [cwd]:
        sys.path.insert(0, cwd)  # a task's own modules import ahead of installed ones
    try:
        kwargs = _read_kwargs()
        func = _resolve(argv[0])
    except _BadTarget as exc:
        print(exc, file=sys.stderr)
        return 2
    except BaseException:  # the target module raised while importing
        traceback.print_exc()
        return 1
    try:
        result = _call(func, kwargs)
    except SystemExit as exc:
        if exc.code not in (0, None):
            traceback.print_exc()
            return 1
        result = None
    except BaseException:
        traceback.print_exc()
        return 1
    _write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
