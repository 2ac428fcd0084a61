"""Session fixtures: one real nats-server and one local Ray (in one hive) per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bus import EmbeddedNats
from schemas import HiveConfig, PoolConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def wait_for(condition, what: str, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until true. Only for the file system and the process table,
    which have no events to wait on; hivebus itself is always waited on through events."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hivebus-state")


@pytest.fixture(scope="session")
def nats_server(state_dir: Path) -> Iterator[EmbeddedNats]:
    # Open (no credentials) so that tests can talk to it as any plain NATS client would;
    # the embedded servers that `hivebus run` and `up` start in test_cli.py require them.
    server = EmbeddedNats(state_dir / "nats", auth=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: The session hive: four executors of 512 MB each under a total of 1 GiB, so that the
#: resource manager, not the number of executors, is what limits four 512 MB items.
SESSION_CONFIG = HiveConfig(
    executor=PoolConfig(replicas=4, cpu=1, memory_mb=512),
    total_cpu=4, total_memory_mb=1024,
)


@pytest.fixture(scope="session")
def hive(nats_server: EmbeddedNats, state_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The session's hive on its nats-server and a local Ray, under the ``local`` policy
    rooted at the session's temporary folders and the examples."""
    from actors.policy import Policy
    from orchestrator import Hive

    base = tmp_path_factory.getbasetemp()
    policy = Policy.local(base).model_copy(update={"workdirs": [str(base), str(EXAMPLES)]})
    running = Hive.start(nats_url=nats_server.url, state_dir=state_dir, config=SESSION_CONFIG,
                         policy=policy)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of the test's own, for tests that start a second hive."""
    server = EmbeddedNats(tmp_path / "own-nats", auth=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- subprocesses of the CLI, and what they leave behind ---------------------------------

MARK = "HIVEBUS_TEST_MARK"


class Cli:
    """A ``hivebus`` subprocess whose every descendant carries a unique env marker."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None):
        self.mark = uuid.uuid4().hex
        full_env = {**os.environ, **(env or {}), MARK: self.mark, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=full_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait_for_line(self, needle: str, *, timeout: float = 120.0) -> list[str]:
        """Read stdout until a line containing ``needle``; the lines read so far."""
        assert self.proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if needle in line:
                return lines
        raise AssertionError(f"{needle!r} never appeared; stdout so far:\n{''.join(lines)}"
                             f"\nstderr:\n{self.stderr_if_done()}")

    def stderr_if_done(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read()

    def finish(self, timeout: float = 120.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def leftovers(self) -> list[str]:
        """Live processes that inherited this run's marker (zombies are already dead)."""
        found = []
        for proc in psutil.process_iter(["pid", "name", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            try:
                if proc.environ().get(MARK) == self.mark:
                    found.append(f"{proc.pid} {proc.info['name']} {' '.join(proc.cmdline())[:120]}")
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return found

    def kill_everything(self) -> None:
        """Last resort after a failed test: no process of this run outlives the session."""
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARK) == self.mark:
                    proc.send_signal(signal.SIGKILL)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[list[Cli]]:
    """Start CLI subprocesses with ``cli.append(Cli([...], cwd=...))``; all are killed at the end."""
    started: list[Cli] = []
    try:
        yield started
    finally:
        for run in started:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            run.kill_everything()
