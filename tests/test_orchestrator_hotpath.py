"""The orchestrator's per-item path without NATS or Ray: artifacts written behind, the one
watchdog over running attempts, item_started read from raw bytes, assignments built
without validating their parts again."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

import orchestrator.artifacts as artifacts_module
import orchestrator.service as service
from bus import subjects
from orchestrator.artifacts import TaskArtifacts
from orchestrator.service import HEARTBEAT_TIMEOUT_S, Orchestrator, _Batch, _Task
from schemas import (
    GateResult,
    HiveConfig,
    Plan,
    ProgressEvent,
    ResourceSpec,
    TaskRecord,
    TaskSpec,
    WorkItemAssignment,
    WorkItemResult,
    WorkItemSpec,
    decode,
    encode,
)

TASK = "t-abc"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
#: Long enough that nothing is written behind during a test unless the test says so.
NEVER_S = 3600.0


def result(item_id: str, status: str = "succeeded", *, attempt: int = 1,
           agent_id: str = "executor-1") -> WorkItemResult:
    return WorkItemResult(task_id=TASK, iteration=1, item_id=item_id, attempt=attempt, status=status,
                          exit_code=0 if status == "succeeded" else 1, agent_id=agent_id,
                          started_at=T0, finished_at=T0)


def a_plan(*item_ids: str) -> Plan:
    return Plan(task_id=TASK, iteration=1, strategy="declarative",
                items=[WorkItemSpec(id=i, run="true") for i in item_ids])


def a_gate(passed: bool) -> GateResult:
    return GateResult(task_id=TASK, iteration=1, gate="tests", kind="command", passed=passed,
                      started_at=T0, finished_at=T0)


def fill(art: TaskArtifacts) -> None:
    art.add_plan(a_plan("a", "b"))
    art.add_result(result("a", "failed", attempt=1))
    art.add_result(result("a", attempt=2))
    art.add_result(result("b"))
    art.add_gates([a_gate(True)])


def files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}


# --- artifacts written behind --------------------------------------------------------

def test_results_written_behind_reach_the_disk_on_settle_exactly_as_written_at_once(tmp_path):
    at_once = TaskArtifacts(tmp_path / "at-once", TASK)
    fill(at_once)

    async def scenario() -> None:
        behind = TaskArtifacts(tmp_path / "behind", TASK, write_behind_s=NEVER_S)
        fill(behind)
        assert behind.latest["a"].attempt == 2  # the state is up to date at once
        assert len(behind.attempts["a"]) == 2
        assert list(behind.dir.iterdir()) == []  # the files are not
        await behind.settle()
        assert not behind.pending
        await behind.close()

    asyncio.run(scenario())
    written = files(tmp_path / "behind" / TASK)
    assert written == files(at_once.dir)
    item_a = json.loads(written["work_item_a.json"])
    assert (item_a["status"], item_a["attempts"]) == ("succeeded", 2)
    assert written["work_item_a.json"].startswith('{\n  "type": "WorkItemResult"')  # indent=2


def test_a_file_that_changes_between_two_flushes_is_written_once(tmp_path, monkeypatch):
    writes: Counter[str] = Counter()
    dump = artifacts_module._dump

    def counting_dump(path: Path, data: object) -> None:
        writes[path.name] += 1
        dump(path, data)

    monkeypatch.setattr(artifacts_module, "_dump", counting_dump)

    async def scenario() -> TaskArtifacts:
        art = TaskArtifacts(tmp_path, TASK, write_behind_s=NEVER_S)
        for attempt in range(1, 6):
            art.add_result(result("flaky", "failed", attempt=attempt))
        art.add_result(result("other"))
        await art.settle()
        return art

    art = asyncio.run(scenario())
    assert writes == {"work_item_flaky.json": 1, "work_item_other.json": 1}
    assert json.loads((art.dir / "work_item_flaky.json").read_text())["attempts"] == 5


def test_the_writer_writes_on_its_own_within_its_period(tmp_path):
    async def scenario() -> TaskArtifacts:
        art = TaskArtifacts(tmp_path, TASK, write_behind_s=0.01)
        art.add_result(result("a"))
        writer = art._writer
        assert writer is not None
        await asyncio.wait_for(writer, timeout=10)  # it ends once nothing is pending
        return art

    art = asyncio.run(scenario())
    assert not art.pending
    assert json.loads((art.dir / "work_item_a.json").read_text())["item_id"] == "a"


def test_ensure_all_from_a_worker_thread_writes_what_is_pending_first(tmp_path):
    async def scenario() -> TaskArtifacts:
        art = TaskArtifacts(tmp_path, TASK, write_behind_s=NEVER_S)
        fill(art)
        await asyncio.to_thread(art.ensure_all)  # as the orchestrator's _finish does
        return art

    art = asyncio.run(scenario())
    names = {p.name for p in art.dir.iterdir()}
    assert names == {"open_plan.json", "work_items.json", "gate_results.json",
                     "work_items_summary.json", "work_item_a.json", "work_item_b.json"}
    summary = json.loads((art.dir / "work_items_summary.json").read_text())
    assert {(w["id"], w["attempts"]) for w in summary["work_items"]} == {("a", 2), ("b", 1)}


def test_a_resumed_task_loads_the_files_written_behind(tmp_path):
    async def scenario() -> None:
        art = TaskArtifacts(tmp_path, TASK, write_behind_s=NEVER_S)
        fill(art)
        await art.close()

    asyncio.run(scenario())
    resumed = TaskArtifacts(tmp_path, TASK, load=True)
    assert resumed.has_plan(1)
    assert [i["id"] for i in resumed.items] == ["a", "b"]
    assert [h["status"] for h in resumed.attempts["a"]] == ["failed", "succeeded"]
    assert resumed.latest["a"] == result("a", attempt=2)
    assert [g["passed"] for g in resumed.gates] == [True]
    resumed.add_result(result("b"))  # the same attempt again: recorded once
    assert len(resumed.attempts["b"]) == 1


def test_a_failed_write_stays_pending_and_is_written_by_the_next_flush(tmp_path, monkeypatch):
    dump = artifacts_module._dump
    failing = [True]

    def flaky_dump(path: Path, data: object) -> None:
        if failing[0]:
            raise OSError("disk full")
        dump(path, data)

    monkeypatch.setattr(artifacts_module, "_dump", flaky_dump)
    art = TaskArtifacts(tmp_path, TASK, write_behind_s=NEVER_S)

    async def scenario() -> None:
        art.add_result(result("a"))
        with pytest.raises(OSError):
            await art.settle()
        assert art.pending
        failing[0] = False
        await art.settle()

    asyncio.run(scenario())
    assert json.loads((art.dir / "work_item_a.json").read_text())["item_id"] == "a"


def test_stopping_the_orchestrator_writes_every_task_s_pending_artifacts(tmp_path):
    async def scenario() -> Path:
        orch = Orchestrator(bus=FakeBus(), config=HiveConfig(), state_dir=tmp_path)
        art = orch._artifacts(TASK)
        assert art.write_behind_s
        art.add_result(result("a"))
        orch.tasks[TASK] = _Task(record=a_record(), artifacts=art)
        await orch.stop()
        assert not art.pending
        return art.dir

    folder = asyncio.run(scenario())
    assert (folder / "work_item_a.json").exists()


# --- one watchdog for the running attempts ---------------------------------------------

class FakeBus:
    """What ``_send`` uses of a Bus: each request waits until the test answers it."""

    def __init__(self) -> None:
        self.epoch = 0
        self.nc = SimpleNamespace(is_connected=True, is_closed=False)
        self.sent: asyncio.Queue[tuple[str, WorkItemAssignment, asyncio.Future[WorkItemResult]]] = asyncio.Queue()
        self.stored: WorkItemResult | None = None
        self.looked_up: list[str] = []

    async def request(self, subject, message, reply_type, *, timeout):  # type: ignore[no-untyped-def]
        reply = asyncio.get_running_loop().create_future()
        self.sent.put_nowait((subject, message, reply))
        return await reply

    async def last_event(self, subject):  # type: ignore[no-untyped-def]
        self.looked_up.append(subject)
        return None if self.stored is None else encode(self.stored)


def a_record() -> TaskRecord:
    return TaskRecord(task_id=TASK, spec=TaskSpec(title="t", work_items=[{"id": "a", "run": "true"}]),
                      workdir="/tmp")


def an_assignment(attempt: int = 1) -> WorkItemAssignment:
    return WorkItemAssignment(task_id=TASK, iteration=1, attempt=attempt,
                              item=WorkItemSpec(id="a", run="true"), workdir="/tmp")


KEY = f"{TASK}:1:a:1"


async def next_request(bus: FakeBus):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(bus.sent.get(), timeout=10)


def orchestrator(tmp_path: Path, *executors: str) -> tuple[Orchestrator, FakeBus]:
    bus = FakeBus()
    orch = Orchestrator(bus=bus, config=HiveConfig(), state_dir=tmp_path)  # type: ignore[arg-type]
    if executors:
        orch.use_executors("hive1", list(executors))
    return orch, bus


def test_an_attempt_sent_to_a_named_executor_is_watched_without_waiting_for_item_started(tmp_path):
    async def scenario() -> None:
        orch, bus = orchestrator(tmp_path, "executor-1", "executor-2")
        orch._heartbeats["executor-1"] = (100, time.monotonic())
        sending = asyncio.create_task(orch._send(an_assignment()))
        subject, first, _ = await next_request(bus)
        assert subject == subjects.executor_run("hive1", "executor-1")
        assert (orch._running[KEY].agent, orch._running[KEY].pid) == ("executor-1", 100)

        assert orch._check_attempts(time.monotonic()) == []  # beating, same pid: left alone
        orch._heartbeats["executor-1"] = (101, time.monotonic())  # Ray restarted it
        assert orch._check_attempts(time.monotonic()) == [KEY]

        # No stored result: dispatched again, with the same idempotency key.
        subject, again, reply = await next_request(bus)
        assert bus.looked_up == [subjects.result(TASK, "a")]
        assert again.idempotency_key == first.idempotency_key
        assert orch._running[KEY].pid == 101
        reply.set_result(result("a"))
        assert await sending == result("a")
        assert orch._running == {} and orch._assigned == set()

    asyncio.run(scenario())


def test_an_executor_that_stops_beating_has_lost_its_attempt_and_its_stored_result_is_used(tmp_path):
    async def scenario() -> None:
        orch, bus = orchestrator(tmp_path, "executor-1")
        seen = time.monotonic()
        orch._heartbeats["executor-1"] = (100, seen)
        sending = asyncio.create_task(orch._send(an_assignment()))
        await next_request(bus)
        assert orch._check_attempts(seen + HEARTBEAT_TIMEOUT_S - 0.1) == []
        bus.stored = result("a", agent_id="executor-1")
        assert orch._check_attempts(seen + HEARTBEAT_TIMEOUT_S + 0.1) == [KEY]
        assert await asyncio.wait_for(sending, 10) == bus.stored
        assert bus.sent.empty()  # not sent again
        assert orch._running == {} and orch._assigned == set()

    asyncio.run(scenario())


def test_a_stored_result_of_another_attempt_is_not_taken_for_this_one(tmp_path):
    async def scenario() -> None:
        orch, bus = orchestrator(tmp_path, "executor-1")
        orch._heartbeats["executor-1"] = (100, time.monotonic())
        sending = asyncio.create_task(orch._send(an_assignment(attempt=2)))
        await next_request(bus)
        bus.stored = result("a", "failed", attempt=1)
        orch._heartbeats["executor-1"] = (101, time.monotonic())
        assert orch._check_attempts(time.monotonic()) == [f"{TASK}:1:a:2"]
        _, again, reply = await next_request(bus)
        assert again.attempt == 2
        reply.set_result(result("a", attempt=2))
        assert (await sending).attempt == 2

    asyncio.run(scenario())


def test_an_attempt_sent_to_the_queue_group_is_watched_once_its_item_started_arrives(tmp_path):
    async def scenario() -> None:
        orch, bus = orchestrator(tmp_path)  # no executors of its own: the queue group
        seen = time.monotonic()
        orch._heartbeats["executor-3"] = (300, seen)
        sending = asyncio.create_task(orch._send(an_assignment()))
        subject, _, _ = await next_request(bus)
        assert subject == subjects.EXECUTOR_RUN
        late = seen + HEARTBEAT_TIMEOUT_S + 1
        assert orch._check_attempts(late) == []  # nobody known to run it yet

        data, headers = encode(ProgressEvent(task_id=TASK, iteration=1, kind="item_started",
                                             item_id="a", attempt=1, agent_id="executor-3"))
        await orch._on_progress(SimpleNamespace(subject=subjects.progress(TASK), data=data,
                                                headers=headers))
        assert (orch._running[KEY].agent, orch._running[KEY].pid) == ("executor-3", 300)
        assert KEY in orch._latency and KEY not in orch._sent_at
        bus.stored = result("a", agent_id="executor-3")
        assert orch._check_attempts(late) == [KEY]
        assert await asyncio.wait_for(sending, 10) == bus.stored

    asyncio.run(scenario())


def test_a_request_waiting_across_a_reconnect_is_sent_again_to_the_same_executor(tmp_path):
    async def scenario() -> None:
        orch, bus = orchestrator(tmp_path, "executor-1", "executor-2")
        orch._heartbeats["executor-1"] = (100, time.monotonic())
        sending = asyncio.create_task(orch._send(an_assignment()))
        subject, first, _ = await next_request(bus)
        bus.epoch += 1  # its reply may have been lost with the old connection
        assert orch._check_attempts(time.monotonic()) == [KEY]
        again_subject, again, reply = await next_request(bus)
        assert (again_subject, again) == (subject, first)
        assert orch._assigned == {"executor-1"}  # still held while it runs the attempt
        assert orch._running[KEY].epoch == 1 and orch._running[KEY].pid == 100
        assert bus.looked_up == []  # not lost: nothing to look up
        reply.set_result(result("a"))
        assert await sending == result("a")
        assert orch._assigned == set()

    asyncio.run(scenario())


def test_a_cancelled_send_cancels_its_request_and_leaves_nothing_behind(tmp_path):
    async def scenario() -> None:
        orch, bus = orchestrator(tmp_path, "executor-1")
        sending = asyncio.create_task(orch._send(an_assignment()))
        await next_request(bus)
        request = orch._running[KEY].request
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert request.cancelled()
        assert orch._running == {} and orch._assigned == set()

    asyncio.run(scenario())


def test_only_item_started_progress_events_are_decoded(tmp_path, monkeypatch):
    decoded: list[str] = []
    real = service.decode_message

    def counting(msg, into):  # type: ignore[no-untyped-def]
        event = real(msg, into)
        decoded.append(event.kind)
        return event

    monkeypatch.setattr(service, "decode_message", counting)

    async def scenario() -> None:
        orch, _ = orchestrator(tmp_path)
        for kind in ("item_queued", "item_finished", "item_retried", "gate_started", "item_started"):
            data, headers = encode(ProgressEvent(task_id=TASK, iteration=1, kind=kind, item_id="a"))
            await orch._on_progress(SimpleNamespace(subject=subjects.progress(TASK), data=data,
                                                    headers=headers))
        json_body = json.dumps({"type": "ProgressEvent", "task_id": TASK, "iteration": 1,
                                "kind": "item_started", "item_id": "b"}).encode()
        await orch._on_progress(SimpleNamespace(subject=subjects.progress(TASK), data=json_body,
                                                headers=None))

    asyncio.run(scenario())
    assert decoded == ["item_started", "item_started"]


# --- assignments -----------------------------------------------------------------------

def test_an_assignment_built_from_validated_parts_encodes_like_a_validated_one():
    spec = TaskSpec.model_validate({
        "title": "t", "env": {"A": "1", "B": "2"}, "planner": {"strategy": "declarative"},
        "work_items": [{"id": "call", "call": "pkg.mod:fn", "args": {"n": [1, 2]},
                        "env": {"B": "3"}, "resources": {"cpu_seconds": 5}}],
    })
    record = TaskRecord(task_id=TASK, spec=spec, workdir="/work")
    plan = Plan(task_id=TASK, iteration=2, strategy="declarative", items=spec.work_items)
    batch = _Batch(task_id=TASK, plan=plan, record=record, done=None)  # type: ignore[arg-type]
    item = spec.work_items[0]
    resources = ResourceSpec(cpu=1, memory_mb=512, cpu_seconds=5)
    env = {**spec.env, **item.env}

    built = Orchestrator._assignment(batch, item, 3, env=env, resources=resources)
    validated = WorkItemAssignment(task_id=TASK, iteration=2, attempt=3, item=item, workdir="/work",
                                   env=env, resources=resources, failure=None, llm=spec.planner)

    assert (built.type, built.v) == ("WorkItemAssignment", 1)
    for content_type in ("application/msgpack", "application/json"):
        assert encode(built, content_type) == encode(validated, content_type)
    data, headers = encode(built)
    back = decode(data, WorkItemAssignment, headers=headers)
    assert back == validated
    assert back.idempotency_key == f"{TASK}:2:call:3"
    assert back.env == {"A": "1", "B": "3"}
