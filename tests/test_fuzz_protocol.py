"""Fuzzing the two places hostile input enters: ``protocol.decode`` and ``schema.validate``.

Properties:

* ``decode`` never raises, whatever it is given (text, bytes, JSON of any shape, near-miss
  messages), and always returns a message or a ``DecodeError`` whose error response encodes to
  valid JSON-RPC that is valid UTF-8.
* ``validate`` either accepts a value or raises ``InvalidParams`` naming a field under
  ``arguments`` — never anything else.

Each property runs 300 examples by default (a few seconds). For a longer hunt, raise the count::

    EXAI_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz_protocol.py -q

Hypothesis keeps no example database here (``database=None``) so runs leave nothing behind in
the tree; a failure prints its minimal example and the ``@reproduce_failure`` blob to rerun it.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import os
import uuid
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exai.errors import InvalidParams
from exai.server import protocol as p
from exai.tools.schema import check_schema, validate

EXAMPLES = int(os.environ.get("EXAI_FUZZ_EXAMPLES", "300"))

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)


def _json(max_leaves: int) -> st.SearchStrategy[Any]:
    return st.recursive(
        json_scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


json_values = _json(20)
small_json_values = _json(6)

# Messages that are nearly right, so the fuzzer reaches every check after the JSON parse.
maybe = st.one_of
near_messages = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": maybe(st.just("2.0"), small_json_values),
        "id": maybe(st.integers(), st.text(max_size=300), small_json_values),
        "method": maybe(st.sampled_from(["tools/call", "initialize", "ping"]), small_json_values),
        "params": maybe(
            st.dictionaries(st.text(max_size=10), small_json_values, max_size=4),
            small_json_values,
        ),
        "result": small_json_values,
        "error": maybe(
            st.fixed_dictionaries({"code": st.integers(), "message": st.text(max_size=20)}),
            small_json_values,
        ),
    },
)

JSONISH = '[]{}",:0123456789.eE-+ \\/ntrufalsNIy\n'


def assert_valid_answer(msg: p.Request | p.Notification | p.Response | p.DecodeError) -> None:
    """The property every decode result must have."""
    assert isinstance(msg, p.Request | p.Notification | p.Response | p.DecodeError)
    if isinstance(msg, p.DecodeError):
        assert msg.code in (p.PARSE_ERROR, p.INVALID_REQUEST)
        assert isinstance(msg.message, str) and msg.message
        reply = p.encode(msg.to_message())
        reply.encode("utf-8")
        wire = json.loads(reply)
        assert wire["jsonrpc"] == "2.0"
        assert wire["id"] is None or (
            isinstance(wire["id"], str | int) and not isinstance(wire["id"], bool)
        )
        assert isinstance(wire["error"]["code"], int)
        assert isinstance(wire["error"]["message"], str)
    elif isinstance(msg, p.Request):
        assert isinstance(msg.id, str | int) and not isinstance(msg.id, bool)
        assert isinstance(msg.method, str)
        assert isinstance(msg.params, dict)
        reply = p.encode(p.result(msg.id, {"ok": True}))
        reply.encode("utf-8")
        assert p.decode(reply) == p.Response(msg.id, {"ok": True}, None)
    elif isinstance(msg, p.Notification):
        assert isinstance(msg.method, str)
        assert isinstance(msg.params, dict)


@fuzz
@given(st.text(max_size=300))
def test_decode_survives_any_text(text: str) -> None:
    assert_valid_answer(p.decode(text))


@fuzz
@given(st.text(alphabet=JSONISH, max_size=300))
def test_decode_survives_json_like_noise(text: str) -> None:
    assert_valid_answer(p.decode(text))


@fuzz
@given(st.binary(max_size=300))
def test_decode_survives_any_bytes(data: bytes) -> None:
    assert_valid_answer(p.decode(data))


@fuzz
@given(json_values)
def test_decode_survives_any_json_value(value: Any) -> None:
    assert_valid_answer(p.decode(json.dumps(value)))


@fuzz
@given(near_messages, st.integers(min_value=1, max_value=8))
def test_decode_survives_near_miss_messages(message: dict[str, Any], max_depth: int) -> None:
    text = json.dumps(message)

    assert_valid_answer(p.decode(text, max_depth=max_depth, max_id_bytes=64))


@fuzz
@given(near_messages, st.data())
def test_decode_survives_truncated_and_spliced_messages(
    message: dict[str, Any], data: st.DataObject
) -> None:
    text = json.dumps(message, ensure_ascii=data.draw(st.booleans()))
    cut = data.draw(st.integers(min_value=0, max_value=len(text)))
    noise = data.draw(st.text(alphabet=JSONISH, max_size=5))

    assert_valid_answer(p.decode(text[:cut] + noise + text[cut:]))


@fuzz
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", '{"a":', '[{"b":']))
def test_decode_refuses_deep_nesting_of_any_depth_without_raising(depth: int, opener: str) -> None:
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]"}[opener]
    text = opener * depth + "1" + closer * depth

    msg = p.decode(text, max_depth=64)

    assert_valid_answer(msg)


def nesting_depth(value: Any) -> int:
    """Reference: the deepest container level of a decoded value (top-level container = 1)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


tricky_text = st.text(alphabet='[]{}"\\\\/ ubn\u00e9\u65e5', max_size=8)
tricky_json = st.recursive(
    st.none() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=25,
)


@fuzz
@given(tricky_json, st.integers(min_value=1, max_value=10), st.booleans())
def test_the_text_depth_check_agrees_with_walking_the_value(
    value: Any, max_depth: int, ascii_only: bool
) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)

    assert p._depth_exceeds(text, max_depth) == (nesting_depth(value) > max_depth)


# --------------------------------------------------------------------------------- validate

CHAT = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": 2000},
        "model": {"type": "string", "pattern": "^[A-Za-z0-9._:/-]+$"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "thinking_mode": {"enum": ["minimal", "low", "medium", "high", "max"]},
        "use_websearch": {"type": "boolean"},
        "continuation_id": {"anyOf": [{"type": "string", "maxLength": 64}, {"type": "null"}]},
        "files": {
            "type": "array",
            "items": {"type": "string"},
            "maxItems": 20,
            "uniqueItems": True,
        },
        "images": {"type": "array", "items": {"type": "string"}},
        "step_number": {"type": "integer", "minimum": 1},
        "confidence": {"oneOf": [{"const": "certain"}, {"type": "number", "exclusiveMaximum": 1}]},
        "extra": {"type": "object", "additionalProperties": {"type": ["string", "integer"]}},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}

SCHEMAS = [
    CHAT,
    {"type": "object"},
    {"type": "array", "uniqueItems": True, "items": {"type": ["object", "array", "null"]}},
    {"anyOf": [{"type": "integer", "maximum": 5}, {"type": "string", "pattern": "a"}]},
    {"oneOf": [{"type": "number"}, {"type": "integer"}, {"enum": [None, True, [1], {"a": 1}]}]},
    {"const": {"a": [1, 2.0, None]}},
]
for _schema in SCHEMAS:
    check_schema(_schema)

chat_keys = st.sampled_from([*CHAT["properties"], "unknown", "modle", "my key"])
chat_like = st.dictionaries(chat_keys, small_json_values, max_size=6)


def assert_accepts_or_names_field(schema: dict[str, Any], value: Any) -> None:
    try:
        validate(schema, value)
    except InvalidParams as exc:
        assert isinstance(exc.field, str)
        assert exc.field.startswith("arguments")
        assert exc.message.startswith(exc.field) or exc.message.startswith("arguments")
        assert exc.code == -32602


@fuzz
@given(st.sampled_from(SCHEMAS), json_values)
def test_validate_accepts_or_names_the_field_for_any_value(
    schema: dict[str, Any], value: Any
) -> None:
    assert_accepts_or_names_field(schema, value)


@fuzz
@given(chat_like)
def test_validate_accepts_or_names_the_field_for_chat_like_arguments(args: dict[str, Any]) -> None:
    assert_accepts_or_names_field(CHAT, args)


@fuzz
@given(
    st.text(min_size=1, max_size=50),
    st.floats(min_value=0, max_value=1),
    st.lists(st.text(max_size=20), max_size=20, unique=True),
)
def test_well_formed_chat_arguments_always_pass(
    prompt: str, temperature: float, files: list[str]
) -> None:
    validate(CHAT, {"prompt": prompt, "temperature": temperature, "files": files})


@pytest.mark.parametrize("depth", [31, 32, 33, 1000])
def test_validate_holds_deep_values_to_the_limit(depth: int) -> None:
    value: Any = 1
    for _ in range(depth):
        value = [value]

    assert_accepts_or_names_field({"type": "array"}, value)


# ------------------------------------------------------------------ encode: msgspec vs stdlib
#: what a message may hold, NaN, infinities, lone surrogates and non-string keys included
encodable_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["null", "\ud800", "a\udfffb", "nul", "ü日本"])
)


class _Colour(enum.Enum):
    RED = 1


class _Name(enum.StrEnum):
    ADA = "ada"


@attrs.frozen
class _Secret:
    secret: str = "s"


@dataclasses.dataclass
class _Point:
    x: int = 1


#: what a buggy tool could put in a result: JSON has no form for these (the standard library
#: refuses most), msgspec writes nearly all of them (found by the issue-18 attack pass)
non_json_leaves = st.sampled_from(
    [
        b"ab",
        bytearray(b"ab"),
        memoryview(b"ab"),
        {1, 2},
        frozenset({"a"}),
        datetime.datetime(2026, 11, 30, 12, 0),
        datetime.date(2026, 11, 30),
        datetime.timedelta(seconds=3),
        uuid.UUID(int=7),
        decimal.Decimal("1.5"),
        _Colour.RED,
        _Name.ADA,
        _Secret(),
        _Point(),
        object(),
    ]
)
encodable = st.recursive(
    encodable_leaves | non_json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(
            st.text(max_size=6) | st.integers() | st.booleans() | st.floats() | st.none(),
            inner,
            max_size=4,
        )
    ),
    max_leaves=15,
)


def stdlib_encode(msg: Any) -> str:
    """The encoder :func:`exai.server.protocol.encode` replaced (before issue 18)."""
    text = json.dumps(msg, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = json.dumps(msg, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text


@fuzz
@given(encodable)
def test_encode_writes_what_the_standard_library_wrote_or_refuses_what_it_refused(
    value: Any,
) -> None:
    msg = p.result(1, {"v": value})
    try:
        expected = stdlib_encode(msg)
    except (ValueError, TypeError, OverflowError) as exc:
        with pytest.raises(type(exc)):
            p.encode(msg)
        return

    text = p.encode(msg)

    text.encode("utf-8")  # always valid UTF-8
    assert json.loads(text) == json.loads(expected)
    # only numbers may be spelt differently (1e16 / 1e+16)
    assert (text == expected) or any(isinstance(x, float) for x in _leaves(value))


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [*value.keys(), *(x for v in value.values() for x in _leaves(v))]
    if isinstance(value, list | tuple):
        return [x for v in value for x in _leaves(v)]
    return [value]


@pytest.mark.parametrize(
    "value",
    [_Secret(), b"ab", {1}, datetime.date(2026, 11, 30), {float("inf"): 1}, {float("nan"): 1}],
    ids=["attrs", "bytes", "set", "date", "inf-key", "nan-key"],
)
def test_an_answer_json_has_no_form_for_is_refused_not_reshaped(value: Any) -> None:
    # msgspec alone wrote {"secret":"s"}, base64, [1], "2026-11-30", {"inf":1}: a tool's bug
    # shipped as changed data instead of reaching the client as unencodable_result
    with pytest.raises((TypeError, ValueError)):
        p.encode(p.result(1, {"v": value}))
    reply = json.loads(p.encode_reply(p.result(1, {"v": value})) or "")
    assert reply["error"]["data"]["reason"] == "unencodable_result"


def test_a_float_key_is_spelt_as_the_standard_library_spells_it() -> None:
    assert p.encode(p.result(1, {1e16: 1, 1e-7: 2})) == stdlib_encode(
        p.result(1, {1e16: 1, 1e-7: 2})
    )


@fuzz
@given(st.integers() | st.text(max_size=80), st.integers(min_value=1, max_value=300))
def test_the_id_length_check_agrees_with_measuring_the_encoded_id(rid: Any, limit: int) -> None:
    size = len(json.dumps(rid, ensure_ascii=False).encode("utf-8", "surrogatepass"))

    problem = p._id_problem(rid, limit)

    assert (problem is None) == (size <= limit)
