"""report.md and report.json: what happened to a task, per iteration, and why it ended."""

from __future__ import annotations

from typing import Any

from schemas import TaskRecord, WorkItemResult


def report_data(record: TaskRecord, results: list[WorkItemResult]) -> dict[str, Any]:
    duration = (
        (record.finished_at - record.started_at).total_seconds()
        if record.finished_at and record.started_at else None
    )
    return {
        "task_id": record.task_id,
        "title": record.spec.title,
        "state": record.state.value,
        "exit_reason": record.exit_reason,
        "message": record.message,
        "iterations": record.iteration,
        "duration_s": round(duration, 3) if duration is not None else None,
        "created_at": record.created_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "totals": {
            "items_run": sum(len(it.items) for it in record.iterations),
            "cpu_seconds": round(sum(r.cpu_seconds for r in results), 3),
            "max_peak_rss_mb": round(max((r.peak_rss_mb for r in results), default=0.0), 1),
        },
        "per_iteration": [it.model_dump(mode="json") for it in record.iterations],
    }


def render_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# {data['title']}",
        "",
        f"- task: `{data['task_id']}`",
        f"- state: **{data['state']}**, exit reason: `{data['exit_reason']}`",
        f"- iterations: {data['iterations']}; duration: {_secs(data['duration_s'])}",
        f"- CPU seconds (all items): {data['totals']['cpu_seconds']}; "
        f"largest peak RSS: {data['totals']['max_peak_rss_mb']} MB",
    ]
    if data["message"]:
        lines += ["", f"> {data['message']}"]
    for it in data["per_iteration"]:
        lines += ["", f"## Iteration {it['iteration']}", ""]
        if it["items"]:
            lines += [
                "| work item | status | attempts | exit | duration | peak RSS MB | CPU s | agent |",
                "|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {i['id']} | {i['status']} | {i['attempts']} | {_na(i['exit_code'])} | "
                f"{_secs(i['duration_s'])} | {i['peak_rss_mb']:.1f} | {i['cpu_seconds']:.2f} | {i['agent_id']} |"
                for i in it["items"]
            ]
        else:
            lines.append("No work items ran.")
        if it["gates"]:
            lines += ["", "| gate | result | exit | duration |", "|---|---|---|---|"]
            lines += [
                f"| {g['name']} | {'passed' if g['passed'] else 'FAILED'} | {_na(g['exit_code'])} | "
                f"{_secs(g['duration_s'])} |"
                for g in it["gates"]
            ]
    return "\n".join(lines) + "\n"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _na(value: Any) -> str:
    return "-" if value is None else str(value)


__all__ = ["report_data", "render_markdown"]
