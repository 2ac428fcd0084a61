"""The one place where messages become bytes and bytes become messages.

msgpack by default (header ``Content-Type: application/msgpack``). JSON is accepted on
every request subject: with ``Content-Type: application/json``, or with no header and a
body that is a JSON object. A reply uses the request's encoding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from .base import Message
from .record import ErrorDetail, Rejected

MSGPACK = "application/msgpack"
JSON = "application/json"
CONTENT_TYPE = "Content-Type"

M = TypeVar("M", bound=Message)


class CodecError(ValueError):
    """Bytes that do not make the expected message; carries what a Rejected reply needs."""

    def __init__(self, code: str, message: str, errors: list[ErrorDetail] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = errors or []

    def rejected(self) -> Rejected:
        return Rejected(code=self.code, message=self.message, errors=self.errors)  # type: ignore[arg-type]


def content_type_of(data: bytes, headers: Mapping[str, str] | None) -> str:
    """The encoding of a body: its header if it has one, else JSON if it looks like a JSON object."""
    if headers:
        declared = headers.get(CONTENT_TYPE) or headers.get(CONTENT_TYPE.lower())
        if declared:
            declared = declared.split(";")[0].strip().lower()
            if declared in (JSON, "text/json"):
                return JSON
            if declared in (MSGPACK, "application/x-msgpack"):
                return MSGPACK
    if data.lstrip()[:1] == b"{":
        return JSON
    return MSGPACK


def encode(message: Message, content_type: str = MSGPACK) -> tuple[bytes, dict[str, str]]:
    """A message as bytes plus the header that names their encoding."""
    payload = message.model_dump(mode="json")
    if content_type == JSON:
        return json.dumps(payload, separators=(",", ":")).encode(), {CONTENT_TYPE: JSON}
    return msgpack.packb(payload, use_bin_type=True), {CONTENT_TYPE: MSGPACK}


def encode_json_line(message: Message) -> str:
    return json.dumps(message.model_dump(mode="json"), separators=(",", ":"))


def loads(data: bytes, content_type: str) -> Any:
    """Bytes to plain Python, or CodecError(bad_encoding)."""
    try:
        if content_type == JSON:
            return json.loads(data)
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError, UnicodeDecodeError, RecursionError) as exc:
        kind = "JSON" if content_type == JSON else "msgpack"
        raise CodecError("bad_encoding", f"the body is not valid {kind}: {exc}") from None


def decode(data: bytes, into: type[M], *, headers: Mapping[str, str] | None = None) -> M:
    """Bytes to a validated ``into`` message, or CodecError naming what is wrong."""
    obj = loads(data, content_type_of(data, headers))
    return validate(obj, into)


def validate(obj: Any, into: type[M]) -> M:
    expected = into.model_fields["type"].default
    if not isinstance(obj, dict):
        raise CodecError(
            "invalid", f"the body must be an object (a {expected}), not {type(obj).__name__}"
        )
    declared = obj.get("type", expected)
    if declared != expected:
        raise CodecError(
            "wrong_type", f"expected a {expected} message, got type={declared!r}"
        )
    try:
        return into.model_validate(obj)
    except ValidationError as exc:
        errors = [
            ErrorDetail(loc=".".join(str(p) for p in err["loc"]) or "(body)", msg=err["msg"].removeprefix("Value error, "))
            for err in exc.errors(include_url=False)
        ]
        first = "; ".join(f"{e.loc}: {e.msg}" for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise CodecError("invalid", f"not a valid {expected}: {first}{more}", errors) from None
