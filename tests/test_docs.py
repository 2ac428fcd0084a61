"""The README's promises that can drift from the code: the two quick-start commands, CI."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.S)


def test_the_quick_start_has_exactly_two_commands_and_ci_runs_the_second() -> None:
    commands = quick_start_commands()

    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert "hivebus run examples/" in commands[0]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_every_example_the_readme_names_exists() -> None:
    for path in re.findall(r"`(examples/[\w./-]+)`", README):
        assert (REPO / path).exists(), path


def test_every_subject_in_the_readme_is_defined_in_bus_subjects() -> None:
    from bus import subjects

    defined = {v for k, v in vars(subjects).items() if k.isupper() and isinstance(v, str)}
    for subject in ("task.submit", "task.get", "task.list", "task.cancel", "task.approve",
                    "agent.planner.plan", "agent.executor.run", "agent.verifier.verify",
                    "agent.resources.lease", "agent.resources.release", "agent.resources.snapshot",
                    "hivebus.deadletter"):
        assert subject in README and subject in defined, subject
