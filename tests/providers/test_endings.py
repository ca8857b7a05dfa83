"""How a provider ends an answer, at the provider layer, over real HTTP on loopback.

One row per shape real upstreams produce (issue 13; ``docs/providers.md`` has the table). Each
row runs streamed and not, in the OpenAI, Kimi and GLM dialects, twice: with a fallback provider
(``mock-a`` then ``mock-b``) and alone (``allow_fallback=False``, so the router retries ``a``).
Each asserts what the caller gets, how many requests each upstream saw (the retry and fallback
counts) and what ``a``'s breaker counted. The fault is pushed once: the next request to ``a``
is answered normally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import attrs
import pytest

from exai.errors import ExaiError
from exai.providers import ChatRequest, ProviderRouter, StreamDelta
from exai.resilience.retry import RetryBudget
from exai.testing import Fault, MockUpstream

from .conftest import mock_settings

pytestmark = pytest.mark.anyio

CAP = 64 * 1024  # EXAI_MAX_ANSWER_BYTES in these tests
QUOTA_HOLD_S = 120.0
HUGE = 16 * 1024 * 1024


@attrs.frozen
class Row:
    """One shape and what must come of it.

    ``with_fallback``/``alone``: ``"ok"`` (a's answer), ``"b"`` (b's answer after a failed) or
    the error reason the caller gets. ``a``/``b``: requests each upstream saw with a fallback;
    ``a_alone``: requests a saw alone. ``failures``: what a's breaker counted.
    """

    name: str
    fault: Callable[[], Fault]
    with_fallback: str
    a: int
    b: int
    alone: str
    a_alone: int
    failures: int
    says: str = ""  # text of the provider's own message that must reach the caller
    streamed_only: bool = False  # the shape exists only in a stream


ROWS = [
    Row(
        "finish then no [DONE], held open",
        Fault.no_done,
        "ok",
        1,
        0,
        "ok",
        1,
        0,
        streamed_only=True,
    ),
    Row(
        "error chunk with finish_reason error (OpenRouter)",
        Fault.error_chunk,
        "b",
        1,
        1,
        "ok",
        2,
        1,
        says="Provider disconnected unexpectedly (mock)",
    ),
    Row("GLM network_error", Fault.network_error, "b", 1, 1, "ok", 2, 1, says="network_error"),
    Row(
        "GLM sensitive", Fault.content_filtered, "content_filtered", 1, 0, "content_filtered", 1, 0
    ),
    Row(
        "reasoning only, length",
        Fault.reasoning_exhausted,
        "answer_truncated",
        1,
        0,
        "answer_truncated",
        1,
        0,
        says="reasoning",
    ),
    Row(
        "SSE event: error",
        Fault.sse_error,
        "b",
        1,
        1,
        "ok",
        2,
        1,
        says="upstream generation failed (mock)",
    ),
    Row(
        "HTTP 200 holding only an error with 429",
        lambda: Fault.error_in_200(429, retry_after_s=0.2),
        "b",
        1,
        1,
        "ok",
        2,
        0,
        says="Rate limit exceeded (mock)",
    ),
    Row(
        "429 insufficient balance (Moonshot)",
        Fault.quota_exhausted,
        "b",
        1,
        1,
        "quota_exhausted",
        1,
        0,
        says="insufficient balance",
    ),
    Row("empty answer", lambda: Fault.finish("stop", content=""), "b", 1, 1, "ok", 2, 1),
    Row(
        "answer over the size cap",
        lambda: Fault.huge_answer(HUGE),
        "answer_too_large",
        1,
        0,
        "answer_too_large",
        1,
        0,
    ),
]

OUTCOME_OF_A = {
    "error chunk with finish_reason error (OpenRouter)": "upstream_unavailable",
    "GLM network_error": "upstream_unavailable",
    "SSE event: error": "upstream_unavailable",
    "HTTP 200 holding only an error with 429": "upstream_rate_limited",
    "429 insufficient balance (Moonshot)": "quota_exhausted",
    "empty answer": "upstream_malformed",
}


def _router(a: MockUpstream, b: MockUpstream, kind: str) -> ProviderRouter:
    settings = mock_settings(a, b, kind=kind, stall_timeout_s=300.0, quota_hold_s=QUOTA_HOLD_S)
    return ProviderRouter(
        attrs.evolve(settings, max_answer_bytes=CAP),
        attempts=3,
        initial_backoff_s=0.01,
        retry_budget=RetryBudget(ratio=1.0, min_retries_per_s=10),
    )


def _ask(stream: bool, *, fallback: bool) -> ChatRequest:
    async def on_delta(d: StreamDelta) -> None:
        pass

    return ChatRequest(
        messages=[{"role": "user", "content": "hello"}],
        model="mock-a",
        allow_fallback=fallback,
        on_delta=on_delta if stream else None,
    )


async def _call(router: ProviderRouter, req: ChatRequest) -> Any:
    # A generous bound that only turns a hang into a failure (stall_timeout_s is 300 s: an
    # answer that is waited for until the stall bound never gets here).
    with anyio.fail_after(60):
        try:
            return await router.complete(req)
        except ExaiError as exc:
            return exc


def _check(result: Any, expected: str, row: Row, *, alone: bool) -> None:
    if expected in ("ok", "b"):
        assert not isinstance(result, Exception), f"{row.name}: {result!r}"
        want = "mock:mock-a: hello" if expected == "ok" else "mock:mock-b: hello"
        assert result.content == want
        outcomes = [x.outcome for x in result.attempts]
        if expected == "b" or (alone and row.a_alone == 2):
            # a failed first (then b answered, or a answered the retry)
            assert outcomes == [OUTCOME_OF_A[row.name], "ok"]
            assert row.says in result.attempts[0].detail
        else:
            assert outcomes == ["ok"]
        return
    assert isinstance(result, ExaiError), f"{row.name}: expected {expected}, got {result!r}"
    assert result.reason == expected, str(result)
    assert row.says in str(result)


CASES = [
    pytest.param(row, stream, id=f"{row.name}-{'streamed' if stream else 'plain'}")
    for row in ROWS
    for stream in (True, False)
    if stream or not row.streamed_only
]


@pytest.mark.parametrize("kind", ["openai", "kimi", "glm"])
@pytest.mark.parametrize(("row", "stream"), CASES)
async def test_each_ending_is_read_right_with_a_fallback(two_mocks, row, stream, kind):
    a, b = two_mocks
    a.push(row.fault())
    async with _router(a, b, kind) as router:
        result = await _call(router, _ask(stream, fallback=True))
        _check(result, row.with_fallback, row, alone=False)
        assert (len(a.chat_requests), len(b.chat_requests)) == (row.a, row.b)
        stats = router.providers["a"].breaker.statistics()
        assert stats.failures == row.failures


@pytest.mark.parametrize("kind", ["openai", "kimi", "glm"])
@pytest.mark.parametrize(("row", "stream"), CASES)
async def test_each_ending_is_read_right_alone(two_mocks, row, stream, kind):
    a, b = two_mocks
    a.push(row.fault())
    async with _router(a, b, kind) as router:
        result = await _call(router, _ask(stream, fallback=False))
        _check(result, row.alone, row, alone=True)
        assert (len(a.chat_requests), len(b.chat_requests)) == (row.a_alone, 0)
        assert router.providers["a"].breaker.statistics().failures == row.failures


async def test_an_embedded_429_honours_retry_after_before_the_retry(two_mocks):
    a, b = two_mocks
    a.push(Fault.error_in_200(429, retry_after_s=0.3))
    async with _router(a, b, "openai") as router:
        resp = await _call(router, _ask(True, fallback=False))
    assert resp.content == "mock:mock-a: hello"
    first, second = a.chat_requests
    assert second.started_at - first.started_at >= 0.3
    assert resp.attempts[0].retry_after_s == pytest.approx(0.3, abs=0.05)


async def test_a_quota_exhausted_provider_is_held_and_not_hammered(two_mocks):
    a, b = two_mocks
    a.push(Fault.quota_exhausted())
    async with _router(a, b, "kimi") as router:
        first = await _call(router, _ask(True, fallback=False))
        assert first.reason == "quota_exhausted"
        assert QUOTA_HOLD_S - 5 < first.retry_after_s <= QUOTA_HOLD_S
        for _ in range(5):  # held: refused locally, no request
            again = await _call(router, _ask(True, fallback=False))
            assert again.reason == "quota_exhausted"
        served = await _call(router, _ask(True, fallback=True))
        assert served.provider == "b"
        assert served.attempts[0].outcome == "quota_exhausted"
        status = router.providers["a"].status()
    assert len(a.chat_requests) == 1
    assert len(b.chat_requests) == 1
    assert status["use"]["retry_after_s"] > QUOTA_HOLD_S - 5


async def test_a_held_open_stream_is_closed_by_the_client_after_the_answer(two_mocks):
    a, b = two_mocks
    a.push(Fault.no_done())
    async with _router(a, b, "openai") as router:
        resp = await _call(router, _ask(True, fallback=False))
        with anyio.fail_after(30):
            await a.wait_disconnect(1)  # exai hung up; it did not wait for the stall bound
    assert resp.content == "mock:mock-a: hello"
    assert resp.usage.total_tokens > 0 and not resp.usage.estimated
    assert resp.finish_reason == "stop"


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
async def test_an_answer_over_the_cap_stops_the_read(two_mocks, stream):
    a, b = two_mocks
    a.push(Fault.huge_answer(HUGE))
    async with _router(a, b, "openai") as router:
        err = await _call(router, _ask(stream, fallback=True))
        with anyio.fail_after(30):
            await a.wait_disconnect(1)
    assert err.reason == "answer_too_large"
    assert err.to_error_data()["limit_bytes"] == CAP
    # the mock could hand the kernel only what the socket buffers held once exai stopped
    assert a.body_bytes_sent < HUGE // 2
    assert b.chat_requests == []


# -- shapes exai already read right before issue 13, kept as a table too ----------------------

_CHUNK = '{"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": null}]}'
_LAST = '{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"%s}]%s}'
_USAGE = '"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}'


def _sse_body(nl: str = "\n", *, usage_in_choice: bool = False, comments: bool = False) -> bytes:
    events = [_CHUNK % "caf\u00e9 ", _CHUNK % "\u4e16\u754c"]
    if usage_in_choice:
        events.append(_LAST % (", " + _USAGE, ""))
    else:
        events.append(_LAST % ("", ", " + _USAGE))
    out = []
    for ev in [*events, "[DONE]"]:
        if comments:
            out.append(": keep-alive" + nl + nl)
        out.append("data: " + ev + nl + nl)
    return "".join(out).encode("utf-8")


def _known_shapes() -> dict[str, tuple[list[bytes], dict[str, str]]]:
    import gzip

    body = _sse_body()
    cut = body.index("\u00e9".encode()) + 1  # inside the two bytes of "é"
    return {
        "multi-byte UTF-8 split across chunks": ([body[:cut], body[cut:]], {}),
        "comment lines": ([_sse_body(comments=True)], {}),
        "CRLF line ends": ([_sse_body("\r\n")], {}),
        "gzip body": ([gzip.compress(body)], {"content-encoding": "gzip"}),
        "usage inside the choice": ([_sse_body(usage_in_choice=True)], {}),
    }


@pytest.mark.parametrize("shape", list(_known_shapes()))
async def test_shapes_read_right_before_still_are(shape):
    import httpx

    from exai.providers.client import OpenAIClient

    from .conftest import provider_settings

    chunks, headers = _known_shapes()[shape]

    async def body():  # the chunks as the network would hand them over
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream", **headers}, content=body()
        )

    settings = provider_settings("p", "http://upstream.test/v1", None, ("m",))
    async with OpenAIClient(settings, transport=httpx.MockTransport(handler)) as client:
        out = await client.chat({"model": "m", "messages": [], "stream": True})
    assert out["choices"][0]["message"]["content"] == "caf\u00e9 \u4e16\u754c"
    assert out["usage"]["total_tokens"] == 5


async def test_a_data_error_without_choices_fails_with_the_providers_message():
    import httpx

    from exai.providers.client import OpenAIClient

    from .conftest import provider_settings

    body = b'data: {"choices": [{"delta": {"content": "par"}}]}\n\n'
    body += b'data: {"error": {"message": "overloaded, try later", "code": 503}}\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    settings = provider_settings("p", "http://upstream.test/v1", None, ("m",))
    async with OpenAIClient(settings, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ExaiError) as info:
            await client.chat({"model": "m", "messages": [], "stream": True})
    assert info.value.reason == "upstream_unavailable"
    assert "overloaded, try later" in str(info.value)


def test_an_empty_or_null_error_member_is_not_an_error():
    from exai.providers.ending import read_error_doc

    assert read_error_doc(None) is None
    assert read_error_doc({}) is None
    assert read_error_doc("") is None
    doc = read_error_doc({"error": {"code": 429, "message": "slow down", "type": "rate_limit"}})
    assert doc is not None and doc.status == 429 and doc.message == "slow down"
    assert read_error_doc({"code": "1113", "message": "欠费"}).status is None  # GLM codes


async def test_keep_alives_after_the_finish_do_not_hold_the_read_open():
    """A provider that finishes, sends no [DONE] and keeps the connection alive with comments:
    the grace after the finish is counted once, not restarted by each keep-alive."""
    import httpx

    from exai.providers.client import OpenAIClient

    from .conftest import provider_settings

    keepalives = 0

    async def body():
        nonlocal keepalives
        yield b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
        yield b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        while True:
            await anyio.sleep(0.05)
            keepalives += 1
            yield b": keep-alive\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    settings = provider_settings("p", "http://upstream.test/v1", None, ("m",), stall_timeout_s=600)
    async with OpenAIClient(settings, transport=httpx.MockTransport(handler)) as client:
        with anyio.fail_after(60):
            out = await client.chat({"model": "m", "messages": [], "stream": True})
    assert out["choices"][0]["message"]["content"] == "hi"
    assert keepalives > 0
