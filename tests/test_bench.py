"""``hivebus bench --quick`` runs to its end and writes every figure (never judged on time)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_the_quick_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, never a cluster someone else uses
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "bench", "--quick", "--json", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # Ctrl-C lets it stop its hives and its Ray; whatever is left of its group goes after.
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"hivebus bench --quick ran over 300 s\nstdout:\n{stdout}\nstderr:\n{stderr}")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    figures = json.loads(out.read_text())

    floors = figures["floors"]
    timings = {
        "nats": floors["nats_rtt_ms"],
        "subprocess": floors["subprocess_spawn_ms"],
        "ray serial": floors["ray_call_ms"]["serial"],
        "submit": figures["submit_to_running_ms"],
        "serial call": figures["serial_call_item_ms"],
        "serial shell": figures["serial_shell_item_ms"],
    }
    for name, timing in timings.items():
        assert positive(timing["p50"]) and positive(timing["p99"]), (name, timing)
    assert positive(floors["ray_call_ms"]["pipelined"]["per_call_ms"])
    assert positive(figures["serial_call_item_ms"]["ratio_to_floor"])
    assert positive(figures["serial_shell_item_ms"]["ratio_to_floor"])

    throughput = figures["fanout_throughput_items_per_s"]
    assert positive(throughput["default"]) and positive(throughput["default_shell"])
    assert throughput["kind"] == "call"
    assert set(throughput["executors"]) == {"1", "2", "4"}
    assert all(positive(v) for v in throughput["executors"].values()), throughput

    scheduling = figures["scheduling_us_per_item"]
    for size in ("100", "1000", "10000", "growth_10000_vs_1000"):
        assert positive(scheduling[size]), (size, scheduling)

    memory = figures["idle_memory_mb"]
    assert positive(memory["hive"])
    assert {"resources", "planner-1", "executor-1", "verifier-1"} <= set(memory["agents"])
    assert all(positive(mb) for mb in memory["agents"].values()), memory

    assert set(figures["targets"]) == {
        "submit_to_running_p50", "serial_call_item_p50", "serial_shell_item_p50",
        "fanout_throughput", "scheduling_growth_10000_vs_1000",
    }
    assert all(isinstance(t["met"], bool) for t in figures["targets"].values())
