"""Short items go to executors in batches, on a real hive: same results, fewer requests."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from schemas import TaskSpec, TaskState

pytestmark = pytest.mark.integration


def test_a_fan_out_of_short_items_is_sent_in_batches_and_every_item_succeeds(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "square.py").write_text("def run(n):\n    return n * n\n")
    items = [{"id": f"i{n}", "call": "square:run", "args": {"n": n}} for n in range(120)]
    spec = TaskSpec(title="batches", workdir=str(tmp_path), work_items=items)

    async def watch() -> tuple[object, list[int]]:
        nc = await nats.connect(hive.nats_url)
        sizes: list[int] = []
        try:
            async def on_batch(msg) -> None:  # type: ignore[no-untyped-def]
                sizes.append(len(msg.data))

            await nc.subscribe("agent.executor.batch.>", cb=on_batch)
            await nc.flush()
            record = await asyncio.to_thread(hive.run, spec, timeout=120)
            await nc.flush()
            return record, sizes
        finally:
            await nc.close()

    record, batches = asyncio.run(watch())

    assert record.state == TaskState.SUCCEEDED  # type: ignore[attr-defined]
    artifacts = Path(record.artifacts_dir)  # type: ignore[attr-defined]
    outputs = {n: json.loads((artifacts / f"work_item_i{n}.json").read_text())["output"] for n in range(120)}
    assert outputs == {n: n * n for n in range(120)}
    # The first items go one by one (their run time is not known yet); the rest in batches.
    assert batches, "no batch was sent"
    summary = json.loads((artifacts / "work_items_summary.json").read_text())
    assert summary["by_status"] == {"succeeded": 120}
    assert all(item["attempts"] == 1 for item in summary["work_items"])


def test_a_failing_item_in_a_batch_is_retried_on_its_own(hive, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "flaky.py").write_text(
        "import os\n"
        "def run(n):\n"
        "    if n == 30 and os.environ['HIVEBUS_ATTEMPT'] == '1':\n"
        "        raise RuntimeError('first attempt fails')\n"
        "    return n\n")
    items = [{"id": f"i{n}", "call": "flaky:run", "args": {"n": n}, "retries": 1} for n in range(60)]
    record = hive.run(TaskSpec(title="retry in batch", workdir=str(tmp_path), work_items=items), timeout=120)

    assert record.state == TaskState.SUCCEEDED
    flaky = json.loads(Path(record.artifacts_dir, "work_item_i30.json").read_text())
    assert flaky["attempts"] == 2
    assert [h["status"] for h in flaky["history"]] == ["failed", "succeeded"]
