"""Issue 11.4 at unit level: what the decoder refuses before it builds anything, what a frame
costs, the id read from a frame's head, the digest of a call, and encoding that never raises."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exai.server import protocol as p

MiB = 1024 * 1024


def call(arguments: Any, rid: Any = 1) -> str:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": "t", "arguments": arguments},
        }
    )


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if either decoder is asked to build objects."""

    def refuse(*args: Any) -> Any:
        raise AssertionError("the frame was decoded")

    monkeypatch.setattr(p, "_FAST_DECODE", refuse)
    monkeypatch.setattr(p, "_load_stdlib", refuse)


@pytest.mark.parametrize(
    ("name", "arguments_json"),
    [
        ("tiny arrays", "[" + "[]," * (4 * MiB // 3) + "[]]"),
        ("tiny strings", "[" + '"",' * (4 * MiB // 3) + '""]'),
        ("nested groups", "[" + ",".join(["[" * 30 + "]" * 30] * (4 * MiB // 61)) + "]"),
        ("numbers", "[" + "1," * (4 * MiB // 2) + "1]"),
    ],
)
def test_a_frame_of_too_many_values_is_refused_before_decoding(
    name: str, arguments_json: str, no_decoding: None
) -> None:
    text = call({"x": "HERE"}, rid="r-1").replace('"HERE"', arguments_json, 1)

    msg = p.decode(text)

    assert isinstance(msg, p.DecodeError)
    assert msg.code == -32700
    assert msg.data == {"reason": "parse_error", "max_elements": p.DEFAULT_MAX_ELEMENTS}
    assert msg.id == "r-1"  # a refusal of valid JSON still carries its id


def test_values_up_to_the_limit_are_accepted_and_one_more_is_not() -> None:
    # the message and its 4 members, params' 2, arguments' 1: 8 values; then the 6 elements
    at_limit = call({"x": [1] * 6})
    over = call({"x": [1] * 7})

    assert isinstance(p.decode(at_limit, max_elements=14), p.Request)
    assert isinstance(p.decode(over, max_elements=14), p.DecodeError)


def test_commas_and_brackets_inside_strings_are_not_values() -> None:
    msg = p.decode(call({"prompt": "[a, b], {c, d}, " * 50_000}), max_elements=100)

    assert isinstance(msg, p.Request)


def test_a_request_costs_its_bytes_plus_its_values() -> None:
    text = call({"xs": [[] for _ in range(1000)]})

    msg = p.decode(text)

    assert isinstance(msg, p.Request)
    # (an empty container is counted twice: the count is an upper bound)
    assert len(text) + 1000 * p.ELEMENT_COST_BYTES <= msg.cost_bytes
    assert msg.cost_bytes <= len(text) + 2100 * p.ELEMENT_COST_BYTES


def count_values(value: Any) -> int:
    """Values, plus one for each empty container (what the scan counts: an upper bound)."""
    total, stack = 0, [value]
    while stack:
        node = stack.pop()
        total += 1
        if isinstance(node, dict | list) and not node:
            total += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return total


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{},"\\ab', max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=30,
)


@given(json_values, st.integers(min_value=1, max_value=40))
def test_the_value_count_agrees_with_walking_the_value(value: Any, limit: int) -> None:
    text = json.dumps(value)

    msg = p.decode(text, max_elements=limit, max_depth=1000)

    refused = isinstance(msg, p.DecodeError) and "JSON values" in msg.message
    assert refused == (count_values(value) > limit)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"jsonrpc":"2.0","id":5,"method":"m","params":{"a":"' + "b" * 9000 + '"}}', (5, "m")),
        ('{"jsonrpc":"2.0","method":"m","params":{"a":"' + "b" * 9000 + '"},"id":5}', (5, "m")),
        ('  {"id" : "abc", "method": "x"', ("abc", "x")),
        ('{"params": {"id": 3}, "id": 4}', (4, None)),
        ('{"id": true, "method": 1}', (None, None)),
        ('{"id": 1.5}', (None, None)),
        ("[1, 2]", (None, None)),
        ('{"a": ' + "[" * 5000, (None, None)),
        ("", (None, None)),
    ],
)
def test_peek_reads_id_and_method_from_the_ends_only(text: str, expected: Any) -> None:
    peeked = p.peek(text)

    assert (peeked.id, peeked.method) == expected


def test_the_call_digest_ignores_meta_and_key_order_but_not_content() -> None:
    a = p.call_digest("tools/call", {"name": "chat", "arguments": {"prompt": "apple", "n": 1}})
    same = p.call_digest(
        "tools/call",
        {"arguments": {"n": 1, "prompt": "apple"}, "name": "chat", "_meta": {"progressToken": 9}},
    )
    other = p.call_digest("tools/call", {"name": "chat", "arguments": {"prompt": "banana"}})
    surrogate = p.call_digest("tools/call", {"name": "chat", "arguments": {"prompt": "\ud800"}})

    assert a == same != other
    assert surrogate not in (a, other)


def test_encode_reply_turns_an_unencodable_answer_into_an_error_with_its_id() -> None:
    text = p.encode_reply(p.result(3, {"x": float("nan")}))

    assert text is not None
    reply = json.loads(text)
    assert reply["id"] == 3
    assert reply["error"]["data"] == {"reason": "unencodable_result"}
    assert p.encode_reply(p.notification("n", {"x": object()})) is None
    assert json.loads(p.encode_reply(p.result(4, {"t": "\ud800"})) or "")["id"] == 4
