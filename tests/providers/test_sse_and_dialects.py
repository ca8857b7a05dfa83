"""The sans-IO parts: SSE decoding, stream assembly, Kimi/GLM request shapes, token estimate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exai.providers.dialect import OpenAIDialect
from exai.providers.dialects import dialect_for
from exai.providers.glm import GLMDialect
from exai.providers.kimi import KimiDialect
from exai.providers.provider import estimate_tokens
from exai.providers.sse import SSEDecoder, StreamAssembler
from exai.providers.types import ChatRequest


def test_sse_events_split_across_arbitrary_chunk_boundaries() -> None:
    stream = (
        b'data: {"a":1}\n\n: comment\n\ndata: line1\ndata: line2\r\n\r\nevent: x\ndata: [DONE]\n\n'
    )
    for size in (1, 2, 3, 7, len(stream)):
        dec = SSEDecoder()
        events = []
        for i in range(0, len(stream), size):
            events += dec.feed(stream[i : i + size])
        assert [e.data for e in events] == ['{"a":1}', "line1\nline2", "[DONE]"]
        assert events[2].event == "x"


def test_sse_refuses_an_endless_line() -> None:
    dec = SSEDecoder()
    with pytest.raises(ValueError):
        for _ in range(5000):
            dec.feed(b"x" * 1024)


def test_stream_assembler_joins_content_reasoning_tool_calls_and_usage() -> None:
    asm = StreamAssembler()
    chunks = [
        {"model": "m", "choices": [{"delta": {"role": "assistant", "reasoning_content": "hmm"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c1",
                                "function": {"name": "$web_search", "arguments": '{"q":'},
                            }
                        ]
                    }
                }
            ]
        },
        {
            "choices": [
                {
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]},
                    "finish_reason": "tool_calls",
                }
            ]
        },
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    ]
    for c in chunks:
        asm.add(c)
    done = asm.completion()
    msg = done["choices"][0]["message"]
    assert msg["content"] == "Hello"
    assert msg["reasoning_content"] == "hmm"
    assert msg["tool_calls"][0]["function"] == {"name": "$web_search", "arguments": '{"q":"x"}'}
    assert done["choices"][0]["finish_reason"] == "tool_calls"
    assert done["usage"]["total_tokens"] == 5


def test_stream_assembler_rejects_a_chunk_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError):
        StreamAssembler().add({"choices": "nope"})


def _req(**kw: object) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], **kw)  # type: ignore[arg-type]


def test_kimi_declares_the_builtin_web_search_tool() -> None:
    body = KimiDialect().build_body(_req(use_websearch=True), "kimi-k2-0905-preview", stream=True)
    assert body["tools"] == [{"type": "builtin_function", "function": {"name": "$web_search"}}]
    assert body["stream"] is True and "stream_options" not in body


def test_kimi_echoes_a_web_search_call_back_as_a_tool_message() -> None:
    msg = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "builtin_function",
                "function": {"name": "$web_search", "arguments": '{"query": "trio"}'},
            }
        ],
    }
    more = KimiDialect().tool_round(msg, "tool_calls")
    assert more is not None
    assert more[0]["role"] == "assistant" and more[0]["tool_calls"] == msg["tool_calls"]
    assert more[1] == {
        "role": "tool",
        "tool_call_id": "c1",
        "name": "$web_search",
        "content": json.dumps({"query": "trio"}),
    }
    assert KimiDialect().tool_round({"content": "done"}, "stop") is None


def test_glm_web_search_tool_and_thinking_only_for_thinking_families() -> None:
    d = GLMDialect()
    body = d.build_body(_req(use_websearch=True, thinking_mode="high"), "glm-4.6", stream=False)
    assert body["tools"] == [{"type": "web_search", "web_search": {"enable": True}}]
    assert body["thinking"] == {"type": "enabled"}
    assert d.build_body(_req(thinking_mode="minimal"), "glm-4.5", stream=False)["thinking"] == {
        "type": "disabled"
    }
    assert "thinking" not in d.build_body(_req(thinking_mode="high"), "glm-4", stream=False)


def test_plain_openai_asks_for_usage_in_streams_and_passes_limits() -> None:
    body = OpenAIDialect().build_body(_req(temperature=0.2, max_output_tokens=50), "m", stream=True)
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 50
    assert "tools" not in body
    assert isinstance(dialect_for("something-else"), OpenAIDialect)


def test_token_estimate_covers_prompt_and_output_cap() -> None:
    msgs = [{"role": "user", "content": "x" * 4000}]
    assert estimate_tokens(msgs, 100) >= 1000 + 100
    assert estimate_tokens(msgs, None) > estimate_tokens(msgs, 100)


def test_an_event_ended_by_a_cr_at_the_end_of_a_chunk_is_not_held_back() -> None:
    # A CR-only server that then pauses (or holds the connection open) must not have its last
    # event wait for a byte that may never come; a LF opening the next chunk is that CR's.
    dec = SSEDecoder()
    assert [e.data for e in dec.feed(b"data: a\r\r")] == ["a"]
    assert [e.data for e in dec.feed(b"\ndata: b\r\n\r\n")] == ["b"]


def test_a_tool_call_index_far_out_of_range_is_refused_not_allocated() -> None:
    frag = {"index": 10**9, "function": {"name": "x", "arguments": ""}}
    with pytest.raises(ValueError, match="tool call index"):
        StreamAssembler().add({"choices": [{"delta": {"tool_calls": [frag]}}]})


def test_an_unfinished_line_is_buffered_not_handed_to_the_line_parser_again_per_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the fast path copied and re-parsed everything buffered on every read: a 4 MiB line in
    # 1 KiB reads cost 20 s of CPU (0.19 s before the fast path). The bytes handed to the
    # line parser must stay within a small multiple of the bytes fed.
    handed = [0]
    original = SSEDecoder._feed_lines

    def counting(self: SSEDecoder, chunk: bytes) -> list[Any]:
        handed[0] += len(chunk)
        return original(self, chunk)

    monkeypatch.setattr(SSEDecoder, "_feed_lines", counting)
    dec = SSEDecoder()
    fed = 0
    for _ in range(512):
        assert dec.feed(b"x" * 1024) == []
        fed += 1024
    events = dec.feed(b"\n\n")
    assert events == []  # (a line "xxx…" is a field named xxx…, ignored: no data, no event)
    assert handed[0] <= 2 * (fed + 2)
    dec = SSEDecoder()
    body = b"data: " + b"y" * (256 * 1024) + b"\n\n"
    got = [e for i in range(0, len(body), 1000) for e in dec.feed(body[i : i + 1000])]
    assert [e.data for e in got] == ["y" * (256 * 1024)]
