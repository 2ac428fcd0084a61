"""hivebus on a real two-node Ray cluster, driven only by Ray's and NATS's own tools.

A Ray head and a second Ray node are started on this machine with ``ray start``;
``hivebus up`` is submitted with ``ray job submit``; a plain nats-py client publishes a
task on ``task.submit``; ``ray job stop`` ends the hive and ``ray list actors`` must show
no live hivebus actor afterwards.

Other people's Ray instances may run on this machine, so nothing here uses ``ray stop``
(it stops every Ray on the machine). Every process of this cluster is started by a
*keeper*: a small child process that is a Linux child subreaper, so the daemons that
``ray start`` double-forks, the workers the raylets start (each in its own process group
and with its title rewritten, so neither ``killpg`` nor a cmdline match finds them) and
the children of the job stay its descendants. Closing the keeper's stdin (or the death of
this test process) makes it kill all of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bus import EmbeddedNats

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the keeper uses Linux's child subreaper")]

T = TypeVar("T")
BIN = Path(sys.executable).parent
MiB = 1024 * 1024

KEEPER = r"""
import ctypes, json, os, signal, subprocess, sys
import psutil

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def kill_descendants():
    me = psutil.Process()
    for round in range(3):  # a dying raylet may still start something: sweep again
        procs = me.children(recursive=True)
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM if round == 0 else signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
        for p in me.children():  # reap what was reparented to us
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass


def on_term(*_):
    kill_descendants()
    os._exit(0)


signal.signal(signal.SIGTERM, on_term)
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        done = subprocess.run(request["argv"], capture_output=True, text=True,
                              timeout=request["timeout"], stdin=subprocess.DEVNULL)
        reply = {"rc": done.returncode, "out": done.stdout, "err": done.stderr}
    except subprocess.TimeoutExpired as exc:
        reply = {"rc": -1, "out": str(exc.stdout or ""), "err": f"timed out: {exc}"}
    print(json.dumps(reply), flush=True)
kill_descendants()
"""


def samples(text: str, prefix: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of a Prometheus text page whose names start with ``prefix``, by name."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def free_ports(count: int) -> Iterator[int]:
    """Distinct free ports (all held open at once, so that none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return iter([s.getsockname()[1] for s in sockets])
    finally:
        for s in sockets:
            s.close()


class Keeper:
    """Runs commands for the test; every process they leave behind is killed in ``close``."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", KEEPER], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.pid = json.loads(self.proc.stdout.readline())["ready"]

    def run(self, *argv: str, timeout: float = 120.0, check: bool = True) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": list(argv), "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if check and reply["rc"] != 0:
            raise AssertionError(f"{' '.join(argv)} exited {reply['rc']}:\n{reply['out']}\n{reply['err']}")
        return reply["out"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # its SIGTERM handler kills the rest
                self.proc.wait(timeout=30)


class RayCluster:
    """A Ray head with the dashboard (job submission) and a second node, on this machine."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(32)
        self.temp_dir = Path(f"/tmp/hb-ray-{uuid.uuid4().hex[:8]}")  # short: socket paths
        self.ports = free_ports(12)
        self.gcs_port, self.dashboard_port = next(self.ports), next(self.ports)
        self.metrics_ports = (next(self.ports), next(self.ports))
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # Token auth with a token of this cluster's own: no ~/.ray/auth_token is read,
            # and whoever holds RAY_AUTH_TOKEN (the jobs, the CLI below) gets in.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_metrics_report_interval_ms": "2000",  # metrics reach the endpoint sooner
            "RAY_JOB_STOP_WAIT_TIME_S": "30",  # time for `hivebus up` to stop its agents
        }
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "HIVEBUS_NATS_URL"):
            self.env.pop(name, None)
        self.keeper = Keeper(self.env)

    def node_ports(self, metrics_port: int) -> list[str]:
        # Every port pinned to a free one, so that a second Ray on this machine never
        # collides with this one on Ray's fixed defaults (8265, 52365, 10001).
        return ["--dashboard-agent-listen-port", str(next(self.ports)),
                "--dashboard-agent-grpc-port", str(next(self.ports)),
                "--runtime-env-agent-port", str(next(self.ports)),
                "--metrics-export-port", str(metrics_port)]

    def start(self) -> None:
        # A temp dir per node: two nodes sharing one would share (and garbage-collect)
        # each other's runtime_resources, such as the job's unpacked working dir.
        common = ["--object-store-memory", str(100 * MiB), "--disable-usage-stats"]
        self.start_node(
            "head", "--head", "--port", str(self.gcs_port),
            "--num-cpus", "3", "--resources", json.dumps({"hivebus_executor": 1}),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(next(self.ports)),
            *self.node_ports(self.metrics_ports[0]), *common)
        self.start_node(
            "node2", "--address", f"127.0.0.1:{self.gcs_port}",
            "--num-cpus", "3", "--resources", json.dumps({"hivebus_executor": 1, "second": 1}),
            *self.node_ports(self.metrics_ports[1]), *common)

    def start_node(self, name: str, *args: str) -> None:
        temp_dir = self.temp_dir / name
        try:
            self.keeper.run("ray", "start", "--temp-dir", str(temp_dir), *args)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_tails(temp_dir)}") from None

    def ray(self, *args: str, timeout: float = 120.0) -> str:
        return self.keeper.run("ray", *args, timeout=timeout)

    def api(self, path: str) -> Any:
        """GET from the dashboard's REST API (what the ray job CLI talks to)."""
        request = urllib.request.Request(self.dashboard + path,
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def dashboard_is_up(self) -> bool:
        try:
            return bool(self.api("/api/version"))
        except OSError:
            return False

    def nodes(self) -> list[dict[str, Any]]:
        return json.loads(self.ray("list", "nodes", "--address", self.dashboard, "--format", "json"))

    def hivebus_actors(self) -> dict[str, dict[str, Any]]:
        """``ray list actors`` of namespace hivebus, by name (the latest of each name)."""
        out = self.ray("list", "actors", "--address", self.dashboard, "--format", "json",
                       "--filter", "ray_namespace=hivebus", "--limit", "1000")
        if out.strip() == "No resource in the cluster":  # what the CLI prints for none, even as JSON
            return {}
        actors = json.loads(out)
        # A name can appear twice (a DEAD actor and its successor): a live one wins.
        return {a["name"]: a for a in sorted(actors, key=lambda a: a["state"] == "ALIVE")}

    def metrics(self, node: int = 0) -> str:
        """The Prometheus text of a node's metrics agent (node 0: the head)."""
        url = f"http://127.0.0.1:{self.metrics_ports[node]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def close(self) -> None:
        try:
            self.keeper.close()
        finally:
            subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


def log_tails(temp_dir: Path, lines: int = 15) -> str:
    logs = temp_dir / "session_latest" / "logs"
    tails = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        path = logs / name
        if path.is_file() and path.stat().st_size:
            tails.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(tails)


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    running = RayCluster()
    try:
        running.start()
        yield running
    finally:
        running.close()


@pytest.fixture
def open_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", auth=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def poll(probe: Callable[[], T], *, timeout: float, until: Callable[[T], bool] = bool,
         every: float = 1.0) -> T:
    """Call ``probe`` until ``until`` holds for its value or ``timeout`` passes; the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(every)
        value = probe()
    return value


ITEMS = 6


def task_body() -> dict[str, Any]:
    # Independent items that each hold an executor for a second: both executors get some.
    items = [{"id": f"part{i}", "run": f"echo {i} > part{i}.txt && sleep 1"} for i in range(ITEMS)]
    return {"title": "spread over two Ray nodes", "workdir": ".", "work_items": items,
            "gates": [{"name": "all-parts", "run": f"test $(cat part*.txt | wc -l) -eq {ITEMS}"}]}


async def submit_and_wait(nats_url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """What any NATS client does: JSON on task.submit, wait for task.completion, task.get."""
    nc = await nats.connect(nats_url)
    try:
        done: asyncio.Queue[str] = asyncio.Queue()

        async def on_completion(msg) -> None:  # type: ignore[no-untyped-def]
            await done.put(msg.subject.rsplit(".", 1)[1])

        await nc.subscribe("task.completion.*", cb=on_completion)
        reply = json.loads((await nc.request("task.submit", json.dumps(body).encode(), timeout=30)).data)
        assert reply["type"] == "TaskAccepted", reply
        while await asyncio.wait_for(done.get(), timeout) != reply["task_id"]:
            pass
        get = json.dumps({"task_id": reply["task_id"]}).encode()
        return json.loads((await nc.request("task.get", get, timeout=30)).data)
    finally:
        await nc.close()


def test_hivebus_up_as_a_ray_job_runs_items_on_both_nodes_and_leaves_no_actor_after_job_stop(
        cluster: RayCluster, open_nats: EmbeddedNats, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    # One executor per node: each needs the custom resource that each node has one of.
    (job_dir / "hive.yaml").write_text(yaml.safe_dump({
        "planner": {"cpu": 0.5, "memory_mb": 256}, "verifier": {"cpu": 0.5, "memory_mb": 256},
        "executor": {"replicas": 2, "cpu": 1, "memory_mb": 512, "resources": {"hivebus_executor": 1}},
    }))
    state = tmp_path / "state"
    submission = f"hivebus-test-{uuid.uuid4().hex[:8]}"
    assert poll(cluster.dashboard_is_up, timeout=60), "the dashboard did not answer"

    cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", submission,
                "--working-dir", str(job_dir), "--no-wait", "--",
                "hivebus", "up", "--ray-address", "auto", "--nats", open_nats.url,
                "--policy", "local", "--config", "hive.yaml", "--state-dir", str(state))

    def hive_is_up() -> bool:
        status = cluster.api(f"/api/jobs/{submission}")["status"]
        logs = cluster.api(f"/api/jobs/{submission}/logs")["logs"]
        assert status in ("PENDING", "RUNNING"), f"the job is {status}:\n{logs}"
        return "hivebus is up" in logs

    assert poll(hive_is_up, timeout=120), "`hivebus is up` never appeared in the job's logs"
    nodes = {n["node_id"]: n for n in cluster.nodes() if n["state"] == "ALIVE"}
    assert len(nodes) == 2
    agents = {name: a["node_id"] for name, a in cluster.hivebus_actors().items() if a["state"] == "ALIVE"}
    assert sorted(agents) == ["executor-1", "executor-2", "planner-1", "resources", "verifier-1"]
    assert {agents["executor-1"], agents["executor-2"]} == set(nodes)

    record = asyncio.run(submit_and_wait(open_nats.url, task_body(), timeout=120))

    assert record["state"] == "SUCCEEDED", record
    artifacts = Path(record["report_path"]).parent
    results = [json.loads((artifacts / f"work_item_part{i}.json").read_text()) for i in range(ITEMS)]
    assert all(r["status"] == "succeeded" for r in results)
    assert {r["node_id"] for r in results} == set(nodes), "items ran on one node only"

    # Needs HiveMetrics (orchestrator/metrics.py) wired into the orchestrator. The hive
    # records them in the `hivebus up` driver, which runs on the head, so they are on the
    # head's metrics agent, with Ray's `ray_` prefix.
    def task_is_counted(found: dict[str, list[tuple[dict[str, str], float]]]) -> bool:
        def total(name: str) -> float:
            return sum(value for _, value in found.get(name, []))

        return (total("ray_hivebus_items_completed_total") >= ITEMS
                and total("ray_hivebus_dispatch_latency_seconds_count") >= ITEMS
                and any(labels.get("state") == "SUCCEEDED" and value >= 1
                        for labels, value in found.get("ray_hivebus_tasks", [])))

    found = poll(lambda: samples(cluster.metrics(0), "ray_hivebus_"), until=task_is_counted, timeout=45)
    assert task_is_counted(found), f"the head's metrics endpoint has: {found}"

    cluster.ray("job", "stop", "--address", cluster.dashboard, submission, timeout=90)

    assert cluster.api(f"/api/jobs/{submission}")["status"] == "STOPPED"
    assert not (state / "hive.json").exists(), "hivebus up did not stop through its finally"

    def live_hivebus_actors() -> list[str]:
        return [f"{name} {a['state']}" for name, a in cluster.hivebus_actors().items() if a["state"] != "DEAD"]

    assert poll(live_hivebus_actors, until=lambda live: not live, timeout=60) == []
    assert sorted(cluster.hivebus_actors()) == sorted(agents)  # all listed, all DEAD
