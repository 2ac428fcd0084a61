"""``python actors/_callrunner.py pkg.module:function``: call a function in a child process.

Keyword arguments come as a JSON object on stdin; the return value goes as JSON to the
file named by ``$HIVEBUS_CALL_OUTPUT`` (stdout when unset). Exit codes: 0 returned,
1 raised (traceback on stderr), 2 bad target or arguments (one sentence on stderr).

``python actors/_callrunner.py --serve CAPTURE_DIR`` is the warm runner (actors/warm.py):
it answers call after call, each a length-prefixed JSON request on stdin and a reply on
stdout, with the same codes. Each call's stdout and stderr (its children's too) go to
files in CAPTURE_DIR, emptied before the call, whose tails come back in the reply.
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


# -- the warm runner ------------------------------------------------------------------

#: Characters of output kept per stream (schemas.work.TAIL_CHARS; the runner does not
#: import hivebus, whose imports would cost every runner's start-up).
_TAIL_CHARS = 4000
_TAIL_BYTES = 4 * _TAIL_CHARS + 4


class _Server:
    """One warm runner: modules stay imported between calls, so a call costs a call.

    What a call changes in the process (module globals, threads) stays for the next
    call, as in a Celery or arq worker; modules imported from the work directory are
    imported afresh when one of their files changed or the directory is another.
    """

    def __init__(self, capture_dir: str) -> None:
        # The protocol keeps the original pipes; fd 0 reads nothing, fds 1 and 2 write to
        # the capture files, so a call (and whatever it runs) cannot corrupt the replies.
        self.requests = os.fdopen(os.dup(0), "rb", buffering=0)
        self.replies = os.dup(1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        self.capture: list[tuple[int, int]] = []
        for fd, name in ((1, "stdout"), (2, "stderr")):
            path = os.path.join(capture_dir, name)
            writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.dup2(writer, fd)
            os.close(writer)
            self.capture.append((fd, os.open(path, os.O_RDONLY)))
        sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
        self.cwd = ""
        #: modules imported from the work directory -> (file, mtime_ns, size) at import
        self.local: dict[str, tuple[str, int, int]] = {}

    def serve(self) -> int:
        self._send({"ready": True})
        while True:
            head = self._read(4)
            if head is None:
                return 0  # the executor closed the pipe (or died): the runner goes too
            body = self._read(int.from_bytes(head, "big"))
            if body is None:
                return 0
            self._send(self.handle(json.loads(body)))

    def _send(self, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, default=str).encode()
        os.write(self.replies, len(data).to_bytes(4, "big") + data)

    def _read(self, n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            chunk = self.requests.read(left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        for fd, _ in self.capture:
            os.ftruncate(fd, 0)
        self._enter(request["cwd"], request["env"])
        cpu0 = _cpu_seconds()
        code, result = 0, None
        try:
            func = _resolve(request["target"])
            result = _call(func, request.get("args") or {})
        except _BadTarget as exc:
            print(exc, file=sys.stderr)
            code = 2
        except SystemExit as exc:
            if exc.code not in (0, None):
                traceback.print_exc()
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        self._remember_local()
        return {
            "code": code, "result": result if code == 0 else None,
            "cpu_seconds": round(_cpu_seconds() - cpu0, 6), "rss_bytes": _rss_bytes(),
            "children": _children(), "stdout": self._tail(0), "stderr": self._tail(1),
        }

    def _enter(self, cwd: str, env: dict[str, str]) -> None:
        """The call's directory, environment and import path; stale task modules dropped."""
        for name in [k for k in os.environ if k not in env]:
            del os.environ[name]
        for name, value in env.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        if cwd != self.cwd:
            os.chdir(cwd)
            if self.cwd and sys.path[:1] == [self.cwd]:
                sys.path[0] = cwd
            else:
                sys.path.insert(0, cwd)
            self.cwd = cwd
            self._forget_local()
        elif any(_stat(path) != (mtime, size) for path, mtime, size in self.local.values()):
            self._forget_local()

    def _forget_local(self) -> None:
        for name in self.local:
            sys.modules.pop(name, None)
        self.local.clear()
        importlib.invalidate_caches()

    def _remember_local(self) -> None:
        prefix = self.cwd.rstrip(os.sep) + os.sep
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if name not in self.local and path and path.startswith(prefix):
                self.local[name] = (path, *_stat(path))

    def _tail(self, which: int) -> str:
        reader = self.capture[which][1]
        size = os.fstat(reader).st_size
        start = max(0, size - _TAIL_BYTES)
        data = os.pread(reader, size - start, start)
        if start:  # drop the continuation bytes of a character cut in half
            data = data.lstrip(bytes(range(0x80, 0xC0)))
        return data.decode("utf-8", errors="replace")[-_TAIL_CHARS:]


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _children() -> int:
    """Processes the call left running (they would outlive it in the warm runner)."""
    count = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                count += len(f.read().split())
    except OSError:
        return 0
    return count


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"] and len(sys.argv) == 3:
        if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
            del sys.path[0]
        sys.exit(_Server(sys.argv[2]).serve())
    sys.exit(main(sys.argv[1:]))
