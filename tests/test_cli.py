"""The ``hivebus`` command as a user runs it: subprocesses, exit codes, Ctrl-C, no strays."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import nats
import pytest

from conftest import Cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def hivebus(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_a_bad_task_file_exits_2_naming_the_file_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nwork_items:\n  - id: a\n    run: 'true'\n    depends_on: [nope]\n")
    shapeless = tmp_path / "shapeless.yaml"
    shapeless.write_text("title: x\nwork_items:\n  - id: a\n    run: 'true'\n  - id: b\n")

    done = hivebus("run", str(bad))
    other = hivebus("run", str(shapeless))

    assert done.returncode == 2 and other.returncode == 2
    assert str(bad) in done.stderr
    assert "depends_on" in done.stderr and "'nope'" in done.stderr
    assert "work_items.1" in other.stderr and "exactly one of 'run'" in other.stderr
    assert "Traceback" not in done.stderr + done.stdout + other.stderr


def test_a_resource_request_above_the_executor_limit_is_refused_before_anything_runs(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("title: x\nwork_items:\n  - id: hog\n    run: 'true'\n    resources: {memory_mb: 999999}\n")

    done = hivebus("run", str(big), "--executor-memory-mb", "512")

    assert done.returncode == 2
    assert "hog" in done.stderr and "512 MB" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_task_file_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    missing = hivebus("run", str(tmp_path / "nope.yaml"))
    no_args = hivebus("run")

    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert no_args.returncode == 2


def test_schema_prints_the_json_schema_of_every_message() -> None:
    done = hivebus("schema")

    schemas = json.loads(done.stdout)
    assert done.returncode == 0
    for name in ("TaskSpec", "WorkItemAssignment", "WorkItemResult", "GateResult", "TaskRecord",
                 "TaskAccepted", "Rejected", "Plan", "PlanRequest", "VerifyRequest", "LifecycleEvent"):
        assert resolve(schemas[name])["type"] == "object", name
    assert "work_items" in resolve(schemas["TaskSpec"])["properties"]


def resolve(schema: dict) -> dict:
    """A recursive model (a TaskSpec holds subtasks) has its root behind a local $ref."""
    ref = schema.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else schema


@pytest.mark.integration
def test_run_with_json_prints_one_line_and_exits_0_on_success(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = Cli(["run", str(EXAMPLES / "pipeline" / "task.yaml"), "--json", "--state-dir", str(tmp_path)],
              cwd=tmp_path)
    cli.append(run)

    code, out, err = run.finish()

    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["state"] == "SUCCEEDED" and line["exit_reason"] == "done" and line["iteration"] == 1
    assert Path(line["report"]).is_file()
    assert run.leftovers() == []


@pytest.mark.integration
def test_ctrl_c_on_run_leaves_no_server_raylet_or_child_behind(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    task = tmp_path / "slow.yaml"
    task.write_text("title: slow\nwork_items:\n  - id: sleeper\n    run: echo $$ > pid; exec sleep 120\n")
    run = Cli(["run", str(task), "--state-dir", str(tmp_path / "state")], cwd=tmp_path)
    cli.append(run)
    run.wait_for_line("sleeper started")

    run.proc.send_signal(signal.SIGINT)
    code, _, err = run.finish(timeout=60)

    assert code == 130, err
    assert "Traceback" not in err
    assert _settled(run) == []


@pytest.mark.integration
def test_a_plain_nats_client_submits_json_to_hivebus_up_and_follows_the_lifecycle(
        cli, own_nats, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nats_server = own_nats
    up = Cli(["up", "--nats", nats_server.url, "--state-dir", str(tmp_path / "state"), "--policy", "local"],
             cwd=tmp_path)
    cli.append(up)
    up.wait_for_line("hivebus is up")
    (tmp_path / "work").mkdir()

    async def client() -> tuple[dict, list[dict], dict, dict]:
        # Knows only DESIGN.md: subjects, JSON bodies, the reply types.
        nc = await nats.connect(nats_server.url)
        try:
            events: asyncio.Queue[dict] = asyncio.Queue()

            async def on_event(msg) -> None:  # type: ignore[no-untyped-def]
                await events.put(msgpack.unpackb(msg.data))

            await nc.subscribe("task.lifecycle.*", cb=on_event)
            body = {"title": "from nats-py", "workdir": str(tmp_path / "work"),
                    "work_items": [{"id": "hello", "run": "echo hello > hello.txt"}],
                    "gates": [{"name": "file", "run": "test -s hello.txt"}]}
            reply = json.loads((await nc.request("task.submit", json.dumps(body).encode(), timeout=10)).data)
            seen: list[dict] = []
            while not seen or seen[-1]["state"] not in ("SUCCEEDED", "FAILED", "BLOCKED", "CANCELED"):
                event = await asyncio.wait_for(events.get(), timeout=60)
                if event["task_id"] == reply["task_id"]:
                    seen.append(event)
            record = json.loads((await nc.request(
                "task.get", json.dumps({"task_id": reply["task_id"]}).encode(), timeout=10)).data)
            rejected = json.loads((await nc.request("task.submit", b'{"description": "no title"}', timeout=10)).data)
            return reply, seen, record, rejected
        finally:
            await nc.close()

    accepted, lifecycle, record, rejected = asyncio.run(client())

    assert accepted["type"] == "TaskAccepted"
    states = [e["state"] for e in lifecycle]
    assert states[:4] == ["DRAFT", "APPROVED", "QUEUED", "RUNNING"] and states[-1] == "SUCCEEDED"
    stages = [e["stage"] for e in lifecycle if e["state"] == "RUNNING"]
    assert stages == ["planning", "executing", "verifying"]
    assert record["type"] == "TaskRecord" and record["state"] == "SUCCEEDED" and record["exit_reason"] == "done"
    assert (tmp_path / "work" / "hello.txt").read_text() == "hello\n"
    assert rejected["type"] == "Rejected" and "title" in rejected["message"]

    up.proc.send_signal(signal.SIGINT)
    code, _, err = up.finish(timeout=60)
    assert code == 130, err
    assert _settled(up) == []


def _settled(run: Cli, timeout: float = 15.0) -> list[str]:
    """Leftovers of a finished run, allowing killed processes a moment to be reaped."""
    deadline = time.monotonic() + timeout
    left = run.leftovers()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = run.leftovers()
    return left
