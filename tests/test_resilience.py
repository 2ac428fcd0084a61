"""A NATS restart mid-task, hostile request bodies, and the replayed audit trail."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import nats
import psutil
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.errors import MaxPayloadError

from conftest import Cli
from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration

REQUEST_SUBJECTS = [
    "task.submit", "task.get", "task.list", "task.cancel", "task.approve",
    "agent.planner.plan", "agent.executor.run", "agent.verifier.verify",
    "agent.resources.lease", "agent.resources.release", "agent.resources.snapshot",
]


def test_a_nats_restart_mid_task_loses_nothing(cli, own_nats, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from orchestrator import Hive

    work = tmp_path / "work"
    work.mkdir()
    up = Cli(["up", "--nats", own_nats.url, "--state-dir", str(tmp_path / "state"), "--policy", "local"],
             cwd=tmp_path)
    cli.append(up)
    up.wait_for_line("hivebus is up")
    spec = TaskSpec(title="through a restart", workdir=str(work),
                    gates=[{"name": "all-ran", "run": "test -f b.done && test -f c.done"}],
                    work_items=[
                        {"id": "a", "run": "touch a.started; sleep 2; touch a.done"},
                        {"id": "b", "run": "touch b.done", "depends_on": ["a"]},
                        {"id": "c", "run": "sleep 1; touch c.done", "depends_on": ["a"]},
                    ])
    client = Hive.connect(own_nats.url)
    try:
        task_id = client.submit(spec)
        deadline = time.monotonic() + 60
        while not (work / "a.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        own_nats.restart()
        record = client.wait(task_id, timeout=120)
    finally:
        client.close()

    assert record.state == TaskState.SUCCEEDED, record.message
    events = [json.loads(line) for line in Path(record.artifacts_dir, "events.jsonl").read_text().splitlines()]
    states = [e["state"] for e in events if e["type"] == "LifecycleEvent"]
    assert states[:4] == ["DRAFT", "APPROVED", "QUEUED", "RUNNING"] and states[-1] == "SUCCEEDED"
    stages = [e["stage"] for e in events if e["type"] == "LifecycleEvent" and e["state"] == "RUNNING"]
    assert stages == ["planning", "executing", "verifying"]
    for item in ("a", "b", "c"):
        kinds = [e["kind"] for e in events if e["type"] == "ProgressEvent" and e.get("item_id") == item]
        assert {"item_queued", "item_started", "item_finished"} <= set(kinds), (item, kinds)
    assert events[-1]["type"] == "CompletionEvent"
    up.proc.send_signal(2)
    up.finish(timeout=60)


def hostile_bodies(count: int, seed: int = 7) -> list[tuple[str, bytes, dict[str, str] | None]]:
    """(subject, body, headers) that no handler may accept."""
    rng = random.Random(seed)
    valid = msgpack.packb({"type": "TaskSpec", "v": 1, "title": "x", "gates": ["doctor"]})
    makers = [
        lambda: rng.randbytes(rng.randint(1, 300)),                                   # random bytes
        lambda: valid[: rng.randint(1, len(valid) - 1)],                              # truncated msgpack
        lambda: json.dumps({"title": rng.randint(0, 9), "work_items": "nope"}).encode(),  # wrong types
        lambda: json.dumps({"title": "x", "gates": ["doctor"], "evil": True}).encode(),  # unknown field
        lambda: json.dumps({"task_id": f"t-{rng.randint(0, 10**9):x}-deadbeef"}).encode(),  # unknown id
        lambda: json.dumps({"task_id": "../../etc/passwd"}).encode(),                 # leaves the folder
        lambda: json.dumps([1, 2, 3]).encode(),                                       # not an object
        lambda: msgpack.packb({"type": "Plan", "v": 1}),                              # wrong message type
        lambda: json.dumps({"type": "TaskSpec", "v": 99, "title": "x"}).encode(),     # future version
        lambda: b"{" * 5000,                                                           # deep garbage
    ]
    bodies = []
    for i in range(count):
        maker = makers[i % len(makers)]
        subject = REQUEST_SUBJECTS[rng.randrange(len(REQUEST_SUBJECTS))]
        if subject in ("task.list", "agent.resources.snapshot") and maker is makers[4]:
            maker = makers[0]  # {"task_id": ...} is an unknown field there: still hostile, but keep it simple
        headers = {"Content-Type": "application/json"} if rng.random() < 0.3 else None
        bodies.append((subject, maker(), headers))
    return bodies


def test_ten_thousand_hostile_bodies_are_all_rejected_and_the_hive_carries_on(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    me = psutil.Process()
    before = me.memory_info().rss

    async def storm() -> list[dict]:
        nc = await nats.connect(hive.nats_url)
        replies: list[dict] = []
        try:
            bodies = hostile_bodies(10_000)
            for start in range(0, len(bodies), 250):
                batch = bodies[start:start + 250]
                answers = await asyncio.gather(*(nc.request(s, b, timeout=30, headers=h) for s, b, h in batch))
                for answer in answers:
                    data = answer.data
                    replies.append(json.loads(data) if data[:1] == b"{" else msgpack.unpackb(data))
        finally:
            await nc.close()
        return replies

    replies = asyncio.run(storm())

    assert len(replies) == 10_000
    assert {r["type"] for r in replies} == {"Rejected"}
    codes = {r["code"] for r in replies}
    assert {"bad_encoding", "invalid", "unknown_task", "wrong_type"} <= codes
    assert all(r["message"] for r in replies)
    grown_mb = (me.memory_info().rss - before) / 2**20
    assert grown_mb < 50, f"the orchestrator's RSS grew by {grown_mb:.1f} MB"
    for name in ("planner-1", "executor-1", "verifier-1", "resources"):
        assert ray.get(ray.get_actor(name, namespace="hivebus").ready.remote(), timeout=30)["agent_id"] == name
    record = hive.run(TaskSpec(title="after the storm", workdir=str(tmp_path),
                               work_items=[{"id": "ok", "run": "true"}]), timeout=60)
    assert record.state == TaskState.SUCCEEDED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject=st.sampled_from(REQUEST_SUBJECTS),
       body=st.one_of(st.binary(max_size=512),
                      st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.integers(), st.text(max_size=20),
                                                                       st.lists(st.integers(), max_size=3)),
                                      max_size=6).map(lambda d: json.dumps(d).encode())))
def test_any_body_on_any_request_subject_gets_a_typed_answer(hive, subject: str, body: bytes) -> None:  # type: ignore[no-untyped-def]
    async def ask() -> dict:
        nc = await nats.connect(hive.nats_url)
        try:
            data = (await nc.request(subject, body, timeout=10)).data
        finally:
            await nc.close()
        return json.loads(data) if data[:1] == b"{" else msgpack.unpackb(data)

    reply = asyncio.run(ask())

    assert isinstance(reply, dict) and reply.get("type")
    if reply["type"] == "Rejected":
        assert reply["code"] and reply["message"]


def test_a_body_over_the_servers_max_payload_is_refused_and_the_hive_still_answers(hive) -> None:  # type: ignore[no-untyped-def]
    host, port = hive.nats_url.removeprefix("nats://").rsplit(":", 1)

    async def oversize() -> tuple[bool, bytes, dict]:
        nc = await nats.connect(hive.nats_url)
        try:
            refused = False
            try:
                await nc.request("task.submit", b"{" + b" " * (2 * 2**20) + b"}", timeout=5)
            except MaxPayloadError:
                refused = True
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.recv(4096)  # INFO
                try:
                    raw.sendall(b"CONNECT {\"verbose\":false}\r\nPUB task.submit 2097152\r\n"
                                + b"x" * 2097152 + b"\r\n")
                    raw.settimeout(5)
                    error = raw.recv(4096)
                except (ConnectionResetError, BrokenPipeError):
                    # The server sent its -ERR and closed while we were still writing.
                    error = b"connection closed by the server"
            answer = json.loads((await nc.request("task.list", b"{}", timeout=5)).data)
            return refused, error, answer
        finally:
            await nc.close()

    refused, error, answer = asyncio.run(oversize())

    assert refused
    assert b"Maximum Payload" in error or error == b"connection closed by the server"
    assert answer["type"] == "TaskList"


def test_replay_rebuilds_a_tasks_timeline_from_the_event_stream(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    record = hive.run(TaskSpec(title="replay me", workdir=str(tmp_path),
                               gates=[{"name": "g", "run": "true"}],
                               work_items=[{"id": "only", "run": "true"}]), timeout=60)

    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "replay", record.task_id,
                           "--nats", hive.nats_url], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    order = [next(i for i, l in enumerate(lines) if word in l)
             for word in ("DRAFT", "QUEUED", "item started: only", "gate g passed", "SUCCEEDED", "completed")]
    assert order == sorted(order)
