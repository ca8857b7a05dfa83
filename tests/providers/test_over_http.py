"""The provider layer against real mock upstreams over loopback HTTP.

Two :class:`~exai.testing.MockUpstream` servers play providers ``a`` and ``b``. Time is real but
small; tests assert on recorded requests, states and errors, never on how long something took
(a lower bound that follows from ``Retry-After`` is the one exception: it cannot be flaky).
"""

from __future__ import annotations

import logging

import anyio
import attrs
import pytest

from exai.config import ProviderSettings, Secret
from exai.errors import (
    CircuitOpenError,
    DeadlineExceeded,
    UpstreamAuthError,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.providers import ChatRequest, ProviderRouter, StreamDelta
from exai.resilience.retry import RetryBudget

from .conftest import KEY_A, KEY_B, mock_settings, provider_settings, settings_with

pytestmark = pytest.mark.anyio


def _router(a, b, *, attempts: int = 3, **kw) -> ProviderRouter:
    return ProviderRouter(
        mock_settings(a, b, **kw),
        attempts=attempts,
        initial_backoff_s=0.01,
        retry_budget=RetryBudget(ratio=1.0, min_retries_per_s=10),
    )


def _ask(model: str = "auto", **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hello"}], model=model, **kw)


async def test_a_streamed_chat_round_trip_assembles_the_answer_and_reports_deltas(two_mocks):
    a, b = two_mocks
    deltas: list[StreamDelta] = []

    async def on_delta(d: StreamDelta) -> None:
        deltas.append(d)

    async with _router(a, b) as router:
        resp = await router.complete(_ask(on_delta=on_delta))
    assert resp.content == "mock:mock-a: hello"
    assert (resp.provider, resp.model) == ("a", "mock-a")
    assert len(deltas) > 1 and "".join(d.content for d in deltas) == resp.content
    assert resp.usage.total_tokens > 0 and not resp.usage.estimated
    assert a.chat_requests[0].json["stream"] is True


async def test_429_retry_after_no_request_reaches_the_provider_before_it_passed(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.push(Fault.rate_limited(retry_after_s=0.3))
    async with _router(a, b) as router:
        with anyio.fail_after(5):
            resp = await router.complete(_ask("mock-a", allow_fallback=False))
    assert resp.provider == "a"
    first, second = a.chat_requests
    assert second.started_at - first.started_at >= 0.3


async def test_while_held_by_retry_after_calls_fail_without_a_request(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.push(Fault.rate_limited(retry_after_s=30))
    async with _router(a, b) as router:
        for _ in range(3):
            # Waiting 30 s would pass the deadline: the call fails at once instead (the bound
            # only tells "at once" from "after 30 s", with room for a busy machine).
            with anyio.fail_after(10), pytest.raises(UpstreamRateLimited) as info:
                await router.complete(_ask("mock-a", allow_fallback=False))
            assert 0 < info.value.retry_after_s <= 30
        # auto falls back to b meanwhile
        resp = await router.complete(_ask())
    assert len(a.chat_requests) == 1
    assert resp.provider == "b"


async def test_5xx_bounded_retries_open_the_breaker_and_recovery_closes_it(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.push(Fault.status(503), times=3)
    async with _router(a, b, breaker_open_s=0.2, breaker_max_open_s=1.0) as router:
        with pytest.raises(UpstreamRetryableError):
            await router.complete(_ask("mock-a", allow_fallback=False))
        assert len(a.chat_requests) == 3  # bounded retries
        breaker = router.providers["a"].breaker
        assert breaker.state == "open"

        for _ in range(20):  # fast fails: no request reaches the mock
            with pytest.raises(CircuitOpenError) as info:
                await router.complete(_ask("mock-a", allow_fallback=False))
            assert 0 < info.value.retry_after_s <= 0.2
        assert len(a.chat_requests) == 3

        await anyio.sleep(info.value.retry_after_s)  # the upstream has recovered meanwhile
        resp = await router.complete(_ask("mock-a", allow_fallback=False))
        assert resp.provider == "a"
        assert breaker.state == "closed"  # the half-open probe succeeded
    assert len(a.chat_requests) == 4


async def test_with_a_breaker_open_auto_and_fallback_chains_use_the_other_provider(two_mocks):
    a, b = two_mocks
    async with _router(a, b) as router:
        router.providers["a"].breaker.open_until(60)
        auto = await router.complete(_ask())
        chained = await router.complete(_ask("mock-a"))
    assert a.chat_requests == []
    assert (auto.provider, auto.model, auto.content) == ("b", "mock-b", "mock:mock-b: hello")
    assert (chained.provider, chained.model) == ("b", "mock-b")
    assert [x.outcome for x in chained.attempts] == ["circuit_open", "ok"]


async def test_a_malformed_answer_falls_back(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.push(Fault.malformed())
    async with _router(a, b) as router:
        resp = await router.complete(_ask())
    assert resp.provider == "b"
    assert resp.attempts[0].outcome == "upstream_malformed"


async def test_a_hanging_upstream_ends_at_the_deadline_with_a_clear_error(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.set_fault(Fault.hang())
    async with _router(a, b) as router:
        with anyio.fail_after(5):  # a safety net: the inner deadline must fire first
            with pytest.raises(DeadlineExceeded) as info:
                with anyio.fail_after(1.0):
                    await router.complete(_ask("mock-a", allow_fallback=False))
        assert "a/mock-a" in str(info.value) and "deadline" in str(info.value)
        with anyio.fail_after(5):
            await a.wait_disconnect(1)  # the hung request was closed, not left open


async def test_a_stream_stalled_midway_fails_with_a_stall_error(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.set_fault(Fault.stream_stall(after_chunks=2))
    got: list[str] = []

    async def on_delta(d: StreamDelta) -> None:
        got.append(d.content)

    async with _router(a, b, attempts=2, stall_timeout_s=0.2) as router:
        with anyio.fail_after(5):
            with pytest.raises(UpstreamRetryableError, match=r"stalled: no data for 0\.2s"):
                await router.complete(_ask("mock-a", allow_fallback=False, on_delta=on_delta))
    assert len(a.chat_requests) == 2
    assert got  # it did stall mid-way


async def test_a_stream_stalled_beyond_the_deadline_ends_at_the_deadline(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.set_fault(Fault.stream_stall(after_chunks=2))

    async def on_delta(d: StreamDelta) -> None:
        return None

    async with _router(a, b, stall_timeout_s=30) as router:
        with anyio.fail_after(5), pytest.raises(DeadlineExceeded, match="deadline"):
            with anyio.fail_after(1.0):
                await router.complete(_ask("mock-a", allow_fallback=False, on_delta=on_delta))
        with anyio.fail_after(5):
            await a.wait_disconnect(1)


async def test_a_broken_stream_falls_back_to_the_other_provider(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.push(Fault.stream_break(after_chunks=2))

    async def on_delta(d: StreamDelta) -> None:
        return None

    async with _router(a, b) as router:
        resp = await router.complete(_ask(on_delta=on_delta))
    assert resp.provider == "b"
    assert resp.attempts[0].outcome == "upstream_unavailable"


async def test_cancelling_a_call_closes_the_upstream_request_at_once(two_mocks):
    from exai.testing import Fault

    a, b = two_mocks
    a.set_fault(Fault.stream_stall(after_chunks=2))
    streaming = anyio.Event()

    async def on_delta(d: StreamDelta) -> None:
        streaming.set()

    async with _router(a, b, stall_timeout_s=60) as router:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                await router.complete(_ask("mock-a", allow_fallback=False, on_delta=on_delta))

            tg.start_soon(call)
            with anyio.fail_after(5):
                await streaming.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await a.wait_disconnect(1)
        stats = router.providers["a"].breaker.statistics()
    assert stats.failures == 0 and stats.ignored == 1  # cancellation is not a failure


async def test_tpm_charges_an_estimate_and_settles_with_the_reported_usage(two_mocks):
    a, b = two_mocks
    async with _router(a, b, tpm=1_000_000) as router:
        tpm = router.providers["a"].tpm
        assert tpm is not None
        resp = await router.complete(_ask("mock-a", allow_fallback=False, max_output_tokens=400))
        assert resp.usage.total_tokens < 400  # the mock's reported usage is far smaller
        assert tpm.statistics().admitted_cost == resp.usage.total_tokens
        assert router.providers["a"].counters.tpm_reserved >= 400


async def test_each_key_reaches_only_its_own_provider_and_never_the_logs(two_mocks, caplog):
    from exai.testing import Fault

    a, b = two_mocks
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log at DEBUG too
    a.push(Fault.status(500))
    async with _router(a, b) as router:
        await router.complete(_ask("mock-a"))  # a fails once, b answers
        await router.complete(_ask("mock-a", allow_fallback=False))
        await router.complete(_ask("mock-b"))
        await router.refresh_models()
    assert a.requests and b.requests
    assert {r.headers.get("authorization") for r in a.requests} == {f"Bearer {KEY_A}"}
    assert {r.headers.get("authorization") for r in b.requests} == {f"Bearer {KEY_B}"}
    assert caplog.records  # something was logged, and none of it holds a key
    assert KEY_A not in caplog.text and KEY_B not in caplog.text


async def test_a_wrong_key_is_an_auth_error_that_names_no_key(two_mocks, caplog):
    a, _b = two_mocks
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-0123456789"
    s = settings_with(provider_settings("a", a.base_url, wrong, ("mock-a",)))
    async with ProviderRouter(s) as router:
        with pytest.raises(UpstreamAuthError) as info:
            await router.complete(_ask("mock-a"))
    assert len(a.chat_requests) == 1  # never retried
    assert wrong not in str(info.value) and wrong not in caplog.text


@pytest.mark.parametrize("streamed", [False, True])
async def test_kimi_web_search_runs_the_builtin_tool_loop(two_mocks, streamed):
    a, _b = two_mocks
    kimi = ProviderSettings(
        name="kimi", kind="kimi", base_url=a.base_url, api_key=Secret(KEY_A), models=("mock-a",)
    )

    async def on_delta(d: StreamDelta) -> None:
        return None

    async with ProviderRouter(settings_with(kimi)) as router:
        resp = await router.complete(
            _ask("mock-a", use_websearch=True, on_delta=on_delta if streamed else None)
        )
    assert resp.content == "mock:mock-a: web search results for: hello"
    assert resp.web_search_rounds == 1
    second = a.chat_requests[1].json["messages"]
    assert second[-1]["role"] == "tool" and second[-1]["name"] == "$web_search"


async def test_glm_thinking_returns_reasoning_content():
    from exai.testing import MockUpstream

    async with MockUpstream(models=("glm-4.6",), api_key=KEY_B) as g:
        glm = ProviderSettings(
            name="glm", kind="glm", base_url=g.base_url, api_key=Secret(KEY_B), models=("glm-4.6",)
        )
        s = attrs.evolve(settings_with(glm), fast_models=("glm-4.6",))
        async with ProviderRouter(s) as router:
            resp = await router.complete(_ask("glm-4.6", thinking_mode="high", use_websearch=True))
        body = g.chat_requests[0].json
    assert body["thinking"] == {"type": "enabled"}
    assert body["tools"] == [{"type": "web_search", "web_search": {"enable": True}}]
    assert resp.reasoning.startswith("mock reasoning by glm-4.6")


async def test_refresh_models_adds_what_the_provider_lists(two_mocks):
    a, _b = two_mocks
    s = settings_with(provider_settings("a", a.base_url, KEY_A, ()), fast=("mock-a",))
    async with ProviderRouter(s) as router:
        assert router.providers["a"].models() == ()
        out = await router.refresh_models()
        assert "mock-a" in out["a"]
        assert router.resolve("auto") == [("a", "mock-a")]
