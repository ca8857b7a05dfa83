"""The mock upstream's reply rules, without sockets, and the public names of exai.testing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import exai.testing
from exai.testing import _openai


def test_exai_testing_exports_exactly_its_public_names() -> None:
    assert sorted(exai.testing.__all__) == [
        "Fault",
        "FaultProxy",
        "MockUpstream",
        "RecordedRequest",
    ]
    for name in exai.testing.__all__:
        assert getattr(exai.testing, name).__name__ == name


@given(st.text(alphabet="ab ", max_size=60), st.integers(min_value=1, max_value=10))
def test_split_words_joins_back_and_respects_the_part_count(text: str, parts: int) -> None:
    pieces = _openai.split_words(text, parts)
    assert "".join(pieces) == text
    assert len(pieces) <= parts
    assert all(pieces)


def test_reply_usage_follows_the_documented_formula() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}]}
    reply = _openai.build_reply(body, completion_id="c1")
    assert reply.content == "mock:m: abcdefgh"
    assert reply.usage == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_streamed_chunks_carry_the_same_usage_as_the_plain_reply() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three"}]}
    reply = _openai.build_reply(body, completion_id="c1")
    chunks = _openai.reply_chunks(reply)
    assert chunks[-1]["usage"] == _openai.reply_json(reply)["usage"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reply.content


def test_a_conversation_without_a_user_message_still_gets_a_reply() -> None:
    body = {"model": "m", "messages": [{"role": "system", "content": "sys"}]}
    assert _openai.build_reply(body, completion_id="c1").content == "mock:m: "


def test_a_tool_message_for_an_unknown_call_is_rejected() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "tool", "tool_call_id": "nope", "content": "{}"},
        ],
    }
    with pytest.raises(_openai.RequestError) as caught:
        _openai.build_reply(body, completion_id="c1")
    assert caught.value.status == 400
