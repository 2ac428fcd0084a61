"""The codec: messages to bytes and back, in msgpack and JSON, and refusals of bad bodies."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    JSON,
    MESSAGE_TYPES,
    MSGPACK,
    SCHEMA_VERSION,
    CodecError,
    FailedGate,
    FailedItem,
    FailureContext,
    GateResult,
    GateResults,
    IterationRecord,
    ItemOutcome,
    Lease,
    Message,
    PlanRequest,
    ProgressEvent,
    Rejected,
    SnapshotRequest,
    TaskAccepted,
    TaskQuery,
    TaskRecord,
    TaskSpec,
    TaskState,
    WorkItemResult,
    decode,
    encode,
    encode_json_line,
)
from schemas.codec import CONTENT_TYPE, content_type_of

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
TASK = "t-abc"

SPEC = TaskSpec(
    title="Build and test",
    description="free text",
    priority="high",
    max_iterations=3,
    deadline=T0,
    env={"KEY": "value"},
    gates=[{"name": "tests", "run": "pytest -q", "timeout_s": 120}, "doctor"],
    work_items=[
        {"id": "lint", "run": "ruff check ."},
        {"id": "test", "run": "pytest -q", "depends_on": ["lint"], "retries": 1,
         "resources": {"cpu": 1, "memory_mb": 512}},
        {"id": "step", "call": "examples.calls.steps:build", "args": {"n": 3}},
    ],
    on_gate_failure=[{"id": "fix", "run": "python fix.py"}],
)

SAMPLES: list[Message] = [
    SPEC,
    TaskAccepted(task_id=TASK, state=TaskState.QUEUED),
    TaskQuery(state=TaskState.RUNNING),
    TaskRecord(
        task_id=TASK, spec=SPEC, state=TaskState.SUCCEEDED, stage=None, iteration=2,
        exit_reason="done", created_at=T0, updated_at=T0, started_at=T0, finished_at=T0,
        iterations=[IterationRecord(iteration=1, started_at=T0, fingerprint="0123456789abcdef",
                                    items=[ItemOutcome(id="lint", status="failed", exit_code=1)])],
    ),
    PlanRequest(
        task_id=TASK, iteration=2, spec=SPEC,
        failure=FailureContext(task_id=TASK, iteration=1,
                               failed_items=[FailedItem(id="lint", status="failed", exit_code=1)],
                               failed_gates=[FailedGate(name="tests", problems=["red"])]),
    ),
    WorkItemResult(
        task_id=TASK, iteration=1, item_id="step", status="succeeded", exit_code=0,
        output={"n": 3, "names": ["a", "b"], "ratio": 0.5}, started_at=T0, finished_at=T0,
        duration_s=1.25, files_changed=["calc.py"], peak_rss_mb=42.5, cpu_seconds=0.75,
    ),
    GateResults(results=[
        GateResult(task_id=TASK, iteration=1, gate="tests", kind="command", passed=False,
                   exit_code=1, started_at=T0, finished_at=T0),
    ]),
    Lease(lease_id="lease-1", agent_id="executor-1", task_id=TASK, item_id="test", cpu=0.5,
          memory_mb=512, granted_at=T0),
    ProgressEvent(task_id=TASK, iteration=1, kind="item_finished", item_id="test",
                  status="succeeded", ts=T0, done=1, total=3),
    Rejected(code="invalid", message="not a valid TaskSpec", errors=[{"loc": "title", "msg": "x"}]),
    SnapshotRequest(),
]


# --- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type)
def test_a_message_survives_encode_then_decode_unchanged(message, content_type):
    data, headers = encode(message, content_type)
    assert headers == {CONTENT_TYPE: content_type}
    back = decode(data, type(message), headers=headers)
    assert back == message
    assert type(back) is type(message)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type)
def test_an_encoded_body_carries_its_type_and_schema_version(message):
    msgpack_body = msgpack.unpackb(encode(message, MSGPACK)[0])
    json_body = json.loads(encode(message, JSON)[0])
    for body in (msgpack_body, json_body):
        assert body["type"] == message.type
        assert body["v"] == SCHEMA_VERSION


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.type)
def test_a_json_body_decodes_without_a_header_because_it_looks_like_an_object(message):
    data, _ = encode(message, JSON)
    assert decode(data, type(message)) == message


def test_a_json_line_is_the_json_encoding_without_a_header():
    line = encode_json_line(SPEC)
    assert "\n" not in line
    assert decode(line.encode(), TaskSpec) == SPEC


def test_every_message_type_is_registered_under_its_type_name():
    assert all(cls.model_fields["type"].default == name for name, cls in MESSAGE_TYPES.items())
    for message in SAMPLES:
        assert MESSAGE_TYPES[message.type] is type(message)


# --- content type ------------------------------------------------------------------

@pytest.mark.parametrize(("data", "headers", "expected"), [
    (b'{"a": 1}', {CONTENT_TYPE: MSGPACK}, MSGPACK),
    (b"\x80", {CONTENT_TYPE: JSON}, JSON),
    (b"\x80", {CONTENT_TYPE: "application/json; charset=utf-8"}, JSON),
    (b"\x80", {"content-type": "text/json"}, JSON),
    (b'{"a": 1}', {CONTENT_TYPE: "application/x-msgpack"}, MSGPACK),
    (b'{"a": 1}', None, JSON),
    (b' \n\t {"a": 1}', None, JSON),
    (b'{"a": 1}', {}, JSON),
    (b'{"a": 1}', {CONTENT_TYPE: "text/plain"}, JSON),
    (b"\x81\xa1a\x01", None, MSGPACK),
    (b'[1, 2]', None, MSGPACK),
    (b"", None, MSGPACK),
])
def test_the_header_names_the_encoding_and_without_one_a_json_object_is_json(data, headers, expected):
    assert content_type_of(data, headers) == expected


# --- hand-written bodies -----------------------------------------------------------

def test_a_hand_written_json_task_without_type_or_version_is_a_task_spec():
    spec = decode(b'{"title": "t", "gates": ["doctor"]}', TaskSpec)
    assert isinstance(spec, TaskSpec)
    assert spec.title == "t"
    assert spec.type == "TaskSpec" and spec.v == SCHEMA_VERSION
    assert spec.gates[0].builtin == "doctor"


def test_a_hand_written_msgpack_task_without_type_or_version_is_a_task_spec():
    spec = decode(msgpack.packb({"title": "t", "gates": ["doctor"]}), TaskSpec)
    assert spec.title == "t"


def test_a_message_of_another_type_is_refused_as_wrong_type():
    data, headers = encode(TaskAccepted(task_id=TASK, state=TaskState.QUEUED))
    with pytest.raises(CodecError) as caught:
        decode(data, TaskSpec, headers=headers)
    assert caught.value.code == "wrong_type"
    assert "TaskSpec" in caught.value.message and "TaskAccepted" in caught.value.message


def test_a_schema_version_newer_than_this_build_is_refused():
    with pytest.raises(CodecError) as caught:
        decode(b'{"title": "t", "gates": ["doctor"], "v": 99}', TaskSpec)
    assert caught.value.code == "invalid"
    assert [e.loc for e in caught.value.errors] == ["v"]


def test_an_unknown_field_is_refused_with_its_name_in_the_error_locations():
    with pytest.raises(CodecError) as caught:
        decode(b'{"title": "t", "gates": ["doctor"], "colour": "red"}', TaskSpec)
    assert caught.value.code == "invalid"
    assert "colour" in [e.loc for e in caught.value.errors]
    assert "colour" in caught.value.message


def test_a_nested_problem_is_located_by_a_dotted_path():
    body = {"title": "t", "work_items": [{"id": "a", "run": "x", "retries": -1}]}
    with pytest.raises(CodecError) as caught:
        decode(json.dumps(body).encode(), TaskSpec)
    assert "work_items.0.retries" in [e.loc for e in caught.value.errors]


def test_a_missing_required_field_is_named():
    with pytest.raises(CodecError) as caught:
        decode(b'{"gates": ["doctor"]}', TaskSpec)
    assert caught.value.code == "invalid"
    assert "title" in [e.loc for e in caught.value.errors]
    assert "title" in caught.value.message


# --- bad bytes ---------------------------------------------------------------------

@pytest.mark.parametrize(("data", "headers", "code", "named"), [
    (b"\xc1\xc1\xc1", None, "bad_encoding", "msgpack"),
    (msgpack.packb({"title": "a long enough title"})[:-4], None, "bad_encoding", "msgpack"),
    (b"", None, "bad_encoding", "msgpack"),
    (msgpack.packb({1: "int key"}), None, "bad_encoding", "msgpack"),
    (b'{"title": ', None, "bad_encoding", "JSON"),
    (b"\xff\xfe{}", {CONTENT_TYPE: JSON}, "bad_encoding", "JSON"),
    (msgpack.packb([1, 2]), None, "invalid", "list"),
    (b"[1, 2]", {CONTENT_TYPE: JSON}, "invalid", "list"),
    (b'"just a string"', {CONTENT_TYPE: JSON}, "invalid", "str"),
    (msgpack.packb(7), None, "invalid", "int"),
])
def test_bytes_that_are_not_a_message_object_are_refused_with_the_problem_named(data, headers, code, named):
    with pytest.raises(CodecError) as caught:
        decode(data, TaskSpec, headers=headers)
    assert caught.value.code == code
    assert named in caught.value.message
    assert str(caught.value) == caught.value.message


def test_a_codec_error_becomes_a_rejected_reply_with_the_same_code_and_errors():
    with pytest.raises(CodecError) as caught:
        decode(b'{"title": "", "gates": ["doctor"]}', TaskSpec)
    rejected = caught.value.rejected()
    assert isinstance(rejected, Rejected)
    assert rejected.code == caught.value.code == "invalid"
    assert rejected.message == caught.value.message
    assert rejected.errors == caught.value.errors
    assert [e.loc for e in rejected.errors] == ["title"]


@pytest.mark.parametrize("code", ["bad_encoding", "wrong_type", "invalid"])
def test_every_codec_error_code_is_a_valid_rejected_code(code):
    assert CodecError(code, "why").rejected().code == code


# --- never anything but a message or a CodecError ----------------------------------

HEADERS = st.sampled_from([None, {CONTENT_TYPE: JSON}, {CONTENT_TYPE: MSGPACK}])
# msgpack holds 64-bit integers; that is a limit of the test's encoder, not of decode.
INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SIMPLE = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=False), st.text(),
    st.lists(st.text(), max_size=3), st.dictionaries(st.text(), INTS, max_size=3),
)
KEYS = st.one_of(st.sampled_from(["type", "v", "title", "gates", "work_items", "deadline",
                                  "planner", "priority", "env"]), st.text())


def _decode_or_codec_error(data: bytes, headers) -> None:
    try:
        result = decode(data, TaskSpec, headers=headers)
    except CodecError as exc:
        assert exc.code in ("bad_encoding", "invalid", "wrong_type")
        assert exc.message
    else:
        assert isinstance(result, TaskSpec)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200), headers=HEADERS)
def test_arbitrary_bytes_decode_to_a_task_spec_or_a_codec_error(data, headers):
    _decode_or_codec_error(data, headers)


@settings(max_examples=500, deadline=None)
@given(body=st.dictionaries(KEYS, SIMPLE, max_size=8), as_json=st.booleans())
def test_arbitrary_objects_decode_to_a_task_spec_or_a_codec_error(body, as_json):
    data = json.dumps(body).encode() if as_json else msgpack.packb(body)
    _decode_or_codec_error(data, None)
