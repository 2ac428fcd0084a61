"""Base classes for everything that crosses a process boundary."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

#: The schema version this build writes and the newest one it reads.
SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(BaseModel):
    """A frozen part of a message: unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(Model):
    """A whole message body. Every body carries its ``type`` and schema version ``v``.

    Subclasses pin ``type`` with a ``Literal`` default, so a JSON body written by hand
    (``{"title": "..."}``) may leave both out.
    """

    type: str
    v: Annotated[int, Field(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION


#: Ids that users choose (work items, gates). They become file names in the
#: artifacts folder, so they may not contain a path separator or start with a dot.
Ident = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
]

#: Ids that hivebus chooses for tasks; validated the same way when they come back in.
TaskId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{2,63}$")]
