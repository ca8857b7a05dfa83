"""The error mapping at the httpx boundary, over ``httpx.MockTransport`` (no sockets)."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable

import httpx
import pytest

from exai.config import ProviderSettings, Secret
from exai.errors import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamMalformedResponse,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.providers.client import OpenAIClient, parse_retry_after

KEY = "sk-unit-secret-0123456789"


def _settings(**kw: object) -> ProviderSettings:
    base = {"name": "p", "base_url": "http://upstream.test/v1", "api_key": Secret(KEY)}
    base.update(kw)
    return ProviderSettings(**base)  # type: ignore[arg-type]


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "choices": [
                {"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        },
    )


async def _chat(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> dict:
    async with OpenAIClient(_settings(**kw), transport=httpx.MockTransport(handler)) as c:
        return await c.chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})


@pytest.mark.anyio
async def test_the_key_is_sent_as_a_bearer_header_to_the_provider_base_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _ok(request)

    out = await _chat(handler)
    assert out["choices"][0]["message"]["content"] == "hi"
    assert str(seen[0].url) == "http://upstream.test/v1/chat/completions"
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    # Kimi rejects requests whose headers exceed ~4 KB: ours stay tiny.
    assert sum(len(k) + len(v) for k, v in seen[0].headers.items()) < 1024


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, UpstreamAuthError),
        (403, UpstreamAuthError),
        (429, UpstreamRateLimited),
        (500, UpstreamRetryableError),
        (503, UpstreamRetryableError),
        (408, UpstreamRetryableError),
        (400, UpstreamBadRequest),
        (404, UpstreamBadRequest),
        (422, UpstreamBadRequest),
        (302, UpstreamMalformedResponse),
    ],
)
async def test_http_status_maps_to_one_error_class(status: int, error: type) -> None:
    with pytest.raises(error) as info:
        await _chat(lambda r: httpx.Response(status, json={"error": {"message": "nope"}}))
    assert info.value.provider == "p"


@pytest.mark.anyio
async def test_a_provider_echoing_the_key_never_puts_it_in_the_error() -> None:
    body = {"error": {"message": f"Incorrect API key provided: {KEY}"}}
    with pytest.raises(UpstreamAuthError) as info:
        await _chat(lambda r: httpx.Response(401, json=body))
    assert KEY not in str(info.value)
    assert KEY not in json.dumps(info.value.to_error_data())


@pytest.mark.anyio
async def test_429_carries_retry_after_seconds() -> None:
    with pytest.raises(UpstreamRateLimited) as info:
        await _chat(lambda r: httpx.Response(429, headers={"Retry-After": "7"}))
    assert info.value.retry_after_s == 7.0


def test_retry_after_accepts_an_http_date_and_milliseconds() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    ra = parse_retry_after({"Retry-After": when})
    assert ra is not None and 25 <= ra <= 31
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After": "garbage"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("closed"),
        httpx.ConnectTimeout("slow"),
    ],
)
async def test_transport_failures_are_retryable(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(UpstreamRetryableError):
        await _chat(handler)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1,2]", b'{"choices": []}', b'{"choices": [{"message": {"content": 3}}]}'],
)
async def test_a_body_of_the_wrong_shape_is_malformed(body: bytes) -> None:
    with pytest.raises(UpstreamMalformedResponse):
        await _chat(lambda r: httpx.Response(200, content=body))


@pytest.mark.anyio
async def test_a_streamed_answer_is_assembled_and_reported_chunk_by_chunk() -> None:
    chunks = [
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    ]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept"] == "text/event-stream"
        return httpx.Response(
            200, content=sse.encode(), headers={"content-type": "text/event-stream"}
        )

    got: list[str] = []

    async def on_chunk(text: str, thought: str) -> None:
        got.append(text)

    async with OpenAIClient(_settings(), transport=httpx.MockTransport(handler)) as c:
        out = await c.chat({"model": "m", "messages": [], "stream": True}, on_chunk=on_chunk)
    assert got == ["Hel", "lo"]
    assert out["choices"][0]["message"]["content"] == "Hello"
    assert out["usage"]["total_tokens"] == 3


@pytest.mark.anyio
async def test_a_stream_that_ends_without_finishing_is_retryable() -> None:
    sse = 'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=sse.encode(), headers={"content-type": "text/event-stream"}
        )

    async with OpenAIClient(_settings(), transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(UpstreamRetryableError, match="ended the answer early"):
            await c.chat({"model": "m", "messages": [], "stream": True})


@pytest.mark.anyio
async def test_models_are_listed_from_the_data_array() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/models"
        return httpx.Response(200, json={"object": "list", "data": [{"id": "a"}, {"id": "b"}]})

    async with OpenAIClient(_settings(), transport=httpx.MockTransport(handler)) as c:
        assert await c.list_models() == ["a", "b"]


_DEEP = "[" * 100_000  # (nested past the recursion limit of both decoders)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("stream chunk", UpstreamMalformedResponse),
        ("sse error event", UpstreamRetryableError),
        ("plain body", UpstreamMalformedResponse),
        ("error body", UpstreamRetryableError),
        ("models body", UpstreamMalformedResponse),
    ],
)
async def test_a_document_nested_too_deeply_is_malformed_not_a_crash(
    where: str, error: type[Exception]
) -> None:
    # An upstream that sent "[" x 100,000 in a stream chunk failed the call with a
    # RecursionError (the daemon's "internal error in tool 'chat'", call.crashed), found by
    # an attack on a live daemon; every document a provider sends is malformed JSON then.
    def handler(request: httpx.Request) -> httpx.Response:
        sse = {"content-type": "text/event-stream"}
        if where == "stream chunk":
            return httpx.Response(200, content=f"data: {_DEEP}\n\n".encode(), headers=sse)
        if where == "sse error event":
            body = f"event: error\ndata: {_DEEP}\n\n"
            return httpx.Response(200, content=body.encode(), headers=sse)
        if where == "error body":
            return httpx.Response(503, content=_DEEP.encode())
        return httpx.Response(200, content=_DEEP.encode())

    async with OpenAIClient(_settings(), transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(error):
            if where == "models body":
                await c.list_models()
            else:
                stream = where in ("stream chunk", "sse error event")
                await c.chat({"model": "m", "messages": [], "stream": stream})


def test_web_search_arguments_nested_too_deeply_are_read_as_none() -> None:
    from exai.providers.kimi import KimiDialect

    call = {"id": "c1", "function": {"name": "$web_search", "arguments": _DEEP}}
    message = {"role": "assistant", "content": "", "tool_calls": [call]}
    out = KimiDialect().tool_round(message, "tool_calls")  # (a RecursionError before)
    assert out is not None and out[-1]["content"] == "{}"
