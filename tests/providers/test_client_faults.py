"""A client's bad input stays the client's: it never counts on a provider's shared breaker
(issue 12, item 6). Only upstream outcomes — HTTP status, transport errors, timeouts, malformed
upstream replies — count; anything the request caused is refused before any upstream call."""

from __future__ import annotations

import pytest

from exai.errors import (
    InvalidParams,
    UpstreamContentFiltered,
    UpstreamMalformedResponse,
    UpstreamQuotaExhausted,
    UpstreamRetryableError,
)
from exai.providers import ChatRequest, ProviderRouter, StreamDelta
from exai.providers.provider import breaker_records
from exai.resilience.retry import RetryBudget

from .conftest import mock_settings

pytestmark = pytest.mark.anyio

POISON = "please summarise \ud800 this"  # a lone surrogate: valid JSON escape, not Unicode


def _router(a, b) -> ProviderRouter:
    return ProviderRouter(
        mock_settings(a, b),
        attempts=3,
        initial_backoff_s=0.01,
        retry_budget=RetryBudget(ratio=1.0, min_retries_per_s=10),
    )


async def _noop(d: StreamDelta) -> None:
    pass


def _ask(content: str, **kw) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
        model="mock-a",
        on_delta=_noop,
        **kw,
    )


async def test_a_hundred_prompts_that_are_not_unicode_leave_the_breaker_closed(two_mocks):
    a, b = two_mocks
    async with _router(a, b) as router:
        for _ in range(100):
            with pytest.raises(InvalidParams) as info:
                await router.complete(_ask(POISON))
            assert info.value.field == "messages[1].content"
            assert "not valid Unicode" in str(info.value)
        stats = router.providers["a"].breaker.statistics()
        assert stats.state == "closed" and stats.failures == 0 and stats.calls == 0
        assert a.chat_requests == [] and b.chat_requests == []  # refused before any request
        served = await router.complete(_ask("hello"))
    assert served.provider == "a" and served.content == "mock:mock-a: hello"


async def test_a_failing_caller_callback_never_counts_on_the_breaker(two_mocks):
    """Any exception that is not an upstream outcome (here the caller's own progress callback
    failing mid-stream) is not the provider's fault."""
    a, b = two_mocks

    async def broken(d: StreamDelta) -> None:
        raise RuntimeError("the caller's progress sink broke")

    async with _router(a, b) as router:
        for _ in range(20):
            req = ChatRequest(
                messages=[{"role": "user", "content": "hi"}],
                model="mock-a",
                allow_fallback=False,
                on_delta=broken,
            )
            with pytest.raises(RuntimeError):
                await router.complete(req)
        stats = router.providers["a"].breaker.statistics()
    assert stats.state == "closed" and stats.failures == 0


def test_only_upstream_outcomes_count_on_a_provider_breaker():
    counted = [UpstreamRetryableError("503"), UpstreamMalformedResponse("not json")]
    not_counted = [
        InvalidParams("bad prompt"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        TypeError("a bug of ours"),
        UpstreamContentFiltered("filtered"),
        UpstreamQuotaExhausted("no balance"),
    ]
    assert all(breaker_records(e) for e in counted)
    assert not any(breaker_records(e) for e in not_counted)
