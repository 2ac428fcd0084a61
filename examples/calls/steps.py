"""Python callables that `call` work items run, each in a child process of an executor.

A call item's `args` arrive as keyword arguments; its return value (JSON) is recorded as
the item's output. The task's workdir is the current directory and on sys.path.
"""

import json
import statistics
from pathlib import Path


def generate(count: int, seed: int = 7) -> dict:
    values = [(seed * i * i + 3 * i) % 1000 for i in range(1, count + 1)]
    Path("out").mkdir(exist_ok=True)
    Path("out/values.json").write_text(json.dumps(values))
    return {"count": len(values)}


def describe(field: str) -> dict:
    values = json.loads(Path("out/values.json").read_text())
    stats = {"mean": statistics.fmean(values), "stdev": statistics.pstdev(values)}
    Path(f"out/{field}.json").write_text(json.dumps(stats))
    return stats


async def histogram(buckets: int) -> list[int]:
    values = json.loads(Path("out/values.json").read_text())
    counts = [0] * buckets
    for v in values:
        counts[min(v * buckets // 1000, buckets - 1)] += 1
    Path("out/histogram.json").write_text(json.dumps(counts))
    return counts
