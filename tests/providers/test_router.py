"""Routing, fallbacks, retries, breakers and buckets of the provider layer.

Upstreams here are ``httpx.MockTransport`` handlers (no sockets), so trio's ``MockClock`` drives
every wait; the same behaviours over real HTTP are in ``test_over_http.py``.
"""

from __future__ import annotations

import math

import anyio
import httpx
import pytest
import trio.lowlevel
import trio.testing

from exai.config import Settings
from exai.errors import (
    CircuitOpenError,
    NoProviderError,
    RateLimitedError,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.providers import ChatRequest, ProviderRouter
from exai.resilience.retry import RetryBudget

from .conftest import KEY_A, KEY_B, ScriptedUpstream, provider_settings, settings_with


@pytest.fixture
def anyio_backend() -> tuple[str, dict]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def _settings(**kw: object) -> Settings:
    return settings_with(
        provider_settings("a", "http://a.test/v1", KEY_A, ("mock-a",), **kw),
        provider_settings("b", "http://b.test/v1", KEY_B, ("mock-b",), **kw),
    )


def _router(
    a: ScriptedUpstream, b: ScriptedUpstream, settings: Settings | None = None, **kw: object
) -> ProviderRouter:
    kw.setdefault("retry_budget", RetryBudget(ratio=1.0, min_retries_per_s=10))
    return ProviderRouter(
        settings or _settings(), transports={"a": a.transport, "b": b.transport}, **kw
    )


def _ask(model: str = "auto", **kw: object) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hello"}], model=model, **kw)


def _fail(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={"error": {"message": "boom"}})


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_auto_uses_the_fast_class_for_simple_tools_and_quality_for_deep_work(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        assert router.resolve("auto", "chat", "single") == [("a", "mock-a"), ("b", "mock-b")]
        assert router.resolve("auto", "codereview", "early")[0] == ("a", "mock-a")
        assert router.resolve("auto", "codereview", "final")[0] == ("b", "mock-b")
        assert router.resolve("auto", "thinkdeep", "early")[0] == ("b", "mock-b")
        resp = await router.complete(_ask(tool="thinkdeep"))
    assert (resp.provider, resp.model) == ("b", "mock-b")
    assert resp.content == "b:mock-b: hello"


@pytest.mark.anyio
async def test_an_explicit_model_always_wins_over_auto(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        resp = await router.complete(_ask("mock-b", tool="chat"))
        pinned = await router.complete(_ask("a/custom-model"))
    assert (resp.provider, resp.model) == ("b", "mock-b")
    assert (pinned.provider, pinned.model) == ("a", "custom-model")
    assert a.chats[-1]["model"] == "custom-model"


@pytest.mark.anyio
async def test_providers_without_a_key_are_never_routed_to(scripted):
    a, b = scripted
    base = Settings.from_env({}, env_file="", config_file="")  # kimi and glm, no keys
    s = settings_with(
        *base.providers,
        provider_settings("a", "http://a.test/v1", KEY_A, ("mock-a",)),
        fast=("glm-4.5-flash", "mock-a"),
    )
    async with _router(a, b, s) as router:
        assert router.resolve("auto") == [("a", "mock-a")]
        with pytest.raises(NoProviderError) as info:
            router.resolve("kimi-k2-0905-preview")
    msg = str(info.value)
    assert "Configured providers: a" in msg
    assert "KIMI_API_KEY" in msg and "GLM_API_KEY" in msg and "EXAI_PROVIDER_<NAME>_BASE_URL" in msg


@pytest.mark.anyio
async def test_an_unknown_model_names_the_configured_providers(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        with pytest.raises(NoProviderError, match="Configured providers: a, b"):
            await router.complete(_ask("no-such-model"))
    assert a.requests == [] and b.requests == []


# -- fallbacks and retries --------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_retryable_failure_falls_back_to_the_next_provider_at_once(scripted):
    a, b = scripted
    a.push(_fail(503))
    async with _router(a, b) as router:
        resp = await router.complete(_ask())
    assert (resp.provider, resp.model) == ("b", "mock-b")
    assert [(x.provider, x.outcome) for x in resp.attempts] == [
        ("a", "upstream_unavailable"),
        ("b", "ok"),
    ]


@pytest.mark.anyio
async def test_5xx_is_retried_a_bounded_number_of_times_then_fails(scripted):
    a, b = scripted
    a.push(*[_fail(500)] * 10)
    async with _router(a, b, attempts=3) as router:
        with pytest.raises(UpstreamRetryableError) as info:
            await router.complete(_ask("mock-a", allow_fallback=False))
    assert len(a.requests) == 3
    assert len(info.value.extra["attempts"]) == 1  # the last pass's failures


@pytest.mark.anyio
async def test_5xx_opens_the_breaker_then_calls_fail_fast_without_a_request(scripted):
    a, b = scripted
    a.push(*[_fail(503)] * 10)
    async with _router(a, b, attempts=3) as router:
        with pytest.raises(UpstreamRetryableError):
            await router.complete(_ask("mock-a", allow_fallback=False))
        breaker = router.providers["a"].breaker
        assert breaker.state == "open"  # 3 failures of 3 calls (minimum_calls=3)
        sent = len(a.requests)
        with pytest.raises(CircuitOpenError) as info:
            await router.complete(_ask("mock-a", allow_fallback=False))
    assert len(a.requests) == sent
    assert 0 < info.value.retry_after_s <= 1.0
    assert info.value.to_error_data()["reason"] == "circuit_open"


@pytest.mark.anyio
async def test_after_recovery_a_half_open_probe_closes_the_breaker(scripted):
    a, b = scripted
    a.push(*[_fail(503)] * 3)
    async with _router(a, b, attempts=3) as router:
        with pytest.raises(UpstreamRetryableError):
            await router.complete(_ask("mock-a", allow_fallback=False))
        breaker = router.providers["a"].breaker
        assert breaker.state == "open"
        await anyio.sleep(1.01)  # breaker_open_s = 1.0; the upstream has recovered
        resp = await router.complete(_ask("mock-a", allow_fallback=False))
        assert resp.content == "a:mock-a: hello"
        assert breaker.state == "closed"


@pytest.mark.anyio
async def test_with_a_breaker_open_auto_is_served_by_the_other_provider(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        router.providers["a"].breaker.open_until(30)
        resp = await router.complete(_ask())
        explicit = await router.complete(_ask("mock-a"))  # fast class falls back to mock-b
    assert a.requests == []
    assert (resp.provider, resp.model) == ("b", "mock-b")
    assert resp.attempts[0].outcome == "circuit_open"
    assert (explicit.provider, explicit.model) == ("b", "mock-b")


@pytest.mark.anyio
async def test_every_breaker_open_fails_at_once_with_the_shortest_retry_after(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        router.providers["a"].breaker.open_until(30)
        router.providers["b"].breaker.open_until(10)
        start = anyio.current_time()
        with pytest.raises(CircuitOpenError) as info:
            await router.complete(_ask())
        assert anyio.current_time() == start  # no sleep, no retry
    assert info.value.retry_after_s == pytest.approx(10)
    assert a.requests == [] and b.requests == []


@pytest.mark.anyio
async def test_429_retry_after_keeps_every_request_away_until_it_has_passed(scripted):
    a, b = scripted
    sent_at: list[float] = []

    def limited(request: httpx.Request) -> httpx.Response:
        sent_at.append(anyio.current_time())
        return _fail(429, **{"Retry-After": "2"})

    def ok(request: httpx.Request) -> httpx.Response:
        sent_at.append(anyio.current_time())
        return a.handler.__func__(ScriptedUpstream("a"), request)  # type: ignore[attr-defined]

    a.push(limited, ok)
    async with _router(a, b) as router:
        with anyio.fail_after(10):
            resp = await router.complete(_ask("mock-a", allow_fallback=False))
        provider = router.providers["a"]
    assert resp.provider == "a"
    assert len(sent_at) == 2
    assert sent_at[1] - sent_at[0] >= 2.0
    assert provider.breaker.statistics().failures == 0  # a 429 is not a failure


@pytest.mark.anyio
async def test_429_with_a_retry_after_beyond_the_deadline_fails_without_waiting(scripted):
    a, b = scripted
    a.push(_fail(429, **{"Retry-After": "30"}))
    async with _router(a, b) as router:
        with anyio.fail_after(5):
            with pytest.raises(UpstreamRateLimited) as info:
                await router.complete(_ask("mock-a", allow_fallback=False))
            # While held, a second call does not reach the provider either.
            with pytest.raises(UpstreamRateLimited):
                await router.complete(_ask("mock-a", allow_fallback=False))
        assert router.providers["a"].breaker.state == "open"
    assert info.value.retry_after_s == pytest.approx(30, abs=0.01)
    assert len(a.requests) == 1


@pytest.mark.anyio
async def test_an_auth_failure_is_never_retried_and_never_trips_the_breaker(scripted):
    a, b = scripted
    a.push(*[_fail(401)] * 10)
    async with _router(a, b) as router:
        for _ in range(5):
            resp = await router.complete(_ask())
            assert resp.provider == "b"
        with pytest.raises(UpstreamAuthError):
            await router.complete(_ask("mock-a", allow_fallback=False))
        stats = router.providers["a"].breaker.statistics()
    assert len(a.requests) == 6  # one per call: no retries
    assert stats.state == "closed" and stats.failures == 0


@pytest.mark.anyio
async def test_a_bad_request_ends_the_call_without_trying_another_provider(scripted):
    a, b = scripted
    a.push(_fail(400))
    async with _router(a, b) as router:
        with pytest.raises(UpstreamBadRequest):
            await router.complete(_ask())
        assert router.providers["a"].breaker.statistics().failures == 0
    assert b.requests == []


@pytest.mark.anyio
async def test_a_deadline_too_short_to_try_anything_is_reported_as_such(scripted):
    from exai.errors import DeadlineExceeded

    a, b = scripted
    async with _router(a, b) as router:
        with anyio.fail_after(0.001):
            with pytest.raises(DeadlineExceeded, match="no time left"):
                await router.complete(_ask())
    assert a.requests == []


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": trio.testing.MockClock()})])
@pytest.mark.anyio
async def test_a_loop_that_wakes_after_both_deadlines_still_reports_the_deadline(scripted):
    """On a busy machine the loop can wake only after the router's deadline and the caller's
    have both passed; trio then cancels through the caller's scope. The call still ends with
    ``DeadlineExceeded`` naming what was tried (it ended as the caller's bare timeout).
    The clock here moves only when the test jumps it: one jump past both deadlines."""
    from exai.errors import DeadlineExceeded

    a, b = scripted
    asked = anyio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        asked.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    a.push(hang)
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)

    async def wake_late() -> None:
        await asked.wait()
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(2.0)

    async with _router(a, b) as router, anyio.create_task_group() as tg:
        tg.start_soon(wake_late)
        with pytest.raises(DeadlineExceeded, match="deadline") as info:
            with anyio.fail_after(1.0):
                await router.complete(_ask("mock-a", allow_fallback=False))
    assert "a/mock-a" in str(info.value)


# -- buckets ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tpm_charges_an_estimate_before_the_call_and_settles_with_usage(scripted):
    a, b = scripted
    during: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        during.append(tpm.statistics().admitted_cost)
        return ScriptedUpstream("a").handler(request)

    a.push(answer)
    async with _router(a, b, _settings(tpm=100_000)) as router:
        tpm = router.providers["a"].tpm
        assert tpm is not None
        req = _ask("mock-a", allow_fallback=False, max_output_tokens=500)
        from exai.providers.provider import estimate_tokens

        estimate = estimate_tokens(req.messages, 500)
        resp = await router.complete(req)
        after = tpm.statistics().admitted_cost
    assert during == [estimate]  # reserved before the request left
    assert resp.usage.total_tokens == 15
    assert after == 15  # settled: the unused part of the estimate was refunded


@pytest.mark.anyio
async def test_tpm_overrun_is_carried_into_the_next_reservation(scripted):
    a, b = scripted
    a.usage = (4000, 1000)  # far above the estimate
    async with _router(a, b, _settings(tpm=100_000)) as router:
        provider = router.providers["a"]
        req = _ask("mock-a", allow_fallback=False, max_output_tokens=10)
        await router.complete(req)
        assert provider.tpm is not None
        assert provider.tpm.statistics().admitted_cost == 5000
        assert provider.counters.tpm_debt == 0


@pytest.mark.anyio
async def test_tpm_limit_refuses_a_call_whose_estimate_does_not_fit(scripted):
    a, b = scripted
    a.usage = (900, 90)
    async with _router(a, b, _settings(tpm=1000)) as router:
        req = _ask("mock-a", allow_fallback=False, max_output_tokens=100)
        await router.complete(req)  # uses 990 of 1000
        with anyio.fail_after(1):  # the bucket needs ~55 s to refill enough: do not wait
            with pytest.raises(RateLimitedError, match="tokens per minute") as info:
                await router.complete(req)
    assert len(a.requests) == 1
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 1


@pytest.mark.anyio
async def test_rpm_limit_falls_back_to_another_provider_without_a_request(scripted):
    a, b = scripted
    async with _router(a, b, _settings(rpm=1)) as router:
        first = await router.complete(_ask())
        second = await router.complete(_ask())
    assert (first.provider, second.provider) == ("a", "b")
    assert second.attempts[0].outcome == "rate_limited"
    assert len(a.requests) == 1


@pytest.mark.anyio
async def test_status_reports_breaker_limits_and_use_without_secrets(scripted):
    a, b = scripted
    async with _router(a, b, _settings(rpm=60, tpm=6000)) as router:
        await router.complete(_ask())
        st = router.status()
    pa = st["providers"]["a"]
    assert pa["breaker"]["state"] == "closed"
    assert pa["limits"]["rpm"] == 60 and pa["limits"]["tpm"] == 6000
    assert pa["counters"]["ok"] == 1 and pa["host"] == "a.test"
    assert math.isclose(pa["use"]["rpm_available"], 59, abs_tol=0.01)
    text = repr(st)
    assert KEY_A not in text and KEY_B not in text


def test_the_answer_with_its_attempts_carries_every_field_of_the_providers() -> None:
    """``_with_attempts`` builds the response field by field (cheaper than ``attrs.evolve``):
    a field added to ``ChatResponse`` must be added there too, or this fails."""
    import attrs

    from exai.providers.router import _with_attempts
    from exai.providers.types import Attempt, ChatResponse, Usage

    resp = ChatResponse(
        content="c",
        reasoning="r",
        model="m",
        provider="p",
        usage=Usage(1, 2, 3, True),
        attempts=(Attempt("x", "y", "z"),),
        finish_reason="stop",
        key_fingerprint="k",
        web_search_rounds=2,
    )
    attempts = [Attempt("p", "m", "upstream_unavailable", "d", 1.0), Attempt("p", "m", "ok")]
    got = _with_attempts(resp, attempts)
    assert got == attrs.evolve(resp, attempts=tuple(attempts))
    assert {f.name for f in attrs.fields(ChatResponse)} == {
        "content", "reasoning", "model", "provider", "usage", "attempts", "finish_reason",
        "key_fingerprint", "web_search_rounds",
    }  # fmt: skip
    assert Usage(1, 2, 3, True).to_dict() == attrs.asdict(Usage(1, 2, 3, True))
    assert list(Usage().to_dict()) == [f.name for f in attrs.fields(Usage)]
