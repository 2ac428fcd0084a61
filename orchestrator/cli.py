"""``hivebus``: run a task file with everything embedded, or serve and use a long-running hive.

Exit codes: 0 the task SUCCEEDED (or the command did what it was asked); 1 any other end
or an error outside the user's input; 2 a bad task file or bad arguments; 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from actors.policy import Policy, PolicyFileError
from actors.secrets import SecretError, SecretStore
from bus import subjects
from bus.auth import NatsAuth, NatsAuthError, auth_from_options
from bus.logs import configure_logging
from schemas import (
    MESSAGE_TYPES,
    CompletionEvent,
    HivebusError,
    HiveConfig,
    LifecycleEvent,
    PoolConfig,
    ProgressEvent,
    RequestRejected,
    ResourceSnapshot,
    TaskFileError,
    TaskRecord,
    TaskRef,
    TaskSpec,
    TaskState,
    load_task_file,
)

from .bench import add_arguments as add_bench_arguments
from .bench import cmd_bench
from .hive import AsyncHive, default_state_dir
from .validation import task_problems

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(HivebusError):
    """A mistake in the command line or its input: exit code 2."""


def main(argv: list[str] | None = None) -> int:
    # A hive allocates many small long-lived objects; fewer young-generation passes keep
    # the collector's cost per work item flat as plans grow.
    gc.set_threshold(50_000, 20, 20)
    parser = build_parser()
    args = parser.parse_args(argv)
    # Readable lines on a terminal, JSON lines (with task_id, iteration, work_item, agent) elsewhere.
    configure_logging(json=None, level="WARNING" if not getattr(args, "verbose", False) else "INFO")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return args.handler(args, console)
    except (TaskFileError, UsageError) as exc:
        errors.print(f"hivebus: {escape(str(exc))}")
        return EXIT_USAGE
    except HivebusError as exc:
        errors.print(f"hivebus: {escape(str(exc))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        errors.print("hivebus: interrupted; everything this command started was stopped")
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivebus",
        description="Run tasks autonomously with a team of agents: NATS messages between Ray actors.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nats", metavar="URL", default=os.environ.get("HIVEBUS_NATS_URL"),
                        help="NATS server URL (default: $HIVEBUS_NATS_URL, else embedded / the local hive)")
    common.add_argument("--state-dir", metavar="DIR", type=Path, default=None,
                        help="artifacts and the embedded JetStream store (default: $HIVEBUS_STATE_DIR or ./.hivebus)")
    common.add_argument("-v", "--verbose", action="store_true", help="show hivebus's own log lines")
    creds = common.add_argument_group("credentials for an external NATS (--nats)")
    creds.add_argument("--nats-creds", metavar="FILE", help="a .creds file (JWT and nkey seed)")
    creds.add_argument("--nats-user", metavar="USER")
    creds.add_argument("--nats-password", metavar="PASSWORD")
    creds.add_argument("--nats-token", metavar="TOKEN")
    creds.add_argument("--tls-ca", metavar="FILE")
    creds.add_argument("--tls-cert", metavar="FILE")
    creds.add_argument("--tls-key", metavar="FILE")

    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--ray-address", metavar="ADDR", default=None,
                         help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    serving.add_argument("--policy", metavar="PATH|local", default=None,
                         help="execution policy: a YAML policy file, or 'local' (default for run: "
                              "local, rooted at the task file's folder; for up: deny everything)")
    serving.add_argument("--config", metavar="FILE", type=Path, default=None,
                         help="hive configuration (YAML of HiveConfig: pools, totals)")
    serving.add_argument("--executors", type=int, metavar="N", default=None,
                         help="executor agents (default 2)")
    serving.add_argument("--executor-cpu", type=float, metavar="CPU", default=None,
                         help="CPU limit of each executor (default 1)")
    serving.add_argument("--executor-memory-mb", type=int, metavar="MB", default=None,
                         help="memory limit of each executor in MB (default 1024)")

    def command(name: str, handler: Callable[[argparse.Namespace, Console], int], help_: str,
                parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=parents)
        p.set_defaults(handler=handler)
        return p

    planning = argparse.ArgumentParser(add_help=False)
    planning.add_argument("--planner", choices=["declarative", "ollama"], default=None,
                          help="override the task's planner strategy")
    planning.add_argument("--model", metavar="NAME", default=None,
                          help="Ollama model (default: the task's planner.model or $HIVEBUS_OLLAMA_MODEL)")

    p = command("run", cmd_run, "run a task file to its end with everything embedded", [common, serving, planning])
    p.add_argument("file", type=Path, help="task file (YAML or JSON)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of live progress")

    command("up", cmd_up, "serve a long-running hive (task.submit and friends) until Ctrl-C", [common, serving])

    p = command("submit", cmd_submit, "submit a task file to a running hive", [common, planning])
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="wait for the task to end; exit 0 only on SUCCEEDED")
    p.add_argument("--json", action="store_true")

    p = command("status", cmd_status, "list tasks, or show one", [common])
    p.add_argument("task_id", nargs="?")
    p.add_argument("--json", action="store_true")

    p = command("watch", cmd_watch, "follow a task's events until it ends", [common])
    p.add_argument("task_id")

    p = command("cancel", cmd_cancel, "cancel a task (its running children are killed)", [common])
    p.add_argument("task_id")

    p = command("approve", cmd_approve, "approve an assisted task so that it runs", [common])
    p.add_argument("task_id")

    p = command("report", cmd_report, "print a task's report", [common])
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true", help="print report.json instead of report.md")

    p = command("replay", cmd_replay, "rebuild a task's timeline from the event stream", [common])
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true", help="print the stored events as JSON lines")

    p = command("secret", cmd_secret, "manage the hive's encrypted secrets (${secret:NAME} in env)", [common])
    p.add_argument("action", choices=["set", "list", "delete"])
    p.add_argument("name", nargs="?")
    p.add_argument("--value", help="the value (default: read from standard input)")

    p = command("bench", cmd_bench, "measure hivebus against the floors of this machine", [])
    add_bench_arguments(p)

    p = command("schema", cmd_schema, "print the JSON Schema of every message", [])
    p.add_argument("type", nargs="?", help="one message type, e.g. TaskSpec")
    return parser


# -- helpers -------------------------------------------------------------------------

def hive_policy(args: argparse.Namespace, *, default_root: Path | None) -> Policy | None:
    """``--policy``: a file, ``local`` (rooted at ``default_root`` or the current directory),
    or, when not given, local for ``run`` and deny-all for ``up``."""
    choice = args.policy or ("local" if default_root is not None else None)
    if choice is None:
        return Policy.deny_all()
    if choice == "local":
        return Policy.local(default_root or Path.cwd())
    try:
        return Policy.load(choice)
    except PolicyFileError as exc:
        raise UsageError(str(exc)) from None


def hive_config(args: argparse.Namespace) -> HiveConfig:
    config = HiveConfig()
    if args.config is not None:
        try:
            data = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
            config = HiveConfig.model_validate(data)
        except (OSError, yaml.YAMLError, ValueError) as exc:
            raise UsageError(f"{args.config}: not a valid hive configuration: {exc}") from None
    executor = config.executor.model_dump()
    if args.executors is not None:
        executor["replicas"] = args.executors
    if args.executor_cpu is not None:
        executor["cpu"] = args.executor_cpu
    if args.executor_memory_mb is not None:
        executor["memory_mb"] = args.executor_memory_mb
    try:
        return config.model_copy(update={"executor": PoolConfig(**executor)})
    except ValueError as exc:
        raise UsageError(f"executor options: {exc}") from None


def state_dir(args: argparse.Namespace) -> Path:
    return args.state_dir.resolve() if args.state_dir else default_state_dir()


def hive_file(state: Path) -> Path:
    return state / "hive.json"


def find_nats(args: argparse.Namespace) -> str:
    """Where the hive is: --nats, $HIVEBUS_NATS_URL, or the hive.json of a local ``hivebus up``."""
    if args.nats:
        return args.nats
    path = hive_file(state_dir(args))
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["nats_url"])
    except (OSError, ValueError, KeyError):
        raise HivebusError(
            f"no running hive found (looked for {path}); start one with `hivebus up`, "
            "or pass --nats URL"
        ) from None


def trap_sigterm() -> None:
    """SIGTERM cancels the command's main task, so its finally blocks stop what it started.

    Called again after Ray has started: Ray's core worker installs its own handler.
    """
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def run_async(coro: Awaitable[int]) -> int:
    """Run a command's coroutine; SIGTERM ends it like Ctrl-C (its finally blocks run)."""

    async def guarded() -> int:
        trap_sigterm()
        try:
            return await coro
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None

    return asyncio.run(guarded())


def nats_auth(args: argparse.Namespace) -> NatsAuth | None:
    try:
        return auth_from_options(creds=args.nats_creds, user=args.nats_user,
                                 password=args.nats_password, token=args.nats_token,
                                 tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)
    except NatsAuthError as exc:
        raise UsageError(str(exc)) from None


async def client(args: argparse.Namespace) -> AsyncHive:
    return await AsyncHive.connect(find_nats(args), state_dir=state_dir(args), auth=nats_auth(args))


def planner_overrides(args: argparse.Namespace) -> dict[str, str]:
    overrides = {}
    if args.planner:
        overrides["strategy"] = args.planner
    if args.model:
        overrides["model"] = args.model
    return overrides


def load_for(args: argparse.Namespace, config: HiveConfig | None = None) -> TaskSpec:
    spec = load_task_file(args.file, planner=planner_overrides(args))
    problems = task_problems(spec, config or HiveConfig())
    if problems:
        raise TaskFileError(str(args.file), problems)
    return spec


def summary_line(record: TaskRecord) -> dict[str, Any]:
    return {
        "task_id": record.task_id, "state": record.state.value, "exit_reason": record.exit_reason,
        "iteration": record.iteration, "report": record.report_path,
    }


def report_end(args: argparse.Namespace, console: Console, record: TaskRecord) -> int:
    """How ``run`` and ``submit --wait`` end: the outcome, and 0 only for SUCCEEDED."""
    if args.json:
        print(json.dumps(summary_line(record)))
    else:
        print_end(console, record)
    return EXIT_OK if record.state == TaskState.SUCCEEDED else EXIT_FAILED


def print_end(console: Console, record: TaskRecord) -> None:
    colour = "green" if record.state == TaskState.SUCCEEDED else "red"
    console.print(
        f"[bold {colour}]{record.state.value}[/] (exit_reason: {record.exit_reason}) "
        f"after {record.iteration} iteration(s)"
    )
    if record.message:
        console.print(f"  {escape(record.message)}")
    if record.report_path:
        console.print(f"report: {escape(record.report_path)}")


class ProgressPrinter:
    """Live lines for a task's lifecycle, work items and gates."""

    SYMBOLS = {"succeeded": "[green]✓[/]", "passed": "[green]✓[/]", "skipped": "[yellow]-[/]"}

    def __init__(self, console: Console):
        self.console = console
        self.t0 = time.monotonic()

    def _say(self, text: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.t0:6.1f}s[/] {text}")

    async def lifecycle(self, event: LifecycleEvent) -> None:
        stage = f" · {event.stage}" if event.stage else ""
        it = f" (iteration {event.iteration})" if event.iteration else ""
        reason = f" exit_reason={event.exit_reason}" if event.exit_reason else ""
        self._say(f"[bold]{event.state.value}[/]{stage}{it}{reason}")

    async def progress(self, event: ProgressEvent) -> None:
        count = f" [dim][{event.done}/{event.total}][/]" if event.total else ""
        took = f" in {event.duration_s:.2f} s" if event.duration_s is not None else ""
        if event.kind == "item_started":
            self._say(f"  ▸ {escape(event.item_id or '')} started on {event.agent_id}")
        elif event.kind == "item_retried":
            self._say(f"  [yellow]↻[/] {escape(event.item_id or '')} attempt {event.attempt}")
        elif event.kind == "item_finished":
            mark = self.SYMBOLS.get(event.status or "", "[red]✗[/]")
            self._say(f"  {mark} {escape(event.item_id or '')} {event.status}{took}{count}")
        elif event.kind == "gate_started":
            self._say(f"  ▸ gate {escape(event.gate or '')}")
        elif event.kind == "gate_finished":
            mark = self.SYMBOLS.get(event.status or "", "[red]✗[/]")
            self._say(f"  {mark} gate {escape(event.gate or '')} {event.status}{took}")


# -- commands ------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = hive_config(args)
    spec = load_for(args, config)

    async def go() -> int:
        if not args.json:
            console.print(f"[bold]{escape(spec.title)}[/] — starting NATS, Ray and "
                          f"{config.executor.replicas} executor(s)…")
        hive = await AsyncHive.start(config=config, state_dir=state_dir(args), nats_url=args.nats,
                                     ray_address=args.ray_address, nats_auth=nats_auth(args),
                                     workdir_root=args.file.resolve().parent,
                                     policy=hive_policy(args, default_root=args.file.resolve().parent))
        trap_sigterm()
        try:
            if not args.json:
                printer = ProgressPrinter(console)
                await hive.bus.subscribe("task.lifecycle.*", LifecycleEvent, printer.lifecycle)
                await hive.bus.subscribe("task.progress.*", ProgressEvent, printer.progress)
            record = await hive.run(spec)
        finally:
            await hive.close()
        return report_end(args, console, record)

    return run_async(go())


def cmd_up(args: argparse.Namespace, console: Console) -> int:
    config = hive_config(args)
    state = state_dir(args)

    async def go() -> int:
        hive = await AsyncHive.start(config=config, state_dir=state, nats_url=args.nats,
                                     ray_address=args.ray_address, nats_auth=nats_auth(args),
                                     policy=hive_policy(args, default_root=None))
        trap_sigterm()
        marker = hive_file(state)
        try:
            marker.write_text(json.dumps({"nats_url": hive.nats_url, "pid": os.getpid()}))
            policy = hive.orchestrator.policy if hive.orchestrator else None
            console.print(f"hivebus is up: NATS {hive.nats_url}, "
                          f"{config.executor.replicas} executor(s), policy {policy.name if policy else 'none'}; "
                          f"state in {state}. Ctrl-C stops it.")
            if policy is not None and policy.name == "deny-all":
                console.print("[yellow]every task will be refused: start with --policy local or --policy FILE[/]")
            await asyncio.Event().wait()
            return EXIT_OK
        finally:
            marker.unlink(missing_ok=True)
            await hive.close()

    return run_async(go())


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    spec = load_task_file(args.file, planner=planner_overrides(args))

    async def go() -> int:
        hive = await client(args)
        try:
            try:
                task_id = await hive.submit(spec)
            except RequestRejected as exc:
                if exc.code == "invalid":
                    raise TaskFileError(str(args.file), [exc.message]) from None
                raise
            if not args.wait:
                print(json.dumps({"task_id": task_id}) if args.json else task_id)
                return EXIT_OK
            record = await hive.wait(task_id)
        finally:
            await hive.close()
        return report_end(args, console, record)

    return run_async(go())


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    async def go() -> int:
        hive = await client(args)
        try:
            if args.task_id:
                record = await hive.get(args.task_id)
                if args.json:
                    print(record.model_dump_json())
                else:
                    _print_record(console, record)
                return EXIT_OK
            records = await hive.list()
            snapshot = await hive.resources()
        finally:
            await hive.close()
        if args.json:
            print(json.dumps({"tasks": [summary_line(r) for r in records],
                              "resources": snapshot.model_dump(mode="json")}))
            return EXIT_OK
        table = Table("task", "state", "stage", "iter", "exit_reason", "title", title="tasks")
        for r in records:
            table.add_row(r.task_id, r.state.value, r.stage or "", str(r.iteration),
                          r.exit_reason or "", escape(r.spec.title))
        console.print(table)
        console.print(resource_table(snapshot))
        return EXIT_OK

    return run_async(go())


def resource_table(snapshot: ResourceSnapshot) -> Table:
    """Agents with their sampled usage and current leases, and the hive's totals."""
    table = Table("agent", "pid", "CPU %", "RSS MB", "children", "leased CPU", "leased MB",
                  title=f"resources: {snapshot.allocated_cpu:g}/{snapshot.total_cpu:g} CPU, "
                        f"{snapshot.allocated_memory_mb}/{snapshot.total_memory_mb} MB leased, "
                        f"{snapshot.queued} waiting; per agent at most {snapshot.agent_cpu:g} CPU, "
                        f"{snapshot.agent_memory_mb} MB")
    leases: dict[str, tuple[float, int]] = {}
    for lease in snapshot.leases:
        cpu, mem = leases.get(lease.agent_id, (0.0, 0))
        leases[lease.agent_id] = (cpu + lease.cpu, mem + lease.memory_mb)
    for usage in snapshot.usage:
        cpu, mem = leases.get(usage.agent_id, (0.0, 0))
        table.add_row(usage.agent_id, str(usage.pid), f"{usage.cpu_percent:.1f}", f"{usage.rss_mb:.1f}",
                      str(usage.children), f"{cpu:g}", str(mem))
    return table


def _print_record(console: Console, record: TaskRecord) -> None:
    console.print(f"[bold]{record.task_id}[/] {escape(record.spec.title)}")
    console.print(f"  state: {record.state.value}  stage: {record.stage or '-'}  "
                  f"iteration: {record.iteration}  exit_reason: {record.exit_reason or '-'}")
    if record.message:
        console.print(f"  {escape(record.message)}")
    for it in record.iterations:
        items = ", ".join(f"{i.id}={i.status}" for i in it.items) or "no items"
        gates = ", ".join(f"{g.name}={'passed' if g.passed else 'failed'}" for g in it.gates)
        console.print(f"  iteration {it.iteration}: {escape(items)}" + (f"; gates: {gates}" if gates else ""))
    if record.report_path:
        console.print(f"  report: {escape(record.report_path)}")


def cmd_watch(args: argparse.Namespace, console: Console) -> int:
    async def go() -> int:
        hive = await client(args)
        try:
            printer = ProgressPrinter(console)
            done = asyncio.get_running_loop().create_future()

            async def on_completion(_: CompletionEvent) -> None:
                if not done.done():
                    done.set_result(None)

            await hive.bus.subscribe(subjects.lifecycle(args.task_id), LifecycleEvent, printer.lifecycle)
            await hive.bus.subscribe(subjects.progress(args.task_id), ProgressEvent, printer.progress)
            await hive.bus.subscribe(subjects.completion(args.task_id), CompletionEvent, on_completion)
            record = await hive.get(args.task_id)
            if not record.state.terminal:
                await done
                record = await hive.get(args.task_id)
        finally:
            await hive.close()
        print_end(console, record)
        return EXIT_OK if record.state == TaskState.SUCCEEDED else EXIT_FAILED

    return run_async(go())


def _simple(action: str) -> Callable[[argparse.Namespace, Console], int]:
    def handler(args: argparse.Namespace, console: Console) -> int:
        async def go() -> int:
            hive = await client(args)
            try:
                record = await getattr(hive, action)(args.task_id)
            finally:
                await hive.close()
            console.print(f"{record.task_id}: {record.state.value}"
                          + (f" ({record.exit_reason})" if record.exit_reason else ""))
            return EXIT_OK

        return run_async(go())

    return handler


cmd_cancel = _simple("cancel")
cmd_approve = _simple("approve")


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    name = "report.json" if args.json else "report.md"
    try:
        TaskRef(task_id=args.task_id)  # an id is also a folder name: refuse ../ and friends
    except ValueError:
        raise UsageError(f"{args.task_id!r} is not a task id") from None
    local = state_dir(args) / "artifacts"
    path = local / args.task_id / name
    if not path.is_file() and (args.nats or hive_file(state_dir(args)).exists()):
        async def go() -> str | None:
            hive = await client(args)
            try:
                return (await hive.get(args.task_id)).report_path
            finally:
                await hive.close()

        report_path = asyncio.run(go())
        if report_path:
            path = Path(report_path).with_name(name)
    if not path.is_file():
        raise HivebusError(f"no report for task {args.task_id!r} (looked for {path})")
    sys.stdout.write(path.read_text(encoding="utf-8"))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, console: Console) -> int:
    try:
        TaskRef(task_id=args.task_id)
    except ValueError:
        raise UsageError(f"{args.task_id!r} is not a task id") from None

    async def go() -> int:
        hive = await client(args)
        try:
            events = [event async for event in timeline(hive, args.task_id)]
        finally:
            await hive.close()
        if not events:
            raise HivebusError(f"no events of task {args.task_id!r} in the event stream")
        if args.json:
            for subject, body in events:
                print(json.dumps({"subject": subject, **body}))
            return EXIT_OK
        start = datetime.fromisoformat(events[0][1]["ts"])
        for subject, body in events:
            offset = (datetime.fromisoformat(body["ts"]) - start).total_seconds()
            console.print(f"[dim]{offset:8.3f}s[/] {escape(describe_event(subject, body))}")
        return EXIT_OK

    return run_async(go())


async def timeline(hive: AsyncHive, task_id: str):  # type: ignore[no-untyped-def]
    """(subject, body) of every stored event of a task, oldest first."""
    async for subject, body in hive.bus.stored_events(subjects.task_events(task_id)):
        if "ts" in body:
            yield subject, body


def describe_event(subject: str, body: dict[str, Any]) -> str:
    """One line of a replayed timeline."""
    kind = body.get("type")
    if kind == "LifecycleEvent":
        stage = f" · {body['stage']}" if body.get("stage") else ""
        reason = f" exit_reason={body['exit_reason']}" if body.get("exit_reason") else ""
        return f"{body['state']}{stage} (iteration {body['iteration']}){reason}"
    if kind == "ProgressEvent":
        what = body.get("item_id") or f"gate {body.get('gate')}"
        extra = f" {body['status']}" if body.get("status") else ""
        where = f" on {body['agent_id']}" if body.get("agent_id") else ""
        return f"  {body['kind'].replace('_', ' ')}: {what}{extra}{where} (attempt {body.get('attempt', 1)})"
    if kind == "CompletionEvent":
        return f"completed {body['state']} ({body['exit_reason']}) after {body['iterations']} iteration(s)"
    if kind == "ReportEvent":
        return f"report {body['kind']}: {body['path']}"
    return f"{subject}: {kind}"


def cmd_secret(args: argparse.Namespace, console: Console) -> int:
    try:
        store = SecretStore.open(state_dir(args))
        if args.action == "list":
            for name in store.names():
                print(name)
            return EXIT_OK
        if not args.name:
            raise UsageError(f"hivebus secret {args.action} needs a NAME")
        if args.action == "delete":
            if not store.delete(args.name):
                raise HivebusError(f"no secret {args.name!r}")
            return EXIT_OK
        value = args.value if args.value is not None else sys.stdin.read().rstrip("\n")
        store.set(args.name, value)
    except SecretError as exc:
        raise HivebusError(str(exc)) from None
    console.print(f"secret {args.name!r} stored (encrypted) in {state_dir(args)}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    if args.type:
        cls = MESSAGE_TYPES.get(args.type)
        if cls is None:
            raise UsageError(f"unknown message type {args.type!r}; one of: {', '.join(MESSAGE_TYPES)}")
        print(json.dumps(cls.model_json_schema(), indent=2))
        return EXIT_OK
    print(json.dumps({name: cls.model_json_schema() for name, cls in MESSAGE_TYPES.items()}, indent=2))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
