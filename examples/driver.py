"""Drive hivebus from Python: start an embedded hive, run tasks, read their records.

    python examples/driver.py
"""

from pathlib import Path

from orchestrator import Hive
from schemas import TaskSpec, WorkItemSpec

HERE = Path(__file__).resolve().parent


def main() -> int:
    with Hive.start(state_dir=HERE.parent / ".hivebus") as hive:
        # A task file, as `hivebus run` would read it.
        record = hive.run(HERE / "pipeline" / "task.yaml")
        print(f"{record.spec.title}: {record.state.value} ({record.exit_reason})")

        # A task built in code: two independent items run on two executors at once.
        spec = TaskSpec(
            title="Two things at once",
            workdir=str(HERE),
            work_items=[
                WorkItemSpec(id="left", run="sleep 1 && echo left"),
                WorkItemSpec(id="right", run="sleep 1 && echo right"),
            ],
        )
        record = hive.run(spec)
        print(f"{record.spec.title}: {record.state.value}; report at {record.report_path}")
        return 0 if record.state.value == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
