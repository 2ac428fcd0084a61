"""Events published with asynchronous acks (Bus.publish_soon / settle) on a real nats-server:
order, a server restart while events are unconfirmed, refusals, backpressure. No Ray."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus, EmbeddedNats, connection, subjects
from bus.connection import EventPublisher
from schemas import LifecycleEvent, ProgressEvent, TransportError
from schemas.codec import encode


class Recorder:
    """Stands in for the module's structlog logger and keeps what was logged."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str):  # type: ignore[no-untyped-def]
        def record(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))
        return record

    def errors(self) -> list[tuple[str, dict[str, Any]]]:
        return [(event, fields) for level, event, fields in self.lines if level == "error"]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    recorder = Recorder()
    monkeypatch.setattr(connection, "log", recorder)
    yield recorder


def progress(task_id: str, n: int, total: int) -> ProgressEvent:
    return ProgressEvent(task_id=task_id, iteration=1, kind="item_finished", item_id=f"item-{n}",
                         status="succeeded", done=n, total=total)


async def stored_done(bus: Bus, task_id: str) -> list[int]:
    """The ``done`` counter of every stored progress event of the task, in stream order."""
    return [body["done"] async for _, body in bus.stored_events(subjects.progress(task_id))]


async def connected(server: EmbeddedNats) -> Bus:
    bus = await Bus.connect(server.url, name="publisher-test")
    await bus.ensure_streams()
    return bus


def test_ten_thousand_events_published_soon_are_all_stored_in_call_order(own_nats: EmbeddedNats,
                                                                           logged: Recorder) -> None:
    async def scenario() -> list[int]:
        bus = await connected(own_nats)
        try:
            for n in range(10_000):
                bus.publish_soon(subjects.progress("task-order"), progress("task-order", n, 10_000))
            await bus.settle()
            return await stored_done(bus, "task-order")
        finally:
            await bus.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 120)) == list(range(10_000))
    assert logged.errors() == []


def test_events_unconfirmed_across_a_server_restart_are_stored_exactly_once(own_nats: EmbeddedNats,
                                                                            logged: Recorder) -> None:
    async def scenario() -> tuple[list[int], int]:
        bus = await connected(own_nats)
        try:
            for n in range(3_000):
                bus.publish_soon(subjects.progress("task-restart"), progress("task-restart", n, 6_000))
            # The loop keeps sending while the server stops and starts on the same port.
            await asyncio.to_thread(own_nats.restart)
            for n in range(3_000, 6_000):
                bus.publish_soon(subjects.progress("task-restart"), progress("task-restart", n, 6_000))
            await bus.settle()
            return await stored_done(bus, "task-restart"), bus.epoch
        finally:
            await bus.close()

    stored, epoch = asyncio.run(asyncio.wait_for(scenario(), 180))
    assert epoch >= 1, "the client never saw the restart"
    assert sorted(stored) == list(range(6_000))  # every event, none twice
    assert logged.errors() == []


def test_an_event_no_stream_captures_is_logged_and_settle_still_returns(own_nats: EmbeddedNats,
                                                                        logged: Recorder) -> None:
    async def scenario() -> list[int]:
        bus = await connected(own_nats)
        try:
            bus.publish_soon(subjects.progress("task-around"), progress("task-around", 0, 2))
            bus.publish_soon("nowhere.stored", progress("task-around", 99, 2))
            bus.publish_soon(subjects.progress("task-around"), progress("task-around", 1, 2))
            await bus.settle()
            return await stored_done(bus, "task-around")
        finally:
            await bus.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == [0, 1]
    errors = logged.errors()
    assert len(errors) == 1
    event, fields = errors[0]
    assert event == "event not stored" and fields["subject"] == "nowhere.stored"


def test_an_awaited_publish_is_stored_after_the_events_published_soon_before_it(
        own_nats: EmbeddedNats) -> None:
    async def scenario() -> list[str]:
        bus = await connected(own_nats)
        try:
            for n in range(500):
                bus.publish_soon(subjects.progress("task-mixed"), progress("task-mixed", n, 500))
            await bus.publish(subjects.lifecycle("task-mixed"),
                              LifecycleEvent(task_id="task-mixed", state="SUCCEEDED"))
            with pytest.raises(TransportError, match="nowhere.stored"):
                await bus.publish("nowhere.stored", LifecycleEvent(task_id="task-mixed", state="FAILED"))
            return [body["type"] async for _, body in bus.stored_events(subjects.task_events("task-mixed"))]
        finally:
            await bus.close()

    types = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert types == ["ProgressEvent"] * 500 + ["LifecycleEvent"]


def test_more_events_than_may_be_unconfirmed_wait_their_turn_and_none_is_dropped(
        own_nats: EmbeddedNats, logged: Recorder) -> None:
    async def scenario() -> list[int]:
        bus = await connected(own_nats)
        publisher = EventPublisher(bus.nc, max_unconfirmed=50)
        try:
            for n in range(2_000):
                data, headers = encode(progress("task-bounded", n, 2_000))
                headers["Nats-Msg-Id"] = f"bounded-{n}"
                publisher.put(subjects.progress("task-bounded"), data, headers)
            assert publisher.outstanding == 2_000
            await publisher.settle()
            return await stored_done(bus, "task-bounded")
        finally:
            await publisher.stop()
            await bus.close()

    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == list(range(2_000))
    assert logged.errors() == []


def test_an_agent_with_agent_credentials_can_publish_soon(tmp_path: Path) -> None:
    # The PubAcks come back on the agent's own _INBOX, which its role may subscribe to.
    async def scenario(server: EmbeddedNats) -> list[int]:
        orchestrator = await Bus.connect(server.url, name="orchestrator",
                                         auth=server.credentials("orchestrator"))
        agent = await Bus.connect(server.url, name="executor-1", auth=server.credentials("agent"))
        try:
            await orchestrator.ensure_streams()
            for n in range(100):
                agent.publish_soon(subjects.progress("task-agent"), progress("task-agent", n, 100))
            await agent.settle()
            return await stored_done(orchestrator, "task-agent")
        finally:
            await agent.close()
            await orchestrator.close()

    with EmbeddedNats(tmp_path / "secure") as server:
        assert asyncio.run(asyncio.wait_for(scenario(server), 60)) == list(range(100))
