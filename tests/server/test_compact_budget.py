"""Keeping an answer's text once (:func:`exai.server.compact.compact`) is bounded work.

Each long string of ``structuredContent`` is looked for in the answer's text, and a string the
text does not hold costs a scan of the whole text: 1,000 strings of 1 KiB against a 3 MiB text
were 1,000 scans, one step of 3.7 s on the loop (found by an attack, 2026-12-01). A budget of
characters scanned (``_SPLICE_SCAN_CHARS``) bounds it; what is not looked for stays in the text.
"""

from __future__ import annotations

from typing import Any

import pytest

from exai.server import compact as c

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def _many_strings_payload() -> dict[str, Any]:
    text = "t" * (3 * MiB)
    structured = {"notes": [f"{i:06d}" + "n" * 1024 for i in range(1000)], "content": "x"}
    return {
        "result": {"content": [{"type": "text", "text": text}], "structuredContent": structured}
    }


def test_strings_the_text_does_not_hold_are_looked_for_within_the_budget(monkeypatch):
    looked: list[int] = []
    find = c._find

    def counting_find(text: str, value: str, length: int) -> int:
        looked.append(len(text))
        return find(text, value, length)

    monkeypatch.setattr(c, "_find", counting_find)
    payload = _many_strings_payload()
    assert c.compact(payload) is payload  # nothing repeated: kept as it is
    # the old code scanned the 3 MiB text once per string: 1,000 times; the budget (16 Mi
    # characters) lets it be scanned 6 times
    assert 0 < len(looked) <= 6


async def test_many_strings_the_text_does_not_hold_leave_the_loop_free():
    # (the stall check of tests/stall_plugin.py: a step over 0.1 s fails the test; 3.7 s before)
    payload = _many_strings_payload()
    assert c.compact(payload) is payload


def test_the_answers_of_a_consensus_in_its_text_are_still_each_kept_once():
    answers = [chr(ord("a") + i) * MiB + "\n" for i in range(4)]
    text = "".join(f"## model {i}\n{a}\n" for i, a in enumerate(answers))
    payload = {
        "result": {
            "content": [{"type": "text", "text": text}],
            "structuredContent": {
                "answers": [{"model": str(i), "text": a} for i, a in enumerate(answers)]
            },
        }
    }
    stored = c.compact(payload)
    pieces = stored["result"]["content"][0]["text"].pieces
    assert sum(isinstance(p, c._Ref) for p in pieces) == 4
    assert c.approx_size(stored) < c.approx_size(payload) * 0.6
    assert c.expand(stored) == payload


def _many_blocks_payload(block_text: str, blocks: int = 2000) -> dict[str, Any]:
    # one text block long enough to be searched, then many more: tiny ones (nothing to find,
    # nothing scanned, so the characters-scanned budget was never spent) or 1 KiB ones
    structured = {"notes": [f"{i:04d}" * 256 for i in range(1000)]}
    content = [{"type": "text", "text": "y" * 1024}]
    content += [{"type": "text", "text": block_text} for _ in range(blocks)]
    return {"result": {"content": content, "structuredContent": structured}}


@pytest.mark.parametrize("block_text", ["", "z", "y" * 1100], ids=["empty", "tiny", "1-kib"])
def test_many_text_blocks_are_looked_through_within_the_budget(monkeypatch, block_text):
    """Every (block, string) pair looked at costs the budget: 2,000 blocks against 1,000
    strings were 2 million looks on the old code (10,000 tiny blocks: one step of 8 s)."""
    looks = 0
    find, stripped = c._find, c._stripped_length

    def counting_find(text: str, value: str, length: int) -> int:
        nonlocal looks
        looks += 1
        return find(text, value, length)

    def counting_stripped(value: str) -> int:
        nonlocal looks
        looks += 1
        return stripped(value)

    monkeypatch.setattr(c, "_find", counting_find)
    monkeypatch.setattr(c, "_stripped_length", counting_stripped)
    payload = _many_blocks_payload(block_text)
    assert c.compact(payload) is payload
    # (each look costs at least 1 KiB of the budget; plus one length per string)
    assert looks <= c._SPLICE_SCAN_CHARS // 1024 + 1000


async def test_many_tiny_text_blocks_leave_the_loop_free():
    # (the stall check: a step over 0.1 s fails the test; 8 s for 10,000 blocks on the old code)
    payload = _many_blocks_payload("z", blocks=10_000)
    assert c.compact(payload) is payload
