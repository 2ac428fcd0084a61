"""The executor's plain-Python core: run one attempt of one work item in a sandboxed child."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from typing import Any

from schemas.task import ResourceSpec
from schemas.work import TAIL_CHARS, ItemStatus, WorkItemAssignment, WorkItemResult

from ._callrunner import OUTPUT_ENV
from .limits import Limits, describe
from .warm import WARM_PREFIX, RunnerGone, WarmRunner, warm_key
from .sandbox import (
    ChildOutcome,
    ChildSpec,
    call_argv,
    changed_files,
    run_child,
    shell_argv,
    snapshot_files,
)

#: Lines of output that summarise a test run: pytest, unittest, cargo, jest/vitest.
_TEST_SUMMARY = (
    re.compile(
        r"\b\d+ (?:passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b"
        r".*\bin \d+(?:\.\d+)?s\b"
    ),
    re.compile(r"^Ran \d+ tests? in "),
    re.compile(r"^test result: (?:ok|FAILED)\. \d+ passed"),
    re.compile(r"^Tests?:\s+.*\b\d+ total\b"),
)


def _test_summaries(*texts: str) -> list[str]:
    """The lines of ``texts`` that look like a test runner's summary, trimmed."""
    found = []
    for text in texts:
        for line in text.splitlines():
            line = line.strip().strip("=").strip()
            if any(p.search(line) for p in _TEST_SUMMARY):
                found.append(line)
    return found


class ExecutorCore:
    """Runs work-item attempts as child processes; knows which ones are running.

    Each attempt's process tree is held to the item's ``resources``; a field the item
    leaves unset takes ``default_resources`` (the pool's per-agent limits), and an unset
    max_procs there takes limits.DEFAULT_MAX_PROCS.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        node_id: str = "",
        default_timeout_s: float = 3600.0,
        default_resources: ResourceSpec | None = None,
        scratch_dir: str,
    ):
        self.agent_id = agent_id
        self.node_id = node_id
        self.default_timeout_s = default_timeout_s
        self.default_resources = default_resources or ResourceSpec()
        self.scratch_dir = scratch_dir
        self._running: dict[str, tuple[str, asyncio.Event]] = {}
        #: The warm call runner of the latest call item, kept for the task's next one.
        self._warm: WarmRunner | None = None
        self._warm_idle: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[int | None]] = set()  # runners being stopped

    @property
    def running(self) -> list[str]:
        """Idempotency keys of the attempts running now."""
        return list(self._running)

    #: A warm runner nobody called for this long is stopped (its memory comes back).
    warm_idle_s = 30.0

    def cancel(self, task_id: str) -> int:
        """Cancel every running attempt of ``task_id``; returns how many were running."""
        events = [event for tid, event in self._running.values() if tid == task_id]
        for event in events:
            event.set()
        if self._warm is not None and self._warm.key.task_id == task_id and not events:
            self._stop_warm()
        return len(events)

    async def close(self) -> None:
        """Stop the warm runner, if there is one (the executor is stopping)."""
        if self._warm_idle is not None:
            self._warm_idle.cancel()
        runner, self._warm = self._warm, None
        if runner is not None:
            await runner.close()
        if self._closing:
            await asyncio.wait(self._closing)

    def _stop_warm(self) -> None:
        runner, self._warm = self._warm, None
        if runner is not None:
            # Held until done: the loop keeps only a weak reference to a task.
            closing = asyncio.get_running_loop().create_task(runner.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _warm_runner(self, assignment: WorkItemAssignment, limits: Limits,
                           env: dict[str, str]) -> WarmRunner:
        """The runner for this call: the one kept from the last call if it fits, else new."""
        key = warm_key(assignment.task_id, assignment.workdir, limits)
        if self._warm_idle is not None:
            self._warm_idle.cancel()
            self._warm_idle = None
        runner = self._warm
        if runner is not None and (runner.key != key or not runner.alive):
            self._warm = None
            await runner.close()
            runner = None
        if runner is None:
            runner = WarmRunner(key, scratch_dir=self.scratch_dir)
            await runner.start(env)
            self._warm = runner
        return runner

    async def run(self, assignment: WorkItemAssignment) -> WorkItemResult:
        """Run one attempt of ``assignment.item`` in ``assignment.workdir``."""
        workdir = assignment.workdir
        if not os.path.isdir(workdir):
            return self._result(
                assignment, status="error",
                error=f"workdir {workdir} does not exist or is not a directory",
            )
        # The usual attempt (the only one running) keeps its files in the scratch folder
        # itself, emptied afterwards: a temporary folder per attempt costs more than a
        # no-op item.
        shared = not self._running
        try:
            if shared:
                os.makedirs(self.scratch_dir, exist_ok=True)
                scratch = self.scratch_dir
            else:
                scratch = tempfile.mkdtemp(prefix="item-", dir=self.scratch_dir)
        except OSError as exc:
            return self._result(
                assignment, status="error",
                error=f"cannot create scratch files in {self.scratch_dir}: {exc.strerror or exc}",
            )
        key = assignment.idempotency_key
        cancel = asyncio.Event()
        self._running[key] = (assignment.task_id, cancel)
        try:
            return await self._attempt(assignment, scratch, cancel)
        finally:
            self._running.pop(key, None)
            if shared:
                _empty(scratch)
            else:
                shutil.rmtree(scratch, ignore_errors=True)

    async def _attempt(
        self, assignment: WorkItemAssignment, scratch: str, cancel: asyncio.Event
    ) -> WorkItemResult:
        item = assignment.item
        handoff = os.path.join(scratch, "handoff.md")
        env = {
            **os.environ,
            **assignment.env,
            "HIVEBUS_TASK_ID": assignment.task_id,
            "HIVEBUS_ITERATION": str(assignment.iteration),
            "HIVEBUS_WORK_ITEM": item.id,
            "HIVEBUS_ATTEMPT": str(assignment.attempt),
            "HIVEBUS_HANDOFF": handoff,
        }
        if assignment.failure is not None:
            path = os.path.join(scratch, "failure_context.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(assignment.failure.model_dump(mode="json"), f)
            env["HIVEBUS_FAILURE_CONTEXT"] = path
        output_path = os.path.join(scratch, "call_output.json")
        stdin: bytes | None = None
        if item.call is not None:
            env[OUTPUT_ENV] = output_path
            argv, command = call_argv(item.call), f"call {item.call}"
            stdin = json.dumps(item.args).encode()
        else:
            assert item.run is not None
            argv, command = shell_argv(item.run), item.run
        timeout = item.timeout_s or self.default_timeout_s
        limits = Limits.from_resources(self._resources(assignment), timeout_s=timeout)

        # Inline, not in a thread: an executor runs one item at a time, and for the usual
        # workdir the walk costs less than handing it to a thread and back.
        before = snapshot_files(assignment.workdir)
        output: Any = None
        if item.call is not None and limits.cpu_seconds is None:
            # A CPU-seconds budget is per item, which a runner that lives on cannot keep
            # apart; such items get a cold child of their own.
            try:
                runner = await self._warm_runner(assignment, limits, env)
            except RunnerGone as exc:
                return self._result(assignment, status="error", error=str(exc))
            outcome, output = await runner.call(target=item.call, args=item.args, env=env,
                                                timeout_s=timeout, cancel=cancel)
            if runner.alive:
                self._warm_idle = asyncio.get_running_loop().call_later(
                    self.warm_idle_s, self._stop_warm)
            elif self._warm is runner:
                self._warm = None
        else:
            outcome = await run_child(
                ChildSpec(argv=argv, cwd=assignment.workdir, env=env, stdin=stdin, limits=limits),
                cancel=cancel,
            )
            if item.call is not None and outcome.exit_code == 0:
                output = _read_json(output_path)
        after = snapshot_files(assignment.workdir)
        files = changed_files(before, after)

        status, error = _status(outcome, timeout, item.call)
        if status != "succeeded":
            output = None
        tests = _test_summaries(outcome.stdout_tail, outcome.stderr_tail)
        evidence = []
        if outcome.exit_code is not None:
            evidence.append(f"exit code {outcome.exit_code}")
        digest = hashlib.sha256(outcome.stdout_tail.encode()).hexdigest()[:12]
        evidence += [f"stdout sha256:{digest}", f"files changed: {len(files)}", *tests]
        return self._result(
            assignment,
            status=status,
            error=error,
            exit_code=outcome.exit_code,
            stdout_tail=outcome.stdout_tail,
            stderr_tail=outcome.stderr_tail,
            output=output,
            started_at=outcome.started_at,
            finished_at=outcome.finished_at,
            duration_s=outcome.duration_s,
            files_changed=files,
            commands_run=[command],
            tests_run=tests,
            evidence=evidence,
            handoff_notes=_read_head(handoff),
            peak_rss_mb=outcome.peak_rss_mb,
            peak_rss_at=outcome.peak_rss_at,
            cpu_seconds=outcome.cpu_seconds,
            limit=outcome.limit,
        )

    def _resources(self, assignment: WorkItemAssignment) -> ResourceSpec:
        """The item's resources, each unset field taken from default_resources."""
        given = assignment.resources.model_dump(exclude_none=True)
        return self.default_resources.model_copy(update=given)

    def _result(self, assignment: WorkItemAssignment, **fields: Any) -> WorkItemResult:
        return WorkItemResult(
            task_id=assignment.task_id,
            iteration=assignment.iteration,
            item_id=assignment.item.id,
            attempt=assignment.attempt,
            agent_id=self.agent_id,
            node_id=self.node_id,
            **fields,
        )


def _status(
    outcome: ChildOutcome, timeout_s: float, call: str | None
) -> tuple[ItemStatus, str | None]:
    if outcome.error is not None:
        return "error", outcome.error
    if outcome.canceled:
        return "canceled", "canceled while running; its process tree was killed"
    if outcome.limit is not None and outcome.limit.limit != "timeout":
        return "resource_limit", describe(outcome.limit)
    if outcome.timed_out:
        return "timeout", f"timed out after {timeout_s:g} s; its process tree was killed"
    code = outcome.exit_code
    if code == 0:
        return "succeeded", None
    if call is not None and code == 2:
        return "error", _last_line(outcome.stderr_tail) or f"cannot call {call}"
    if call is not None and code == 1:
        return "failed", f"{call} raised {_last_line(outcome.stderr_tail)}".rstrip()
    if code is not None and code < 0:
        return "failed", f"killed by signal {_signal_name(-code)}"
    return "failed", f"exited with code {code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _empty(folder: str) -> None:
    """Remove what an attempt left in the scratch folder (warm runners keep theirs)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(WARM_PREFIX) and entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _read_head(path: str) -> str:
    """The first TAIL_CHARS characters of a file the child may have written."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(TAIL_CHARS)
    except FileNotFoundError:
        return ""


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
