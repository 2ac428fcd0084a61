"""The error tree. Every error hivebus raises on purpose is a HivebusError with fields."""

from __future__ import annotations

from pydantic import ValidationError


def validation_problems(exc: ValidationError) -> list[str]:
    """A pydantic ValidationError as sentences: ``field.path: what is wrong``."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}" if loc else msg)
    return problems


class HivebusError(Exception):
    """Root of every hivebus error. ``str(err)`` is a sentence a user can act on."""


class TaskFileError(HivebusError):
    """A task file that cannot become a TaskSpec: names the file, the fields and why."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: not a valid task file:\n{lines}")


class TransportError(HivebusError):
    """NATS could not be reached or did not answer in time."""


class RequestRejected(HivebusError):
    """A request answered with a ``Rejected`` reply."""

    def __init__(self, subject: str, code: str, message: str):
        self.subject = subject
        self.code = code
        self.message = message
        super().__init__(f"{subject}: {message}")
