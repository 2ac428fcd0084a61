"""``hivebus bench``: hivebus's figures, measured against the floors of the machine it runs on.

One run starts a local Ray once and hives on it (each with its own embedded nats-server
and state dir in a temporary folder), and measures:

- the floors: a raw NATS request/reply round trip (nats-py, a trivial responder on the
  hive's own server), a raw subprocess spawn of ``true``, a raw Ray actor call (one at a
  time, and pipelined);
- submit -> RUNNING latency, seen by a client subscribed to ``task.lifecycle.*``;
- the per-item latency of a serial chain of no-op ``call`` items and of no-op
  ``run: "true"`` items (the spacing of their ``item_finished`` events), each as a ratio
  to its floor;
- the throughput of a fan-out of no-op ``call`` items with the default executor pool and
  with 1, 2 and 4 executors, and of no-op shell items with the default pool;
- the planning and scheduling cost per item of layered DAGs of 100, 1,000 and 10,000
  items, on the pure parts (no servers): validation, planner, plan checks, scheduler;
- the idle RSS of the hive's own process, of each agent and of the nats-server.

It prints a table, writes the figures as JSON with ``--json PATH``, and says which of the
targets of issue 5 are met. The targets are reported, never asserted: timings depend on
the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nats
import psutil
import ray
from nats.aio.msg import Msg
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors import NAMESPACE, DeclarativePlanner
from bus import subjects
from bus.connection import decode_message
from schemas import (
    CompletionEvent,
    HivebusError,
    HiveConfig,
    LifecycleEvent,
    PlanRequest,
    PoolConfig,
    ProgressEvent,
    TaskSpec,
    TaskState,
    dag_problems,
    decode,
    encode,
)

from .hive import AsyncHive, init_ray
from .scheduler import Scheduler
from .service import new_task_id
from .validation import limit_problems

#: The targets of issue 5 on a 2-core machine.
TARGET_SUBMIT_P50_MS = 10.0
TARGET_CALL_RATIO = 3.0
TARGET_SHELL_RATIO = 1.5
TARGET_FANOUT_ITEMS_PER_S = 2000.0
TARGET_SCHEDULING_GROWTH = 1.5

DAG_SIZES = (100, 1000, 10000)
#: The executor pools of the scaling curve share these limits; only the count changes.
#: Small memory requests keep four executors placeable on a small machine's Ray.
SCALING_EXECUTOR = PoolConfig(cpu=1, memory_mb=512)
SCALING_SERVICE = PoolConfig(replicas=1, cpu=0.5, memory_mb=256)
NOOP_MODULE = "def run(**kwargs):\n    return None\n"


class BenchError(HivebusError):
    """A measurement could not be made (a task did not succeed, an event never came)."""


@dataclass(frozen=True)
class Sizes:
    """How many samples each measurement takes."""

    nats_requests: int
    spawns: int
    ray_serial: int
    ray_pipelined: int
    submissions: int
    chain: int
    fanout: int
    executors: tuple[int, ...]
    dag_repeats: int
    #: How long one measured task may take before the benchmark gives up on it (a hive
    #: that hangs fails the run with a sentence instead of holding CI until its timeout).
    task_timeout_s: float


QUICK = Sizes(nats_requests=500, spawns=100, ray_serial=200, ray_pipelined=1000,
              submissions=40, chain=25, fanout=200, executors=(1, 2, 4), dag_repeats=3,
              task_timeout_s=60)
FULL = Sizes(nats_requests=3000, spawns=500, ray_serial=1000, ray_pipelined=4000,
             submissions=250, chain=200, fanout=2000, executors=(1, 2, 4), dag_repeats=5,
             task_timeout_s=600)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hivebus bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples and a fan-out of 200 items: well under two minutes (CI)")
    parser.add_argument("--json", metavar="PATH", type=Path, default=None,
                        help="also write every figure as JSON to PATH")
    parser.add_argument("--submissions", type=_sample_size, metavar="N", default=None,
                        help="tasks submitted for the submit -> RUNNING latency (default 250, quick 40)")
    parser.add_argument("--chain", type=_sample_size, metavar="N", default=None,
                        help="items in each serial chain (default 200, quick 25)")
    parser.add_argument("--fanout", type=_sample_size, metavar="N", default=None,
                        help="items in each fan-out (default 2000, quick 200)")
    parser.add_argument("--executors", type=_executor_counts, metavar="LIST", default=None,
                        help="executor counts of the scaling curve (default 1,2,4)")


def _sample_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"at least 2 samples are needed, not {value}")
    return value


def _executor_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as 1,2,4") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"every executor count must be at least 1, not {text!r}")
    return counts


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The quick or full sizes, with the counts given on the command line."""
    given = {name: getattr(args, name, None) for name in ("submissions", "chain", "fanout", "executors")}
    return replace(QUICK if args.quick else FULL,
                   **{name: value for name, value in given.items() if value is not None})


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Measure, print the table, write the JSON; 0 when every figure was measured."""
    sizes = sizes_from(args)
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    def say(text: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/] {text}")

    biggest = max((*sizes.executors, HiveConfig().executor.replicas))
    # One Ray for every hive of the run: starting it is the slowest part of a hive.
    owns_ray = init_ray(HiveConfig(executor=PoolConfig(replicas=biggest)), None)
    try:
        with tempfile.TemporaryDirectory(prefix="hivebus-bench-") as root:
            report = asyncio.run(run_bench(sizes, Path(root), say=say))
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    report["mode"] = "quick" if args.quick else "full"
    report["duration_s"] = round(time.monotonic() - started, 1)
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                         "platform": platform.platform(),
                         # Other work on the machine shows here, and in every figure.
                         "load_average_at_start": load_at_start,
                         "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                         "commit": _commit()}
    report["sizes"] = asdict(sizes)
    console.print(figures_table(report))
    console.print(targets_table(report["targets"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        console.print(f"figures written to {escape(str(args.json))}")
    return 0


async def run_bench(sizes: Sizes, root: Path, *, say: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement, in an order that keeps them from disturbing each other:
    idle memory first (before the run grows the heap), the pure DAG costs last."""
    workdir = root / "work"
    workdir.mkdir()
    (workdir / "noop.py").write_text(NOOP_MODULE, encoding="utf-8")
    report: dict[str, Any] = {}

    say("starting a hive with the default pools")
    async with _hive(root, "default", HiveConfig(), workdir,
                     timeout_s=sizes.task_timeout_s) as (hive, client, events):
        await asyncio.sleep(1.0)  # let the agents finish starting up: idle means idle
        report["idle_memory_mb"] = await idle_memory(hive)

        say(f"floor: NATS request/reply x{sizes.nats_requests}")
        assert hive.nats is not None
        rtt = await nats_round_trips(hive.nats_url, hive.nats.credentials("orchestrator"),
                                     sizes.nats_requests)
        say(f"floor: subprocess spawn of true x{sizes.spawns}")
        spawn = await subprocess_spawns(sizes.spawns)
        say(f"floor: Ray actor calls x{sizes.ray_serial} serial, x{sizes.ray_pipelined} pipelined")
        ray_floor = await asyncio.to_thread(ray_calls, sizes.ray_serial, sizes.ray_pipelined)
        report["floors"] = {"nats_rtt_ms": stats(rtt), "subprocess_spawn_ms": stats(spawn),
                            "ray_call_ms": ray_floor}

        say(f"submit -> RUNNING x{sizes.submissions}")
        report["submit_to_running_ms"], report["submit_ack_ms"] = await submit_latency(
            client, events, workdir, sizes.submissions)

        nats_p50 = report["floors"]["nats_rtt_ms"]["p50"]
        spawn_p50 = report["floors"]["subprocess_spawn_ms"]["p50"]
        for kind, floor in (("call", nats_p50), ("shell", nats_p50 + spawn_p50)):
            say(f"serial chain of {sizes.chain} no-op {kind} items")
            figures = await serial_chain(client, events, workdir, kind, sizes.chain)
            figures["floor_ms"] = round(floor, 3)
            figures["ratio_to_floor"] = round(figures["p50"] / floor, 2)
            report[f"serial_{kind}_item_ms"] = figures

        default_fanout: dict[str, Any] = {}
        for kind in ("call", "shell"):
            say(f"fan-out of {sizes.fanout} no-op {kind} items, default pool "
                f"({HiveConfig().executor.replicas} executors)")
            default_fanout[kind] = await fanout(client, events, workdir, kind, sizes.fanout)

    curve: dict[str, Any] = {}
    for count in sizes.executors:
        config = HiveConfig(executor=SCALING_EXECUTOR.model_copy(update={"replicas": count}),
                            planner=SCALING_SERVICE, verifier=SCALING_SERVICE)
        say(f"fan-out of {sizes.fanout} no-op call items, {count} executor(s)")
        async with _hive(root, f"executors-{count}", config, workdir,
                         timeout_s=sizes.task_timeout_s) as (_, client, events):
            curve[str(count)] = await fanout(client, events, workdir, "call", sizes.fanout)
    # The headline is the fan-out of no-op call items, what a task queue's "no-op job"
    # is; no-op shell items add a process spawn each, shown beside it.
    report["fanout_throughput_items_per_s"] = {
        "items": sizes.fanout,
        "kind": "call",
        "default": default_fanout["call"]["items_per_s"],
        "default_shell": default_fanout["shell"]["items_per_s"],
        "default_executors": HiveConfig().executor.replicas,
        "executors": {n: figures["items_per_s"] for n, figures in curve.items()},
    }
    report["fanout_detail"] = {"default": default_fanout["call"],
                               "default_shell": default_fanout["shell"], **curve}

    say("planning + scheduling cost of DAGs of " + ", ".join(f"{n:,}" for n in DAG_SIZES) + " items")
    report["scheduling_us_per_item"], report["scheduling_breakdown_us_per_item"] = \
        await scheduling_costs(workdir, DAG_SIZES, repeats=sizes.dag_repeats)
    report["targets"] = targets(report)
    return report


# -- hives, and what a client sees of them ---------------------------------------------


class Recorder:
    """Arrival times (monotonic, s) of a hive's task events at a client connection.

    The callback only stores the bytes; progress events are decoded afterwards, so that
    recording costs the hive (which shares this process) as little as possible.
    """

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.progress: dict[str, list[tuple[float, bytes, dict[str, str] | None]]] = defaultdict(list)
        self.running: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self._waiters: dict[tuple[str, str], asyncio.Future[float]] = {}
        self._subs: list[Any] = []

    async def start(self, nc: nats.NATS) -> None:
        self._subs = [
            await nc.subscribe(subjects.progress("*"), cb=self._on_progress),
            await nc.subscribe(subjects.lifecycle("*"), cb=self._on_lifecycle),
            await nc.subscribe(subjects.completion("*"), cb=self._on_completion),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_progress(self, msg: Msg) -> None:
        self.progress[msg.subject.rsplit(".", 1)[1]].append((time.monotonic(), msg.data, msg.headers))

    async def _on_lifecycle(self, msg: Msg) -> None:
        now = time.monotonic()
        event = decode_message(msg, LifecycleEvent)
        if event.state == TaskState.RUNNING and event.task_id not in self.running:
            self._arrived("running", event.task_id, now)

    async def _on_completion(self, msg: Msg) -> None:
        now = time.monotonic()
        self._arrived("completed", decode_message(msg, CompletionEvent).task_id, now)

    def _arrived(self, kind: str, task_id: str, when: float) -> None:
        getattr(self, kind)[task_id] = when
        waiter = self._waiters.pop((kind, task_id), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(when)

    async def wait(self, kind: str, task_id: str) -> float:
        """When the task's ``running`` or ``completed`` event arrived (waiting for it)."""
        seen = getattr(self, kind).get(task_id)
        if seen is not None:
            return seen
        waiter = self._waiters.setdefault((kind, task_id), asyncio.get_running_loop().create_future())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.timeout_s)
        except asyncio.TimeoutError:
            raise BenchError(f"task {task_id}: no {kind} event within {self.timeout_s:g} s") from None

    def progress_of(self, task_id: str) -> list[tuple[float, ProgressEvent]]:
        """The task's progress events in arrival order, decoded (and forgotten here)."""
        raw = self.progress.pop(task_id, [])
        return [(t, decode(data, ProgressEvent, headers=headers)) for t, data, headers in raw]


@asynccontextmanager
async def _hive(root: Path, name: str, config: HiveConfig, workdir: Path, *,
                timeout_s: float) -> AsyncIterator[tuple[AsyncHive, AsyncHive, Recorder]]:
    """A hive on the Ray of this process with its own nats-server and state dir, and a
    client connected to it as ``hivebus submit`` would be; all closed on the way out."""
    hive = await AsyncHive.start(config=config, state_dir=root / name, owns_ray=False,
                                 workdir_root=workdir)
    try:
        client = await AsyncHive.connect(hive.nats_url, state_dir=root / name)
        try:
            events = Recorder(timeout_s=timeout_s)
            await events.start(client.bus.nc)
            yield hive, client, events
            await events.stop()
        finally:
            await client.close()
    finally:
        await hive.close()
        shutil.rmtree(root / name, ignore_errors=True)


async def _run_to_end(client: AsyncHive, events: Recorder, spec: TaskSpec) -> tuple[str, float, float]:
    """Submit ``spec`` and wait for its end: (task_id, when it was sent, when it completed)."""
    sent = time.monotonic()
    task_id = await client.submit(spec)
    completed = await events.wait("completed", task_id)
    record = await client.get(task_id)
    if record.state != TaskState.SUCCEEDED:
        raise BenchError(f"task {task_id} ({spec.title}) ended {record.state.value} "
                         f"({record.exit_reason}): {record.message}")
    return task_id, sent, completed


async def _warm_up(client: AsyncHive, events: Recorder, spec: TaskSpec) -> None:
    """Run a small task first, so that a measurement does not pay for first calls."""
    task_id, _, _ = await _run_to_end(client, events, spec)
    events.progress.pop(task_id, None)


# -- floors ----------------------------------------------------------------------------


async def nats_round_trips(url: str, auth: Any, count: int) -> list[float]:
    """Request/reply round trips (ms) between two plain nats-py connections."""
    options = auth.connect_options() if auth is not None else {}
    responder = await nats.connect(url, name="bench-responder", **options)
    requester = await nats.connect(url, name="bench-requester", **options)
    try:
        async def echo(msg: Msg) -> None:
            await msg.respond(b"")

        await responder.subscribe("bench.echo", cb=echo)
        await responder.flush()
        for _ in range(50):  # warm up both connections
            await requester.request("bench.echo", b"x", timeout=5)
        times = []
        for _ in range(count):
            t0 = time.perf_counter()
            await requester.request("bench.echo", b"x", timeout=5)
            times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        await requester.close()
        await responder.close()


async def subprocess_spawns(count: int) -> list[float]:
    """Spawning ``true`` and waiting for it (ms), as asyncio does it."""
    true = shutil.which("true") or "/bin/true"
    times = []
    for i in range(count + 5):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(true)
        await proc.wait()
        if i >= 5:  # the first spawns pay for the child watcher
            times.append((time.perf_counter() - t0) * 1000)
    return times


class _Echo:
    """The trivial Ray actor of the Ray floor."""

    def ping(self) -> None:
        return None


def ray_calls(serial: int, pipelined: int) -> dict[str, Any]:
    """A Ray actor call one at a time (ms per call), and ``pipelined`` calls in flight."""
    actor = ray.remote(num_cpus=0)(_Echo).remote()  # type: ignore[attr-defined]
    try:
        for _ in range(20):
            ray.get(actor.ping.remote())
        times = []
        for _ in range(serial):
            t0 = time.perf_counter()
            ray.get(actor.ping.remote())
            times.append((time.perf_counter() - t0) * 1000)
        ray.get([actor.ping.remote() for _ in range(200)])
        t0 = time.perf_counter()
        ray.get([actor.ping.remote() for _ in range(pipelined)])
        elapsed = time.perf_counter() - t0
    finally:
        ray.kill(actor)
    return {"serial": stats(times),
            "pipelined": {"per_call_ms": round(elapsed * 1000 / pipelined, 4),
                          "calls_per_s": round(pipelined / elapsed, 1), "n": pipelined}}


# -- the hive's own figures -----------------------------------------------------------


async def idle_memory(hive: AsyncHive) -> dict[str, Any]:
    """RSS (MB) of this process (the hive), of each agent and of the nats-server."""
    assert hive.pool is not None
    agents = {}
    for name in sorted(hive.pool.info):
        info = await ray.get_actor(name, namespace=NAMESPACE).ready.remote()
        agents[name] = _rss_mb(info["pid"])
    figures: dict[str, Any] = {"hive": _rss_mb(os.getpid()), "agents": agents}
    if hive.nats is not None and hive.nats.pid is not None:
        figures["nats_server"] = _rss_mb(hive.nats.pid)
    return figures


def _rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


async def submit_latency(client: AsyncHive, events: Recorder, workdir: Path,
                         count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """From just before ``task.submit`` to the RUNNING event, each task on an idle hive;
    also until the TaskAccepted reply."""
    spec = TaskSpec(title="bench: submit", workdir=str(workdir),
                    work_items=[{"id": "noop", "run": "true"}])  # type: ignore[list-item]
    await _warm_up(client, events, spec)
    running, accepted = [], []
    for _ in range(count):
        t0 = time.monotonic()
        task_id = await client.submit(spec)
        accepted.append((time.monotonic() - t0) * 1000)
        running.append((await events.wait("running", task_id) - t0) * 1000)
        await events.wait("completed", task_id)  # the next one starts on an idle hive
        events.progress.pop(task_id, None)
    return stats(running), stats(accepted)


def _chain_spec(workdir: Path, kind: str, count: int, *, title: str) -> TaskSpec:
    body = {"call": "noop:run"} if kind == "call" else {"run": "true"}
    return TaskSpec.model_validate({
        "title": title, "workdir": str(workdir),
        "work_items": [{"id": f"i{i}", **body, **({"depends_on": [f"i{i - 1}"]} if i else {})}
                       for i in range(count)],
    })


async def serial_chain(client: AsyncHive, events: Recorder, workdir: Path, kind: str,
                       count: int) -> dict[str, Any]:
    """Per-item latency (ms) of a chain of no-op items: the gaps between consecutive
    ``item_finished`` events, and where each gap goes."""
    await _warm_up(client, events, _chain_spec(workdir, kind, 3, title=f"bench: warm {kind}"))
    task_id, _, _ = await _run_to_end(client, events, _chain_spec(
        workdir, kind, count, title=f"bench: serial {kind} chain"))
    seen: dict[str, dict[str, float]] = defaultdict(dict)
    child: list[float] = []
    for when, event in events.progress_of(task_id):
        if event.item_id is not None:
            seen[event.kind][event.item_id] = when
            if event.kind == "item_finished" and event.duration_s is not None:
                child.append(event.duration_s * 1000)
    finished, started, queued = seen["item_finished"], seen["item_started"], seen["item_queued"]
    ids = [f"i{i}" for i in range(count)]
    gaps = [(finished[b] - finished[a]) * 1000 for a, b in zip(ids, ids[1:])]
    figures = stats(gaps)
    figures["mean"] = round((finished[ids[-1]] - finished[ids[0]]) * 1000 / (count - 1), 3)
    # Where a gap goes: the orchestrator from one item's end to the next one's dispatch,
    # the executor taking it (request, lease, started event), and the run itself
    # (child process, result, release, reply, item_finished event).
    figures["breakdown_p50_ms"] = {
        "finished_to_queued": _p50([(queued[b] - finished[a]) * 1000 for a, b in zip(ids, ids[1:])]),
        "queued_to_started": _p50([(started[i] - queued[i]) * 1000 for i in ids[1:]]),
        "started_to_finished": _p50([(finished[i] - started[i]) * 1000 for i in ids[1:]]),
        "child_process": _p50(child),
    }
    return figures


async def fanout(client: AsyncHive, events: Recorder, workdir: Path, kind: str,
                 count: int) -> dict[str, Any]:
    """Throughput of ``count`` independent no-op ``call`` or shell items: items per
    second from the submission to the last ``item_finished`` event."""
    body = {"call": "noop:run"} if kind == "call" else {"run": "true"}
    await _warm_up(client, events, TaskSpec.model_validate({
        "title": "bench: warm fan-out", "workdir": str(workdir),
        "work_items": [{"id": f"w{i}", **body} for i in range(4)]}))
    spec = TaskSpec.model_validate({
        "title": f"bench: fan-out of {kind} items", "workdir": str(workdir),
        "work_items": [{"id": f"i{i}", **body} for i in range(count)]})
    task_id, sent, completed = await _run_to_end(client, events, spec)
    progress = events.progress_of(task_id)
    # Executors announce item_started; were none seen, the first dispatch stands in for it.
    starts = ([t for t, e in progress if e.kind == "item_started"]
              or [t for t, e in progress if e.kind == "item_queued"])
    ends = [t for t, e in progress if e.kind == "item_finished"]
    if len(ends) != count:
        raise BenchError(f"fan-out {task_id}: {len(ends)} item_finished events for {count} items")
    last = max(ends)
    return {
        "items_per_s": round(count / (last - sent), 1),
        "items_per_s_executing": round((count - 1) / (last - min(starts)), 1),
        "submit_to_first_start_s": round(min(starts) - sent, 3),
        "submit_to_last_finish_s": round(last - sent, 3),
        "submit_to_completion_s": round(completed - sent, 3),
    }


# -- planning and scheduling, without servers -------------------------------------------


def layered_dag(count: int, workdir: Path, *, layers: int = 10, fan_in: int = 3) -> dict[str, Any]:
    """A task file body of ``count`` items in ``layers`` layers; each item past the first
    layer depends on ``fan_in`` items of the layer before."""
    width = max(1, math.ceil(count / layers))
    items = []
    for i in range(count):
        layer, pos = divmod(i, width)
        deps = [] if layer == 0 else sorted(
            {f"i{(layer - 1) * width + (pos + k) % width}" for k in range(min(fan_in, width))})
        items.append({"id": f"i{i}", "run": "true", "depends_on": deps})
    return {"title": f"bench: dag of {count}", "workdir": str(workdir), "work_items": items}


async def scheduling_costs(workdir: Path, sizes: Sequence[int], *,
                           repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Microseconds per item of planning + scheduling a DAG, by size, and by part.

    The parts a task's items go through before they reach an executor: TaskSpec
    validation, the declarative planner, the orchestrator's checks of the plan, and the
    scheduler (add, then take/finish until the batch is done). The msgpack round trip of
    ``task.submit`` is reported beside them (``codec``), not in the total.
    """
    config = HiveConfig()
    planner = DeclarativePlanner(agent_id="bench")

    async def once(data: dict[str, Any]) -> dict[str, float]:
        n = len(data["work_items"])
        clock: dict[str, float] = {}
        t0 = time.perf_counter()
        spec = TaskSpec.model_validate(data)
        t1 = time.perf_counter()
        plan = await planner.plan(PlanRequest(task_id=new_task_id(), iteration=1, spec=spec))
        t2 = time.perf_counter()
        problems = dag_problems(plan.items, field="plan") + limit_problems(plan.items, config, field="plan")
        t3 = time.perf_counter()
        scheduler, key = Scheduler(), ("bench", 1)
        scheduler.add(key, plan.items, priority=1)
        while not scheduler.batch_done(key):
            for ready in scheduler.take(64):
                scheduler.finish(key, ready.item.id, ok=True)
        t4 = time.perf_counter()
        wire, headers = encode(spec)
        decode(wire, TaskSpec, headers=headers)
        t5 = time.perf_counter()
        if problems:
            raise BenchError(f"the benchmark's own DAG was refused: {problems[0]}")
        for part, (a, b) in {"validate": (t0, t1), "plan": (t1, t2), "check": (t2, t3),
                             "schedule": (t3, t4), "codec": (t4, t5)}.items():
            clock[part] = (b - a) * 1e6 / n
        return clock

    await once(layered_dag(sizes[0], workdir))  # warm up pydantic's validators
    totals: dict[str, Any] = {}
    parts: dict[str, Any] = {}
    for size in sizes:
        data = layered_dag(size, workdir)
        runs = []
        # Small DAGs are repeated more. Each run starts from a collected heap, so that
        # the collector's passes fall in every run alike.
        for _ in range(max(repeats, min(30, max(sizes) // size))):
            gc.collect()
            runs.append(await once(data))
        # The fastest run of each part: what other processes do to this machine only
        # ever adds time. The garbage collector's passes are this process's own and
        # happen in every run alike, so they stay in.
        best = {part: min(run[part] for run in runs) for part in runs[0]}
        parts[str(size)] = {part: round(us, 2) for part, us in best.items()}
        totals[str(size)] = round(sum(us for part, us in best.items() if part != "codec"), 2)
    if "1000" in totals and "10000" in totals:
        totals["growth_10000_vs_1000"] = round(totals["10000"] / totals["1000"], 2)
    return totals, parts


def _commit() -> str | None:
    """The git commit of the code measured (with ``+dirty`` for local changes), if known."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# -- figures -------------------------------------------------------------------------


def stats(samples_ms: Sequence[float]) -> dict[str, Any]:
    """p50, p99 and mean of a sample (ms), with its size."""
    ordered = sorted(samples_ms)
    return {"p50": round(_quantile(ordered, 0.5), 3), "p99": round(_quantile(ordered, 0.99), 3),
            "mean": round(statistics.fmean(ordered), 3), "n": len(ordered)}


def _p50(samples: Sequence[float]) -> float:
    return round(_quantile(sorted(samples), 0.5), 3)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not ordered:
        raise BenchError("no samples were taken")
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of issue 5: the measured value, the bound, and whether it is met."""
    floors = report["floors"]
    nats_p50 = floors["nats_rtt_ms"]["p50"]
    shell_floor = nats_p50 + floors["subprocess_spawn_ms"]["p50"]

    def at_most(value: float, bound: float, unit: str) -> dict[str, Any]:
        return {"value": value, "target": round(bound, 3), "unit": unit, "rule": "<=",
                "met": value <= bound}

    def at_least(value: float, bound: float, unit: str) -> dict[str, Any]:
        return {"value": value, "target": round(bound, 3), "unit": unit, "rule": ">=",
                "met": value >= bound}

    return {
        "submit_to_running_p50": at_most(report["submit_to_running_ms"]["p50"], TARGET_SUBMIT_P50_MS, "ms"),
        "serial_call_item_p50": at_most(report["serial_call_item_ms"]["p50"],
                                        TARGET_CALL_RATIO * nats_p50, "ms"),
        "serial_shell_item_p50": at_most(report["serial_shell_item_ms"]["p50"],
                                         TARGET_SHELL_RATIO * shell_floor, "ms"),
        "fanout_throughput": at_least(report["fanout_throughput_items_per_s"]["default"],
                                      TARGET_FANOUT_ITEMS_PER_S, "items/s"),
        "scheduling_growth_10000_vs_1000": at_most(
            report["scheduling_us_per_item"]["growth_10000_vs_1000"], TARGET_SCHEDULING_GROWTH, "x"),
    }


BREAKDOWN_LABELS = {
    "finished_to_queued": "  end -> next queued",
    "queued_to_started": "  queued -> started",
    "started_to_finished": "  started -> finished",
    "child_process": "    in the child",
}


def figures_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"hivebus bench ({report['mode']}, {report['machine']['cpus']} CPUs)")
    table.add_column("figure")
    table.add_column("p50 / value", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("notes")
    floors = report["floors"]

    def timing(name: str, figures: dict[str, Any], notes: str = "") -> None:
        table.add_row(name, f"{figures['p50']:.2f} ms", f"{figures['p99']:.2f} ms", notes)

    timing("floor: NATS round trip", floors["nats_rtt_ms"], f"n={floors['nats_rtt_ms']['n']}")
    timing("floor: spawn of true", floors["subprocess_spawn_ms"], f"n={floors['subprocess_spawn_ms']['n']}")
    timing("floor: Ray actor call", floors["ray_call_ms"]["serial"], "one at a time")
    pipelined = floors["ray_call_ms"]["pipelined"]
    table.add_row("floor: Ray actor call", f"{pipelined['per_call_ms']:.2f} ms", "",
                  f"pipelined: {pipelined['calls_per_s']:,.0f}/s")
    submit = report["submit_to_running_ms"]
    timing("submit -> RUNNING", submit, f"n={submit['n']}; accepted {report['submit_ack_ms']['p50']:.1f} ms")
    for kind in ("call", "shell"):
        figures = report[f"serial_{kind}_item_ms"]
        timing(f"serial {kind} item", figures,
               f"{figures['ratio_to_floor']:,.1f}x floor of {figures['floor_ms']:.2f} ms")
        for part, ms in figures["breakdown_p50_ms"].items():
            table.add_row(BREAKDOWN_LABELS[part], f"{ms:.2f} ms", "", "")
    throughput = report["fanout_throughput_items_per_s"]
    table.add_row(f"fan-out of {throughput['items']:,} call items", f"{throughput['default']:,.0f}/s", "",
                  f"default ({throughput['default_executors']} executors)")
    for count, value in throughput["executors"].items():
        table.add_row(f"fan-out of {throughput['items']:,} call items", f"{value:,.0f}/s", "",
                      f"{count} executor(s)")
    table.add_row(f"fan-out of {throughput['items']:,} shell items", f"{throughput['default_shell']:,.0f}/s",
                  "", f"default ({throughput['default_executors']} executors)")
    scheduling = report["scheduling_us_per_item"]
    for size in DAG_SIZES:
        table.add_row(f"plan + schedule, {size:,}", f"{scheduling[str(size)]:.1f} us", "", "per item")
    table.add_row("  growth 10,000 vs 1,000", f"{scheduling['growth_10000_vs_1000']:.2f}x", "", "")
    memory = report["idle_memory_mb"]
    table.add_row("idle RSS: hive process", f"{memory['hive']:.0f} MB", "", "")
    for name, mb in memory["agents"].items():
        table.add_row(f"idle RSS: {name}", f"{mb:.0f} MB", "", "")
    if "nats_server" in memory:
        table.add_row("idle RSS: nats-server", f"{memory['nats_server']:.0f} MB", "", "")
    return table


def targets_table(found: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="targets (issue 5)")
    for column in ("target", "measured", "bound", "met"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for name, target in found.items():
        table.add_row(name, f"{target['value']:,.2f} {target['unit']}",
                      f"{target['rule']} {target['target']:,.2f} {target['unit']}",
                      "[green]yes[/]" if target["met"] else "[red]no[/]")
    return table


__all__ = ["add_arguments", "cmd_bench", "run_bench", "Sizes", "QUICK", "FULL", "BenchError"]
