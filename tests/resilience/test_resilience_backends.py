"""Each primitive under both backends: trio (MockClock) and asyncio (real time, tiny waits).

The ``anyio_backend`` fixture of this folder's conftest parametrizes every test here.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import exai
import exai.resilience
from exai.errors import CircuitOpenError, UpstreamRateLimited, UpstreamRetryableError
from exai.resilience import CircuitBreaker, RetryBudget, TokenBucket, retrying

pytestmark = pytest.mark.anyio


async def fail() -> None:
    raise UpstreamRetryableError("503", provider="glm")


async def test_breaker_trips_rejects_probes_and_recovers() -> None:
    breaker = CircuitBreaker(
        "smoke", minimum_calls=2, window_size=4, open_duration_s=0.02, max_open_duration_s=0.1
    )
    for _ in range(2):
        with pytest.raises(UpstreamRetryableError):
            await breaker.call(fail)
    with pytest.raises(CircuitOpenError) as info:
        async with breaker:
            pass
    assert 0 < info.value.retry_after_s <= 0.02
    await anyio.sleep(0.03)
    assert breaker.state == "half_open"
    with anyio.move_on_after(0.001):  # a cancelled probe decides nothing
        await breaker.call(anyio.sleep, 1.0)
    assert breaker.state == "half_open"
    async with breaker:
        await anyio.lowlevel.checkpoint()
    assert breaker.state == "closed"
    breaker.open_until(0.05)
    assert breaker.state == "open"


async def test_bucket_admits_waits_and_drops_cancelled_waiters() -> None:
    bucket = TokenBucket(rate_per_s=100.0, capacity=2)
    assert bucket.try_acquire(2) == 0.0
    assert bucket.try_acquire() > 0.0
    with anyio.move_on_after(0.001):
        await bucket.acquire(2)  # needs 20 ms: gives up, taking nothing
    with anyio.fail_after(1.0):
        await bucket.acquire(1)
    bucket.refund(1)
    stats = bucket.statistics()
    assert stats.waiters == 0 and stats.admitted == 2 and stats.admitted_cost == 2.0


async def test_retrying_retries_honours_retry_after_and_the_deadline() -> None:
    attempts: list[float] = []

    async def flaky() -> str:
        attempts.append(anyio.current_time())
        if len(attempts) == 1:
            raise UpstreamRateLimited("429", provider="kimi", retry_after_s=0.02)
        return "ok"

    assert await retrying(attempts=2, initial_backoff_s=0.001).call(flaky) == "ok"
    assert attempts[1] - attempts[0] >= 0.02

    calls = 0

    async def always_down() -> None:
        nonlocal calls
        calls += 1
        await fail()

    with anyio.fail_after(0.05), pytest.raises(UpstreamRetryableError):
        await retrying(attempts=5, initial_backoff_s=1.0, budget=RetryBudget()).call(always_down)
    assert calls == 1  # a 0.5-1 s backoff cannot fit in 50 ms: give up at once


def test_public_api_is_pinned() -> None:
    assert set(exai.resilience.__all__) == {
        "GCRA_GROUP_SCRIPT",
        "GCRA_SCRIPT",
        "RedisBucketGroup",
        "Backoff",
        "BreakerState",
        "BreakerStatistics",
        "CircuitBreaker",
        "DrainStatistics",
        "RedisLike",
        "RedisTokenBucket",
        "RetryBudget",
        "RetryBudgetStatistics",
        "RetryPolicy",
        "TokenBucket",
        "TokenBucketStatistics",
        "Wakeup",
        "count_unless_caller_error",
        "drain_loop",
        "is_redis_unreachable",
        "is_retryable",
        "retrying",
    }
    assert exai.CircuitBreaker is CircuitBreaker
    assert exai.TokenBucket is TokenBucket
    assert exai.retrying is retrying
    assert exai.RedisTokenBucket is exai.resilience.RedisTokenBucket
