"""The execution policy and secrets on a real hive: refused before anything runs, never leaked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import ray

from actors.secrets import SecretStore
from conftest import Cli
from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration


def blocked(record, rule: str) -> None:  # type: ignore[no-untyped-def]
    assert record.state == TaskState.BLOCKED, record.message
    assert record.exit_reason == "policy_denied"
    assert f"rule: {rule}" in record.message


def test_curl_is_blocked_by_the_local_policy_before_anything_runs(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = TaskSpec(title="exfiltrate", workdir=str(tmp_path), work_items=[
        {"id": "harmless", "run": "touch marker"},
        {"id": "fetch", "run": "curl -s https://example.com -o page.html", "depends_on": ["harmless"]},
    ])

    record = hive.run(spec, timeout=60)

    blocked(record, "executables")
    assert "'curl'" in record.message
    assert not (tmp_path / "marker").exists()


def test_rm_rf_outside_the_workdir_is_blocked(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "work").mkdir()
    victim = tmp_path / "precious"
    victim.mkdir()
    spec = TaskSpec(title="wipe", workdir=str(tmp_path / "work"), work_items=[
        {"id": "marker", "run": "touch marker"},
        {"id": "wipe", "run": f"rm -rf {victim}"},
    ])

    record = hive.run(spec, timeout=60)

    blocked(record, "confined")
    assert victim.exists() and not (tmp_path / "work" / "marker").exists()


def test_a_workdir_that_climbs_out_or_a_symlink_that_escapes_is_refused(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    climbing = TaskSpec(title="climb", workdir=str(tmp_path / ".." / ".." / ".." / "etc"),
                        work_items=[{"id": "look", "run": "ls"}])
    (tmp_path / "link").symlink_to("/etc")
    linked = TaskSpec(title="link", workdir=str(tmp_path / "link"), work_items=[{"id": "look", "run": "ls"}])

    blocked(hive.run(climbing, timeout=60), "workdirs")
    blocked(hive.run(linked, timeout=60), "workdirs")


@pytest.mark.parametrize("policy_args", [[], ["--policy", "local"]], ids=["default", "local"])
def test_hivebus_up_without_a_policy_denies_everything(cli, own_nats, tmp_path: Path, policy_args) -> None:  # type: ignore[no-untyped-def]
    from orchestrator import Hive

    up = Cli(["up", "--nats", own_nats.url, "--state-dir", str(tmp_path / "state"), *policy_args], cwd=tmp_path)
    cli.append(up)
    up.wait_for_line("hivebus is up")
    client = Hive.connect(own_nats.url)
    try:
        record = client.run(TaskSpec(title="t", workdir=str(tmp_path),
                                     work_items=[{"id": "a", "run": "touch ran"}]), timeout=60)
    finally:
        client.close()

    if policy_args:
        assert record.state == TaskState.SUCCEEDED and (tmp_path / "ran").exists()
    else:
        assert record.state == TaskState.BLOCKED and record.exit_reason == "policy_denied"
        assert not (tmp_path / "ran").exists()


def test_a_secret_reaches_the_child_and_nothing_else(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    value = "s3cr3t-hivebus-value-8841"
    digest = hashlib.sha256(value.encode()).hexdigest()
    SecretStore.open(hive.state_dir).set("API_TOKEN", value)
    spec = TaskSpec(title="use a secret", workdir=str(tmp_path), env={"TOKEN": "${secret:API_TOKEN}"},
                    gates=[{"name": "seen", "run": 'echo "gate sees $TOKEN"; test -f ok'}],
                    work_items=[{"id": "use", "run": 'echo "token=$TOKEN"; echo "$TOKEN" >&2; '
                                                      'test "$(printf %s "$TOKEN" | sha256sum | cut -d" " -f1)" = '
                                                      + digest + ' && touch ok'}])

    record = hive.run(spec, timeout=60)

    assert record.state == TaskState.SUCCEEDED, record.message
    assert (tmp_path / "ok").exists()
    use = json.loads(Path(record.artifacts_dir, "work_item_use.json").read_text())
    assert "token=***" in use["stdout_tail"]
    for path in Path(record.artifacts_dir).iterdir():
        assert value not in path.read_text(), path.name
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert value.encode() not in path.read_bytes(), path


def test_a_task_naming_an_unknown_secret_is_refused_at_submit(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from schemas import RequestRejected

    spec = TaskSpec(title="t", workdir=str(tmp_path), env={"X": "${secret:NOPE_NOT_THERE}"},
                    work_items=[{"id": "a", "run": "true"}])

    with pytest.raises(RequestRejected, match="NOPE_NOT_THERE"):
        hive.submit(spec)
