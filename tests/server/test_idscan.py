"""The bounded scan that finds the id of a message that cannot be decoded as a whole."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exai.server.idscan import ID_SCAN_BYTES, recover_id, recover_id_from_ends

BIG = "x" * (5 * 1024 * 1024)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps({"jsonrpc": "2.0", "id": 7, "method": "m", "params": {"a": BIG}}), 7),
        (json.dumps({"method": "m", "params": {"a": BIG}, "jsonrpc": "2.0", "id": "ts-1"}), "ts-1"),
        (json.dumps({"method": "m", "params": {"a": BIG}, "id": 9, "jsonrpc": "2.0"}), 9),
        ('{"jsonrpc":"2.0","id":3,"method":"m","params":{"v":NaN}}', 3),
        ('{"jsonrpc":"2.0","id":"d","params":' + "[" * 100_000 + "]" * 100_000 + "}", "d"),
        ('{"jsonrpc":"2.0","id":"\\ud800","method":"m"', "\ud800"),
        ('{"jsonrpc": "2.0", "id": 1,', 1),
    ],
    ids=["id-first", "id-last", "id-then-scalar", "nan", "deep", "surrogate-id", "cut"],
)
def test_the_id_is_found_at_either_end(text: str, expected: Any) -> None:
    assert recover_id(text) == expected
    assert recover_id(text.encode("utf-8", "surrogatepass")) == expected


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"jsonrpc": "2.0", "method": "m", "params": {"id": 5, "a": BIG}}),
        json.dumps({"jsonrpc": "2.0", "method": "m", "params": {"a": BIG, "id": 5}}),
        json.dumps({"jsonrpc": "2.0", "method": "m", "params": {"q": '","id":666}'}}),
        json.dumps({"jsonrpc": "2.0", "id": True, "method": "m"}),
        json.dumps({"jsonrpc": "2.0", "id": [1], "method": "m"}),
        json.dumps({"jsonrpc": "2.0", "id": "x" * 300, "method": "m"}),
        "[" + json.dumps({"jsonrpc": "2.0", "id": 1}) + "]",
        "not json at all",
        "",
    ],
    ids=[
        "nested-first",
        "nested-last",
        "inside-a-string",
        "bool",
        "array",
        "too-long",
        "batch",
        "garbage",
        "empty",
    ],
)
def test_only_a_top_level_string_or_integer_id_is_taken(text: str) -> None:
    assert recover_id(text) is None


def test_the_scan_looks_at_the_ends_only() -> None:
    middle = json.dumps({"jsonrpc": "2.0", "params": {"a": BIG}})
    text = middle[: len(middle) // 2] + '"id": 4, ' + middle[len(middle) // 2 :]
    assert recover_id(text) is None  # nowhere near either end: not looked at
    head = b'{"jsonrpc":"2.0","method":"m","params":{"a":"' + b"x" * ID_SCAN_BYTES
    assert recover_id_from_ends(head, b'xxx"},"id":12}') == 12
