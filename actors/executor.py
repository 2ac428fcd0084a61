"""The executor's plain-Python core: run one attempt of one work item in a sandboxed child."""

from __future__ import annotations

import asyncio
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

    @property
    def running(self) -> list[str]:
        """Idempotency keys of the attempts running now."""
        return list(self._running)

    def cancel(self, task_id: str) -> int:
        """Cancel every running attempt of ``task_id``; returns how many were running."""
        events = [event for tid, event in self._running.values() if tid == task_id]
        for event in events:
            event.set()
        return len(events)

    async def run(self, assignment: WorkItemAssignment) -> WorkItemResult:
        """Run one attempt of ``assignment.item`` in ``assignment.workdir``."""
        workdir = assignment.workdir
        if not os.path.isdir(workdir):
            return self._result(
                assignment, status="error",
                error=f"workdir {workdir} does not exist or is not a directory",
            )
        try:
            os.makedirs(self.scratch_dir, exist_ok=True)
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
        outcome = await run_child(
            ChildSpec(argv=argv, cwd=assignment.workdir, env=env, stdin=stdin, limits=limits),
            cancel=cancel,
        )
        after = snapshot_files(assignment.workdir)
        files = changed_files(before, after)

        status, error = _status(outcome, timeout, item.call)
        output: Any = None
        if item.call is not None and status == "succeeded":
            output = _read_json(output_path)
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
