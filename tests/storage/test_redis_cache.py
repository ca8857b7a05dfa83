"""The Redis thread cache (generation-checked read-through) and idempotency results."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from exai.resilience import CircuitBreaker
from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge
from exai.storage.model import Thread, Turn
from exai.storage.redis_cache import GuardedRedis, IdempotencyResults, ThreadCache
from exai.testing.faultproxy import FaultProxy
from tests.storage.conftest import REDIS_HOST, REDIS_PORT

pytestmark = pytest.mark.anyio

NOW = 1_700_000_000.0


def _thread(n: int = 1, thread_id: str = "t1") -> Thread:
    return Thread(id=thread_id, created_at=NOW, updated_at=NOW, expires_at=NOW + 3600).with_turns(
        [
            Turn(role="user", content=f"m{i}", created_at=NOW, idempotency_key=f"k{i}#0")
            for i in range(n)
        ],
        ttl_s=3600,
    )


@asynccontextmanager
async def guarded(port: int = REDIS_PORT, *, timeout_s: float = 1.0) -> AsyncIterator[GuardedRedis]:
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(
            bridge, f"redis://{REDIS_HOST}:{port}/0", max_connections=4, socket_timeout_s=timeout_s
        )
        breaker = CircuitBreaker(
            "redis",
            minimum_calls=2,
            window_size=4,
            open_duration_s=0.05,
            max_open_duration_s=0.1,
            slow_call_duration_s=10,
        )
        try:
            yield GuardedRedis(redis, breaker, call_timeout_s=timeout_s)
        finally:
            await redis.aclose()


async def test_a_filled_thread_is_a_hit_for_the_next_lookup(
    redis_prefix: str, stall_detector: object
) -> None:
    async with guarded() as guard:
        cache = ThreadCache(guard, prefix=redis_prefix)
        cached, gen = await cache.lookup("t1")
        assert cached is None and gen == b""
        assert await cache.fill(_thread(2), gen, now=NOW)
        cached, _ = await cache.lookup("t1")
    assert cached == _thread(2)
    assert (cache.hits, cache.misses, cache.fills) == (1, 1, 1)


async def test_keys_carry_the_prefix_and_a_hash_tag(redis_prefix: str) -> None:
    async with guarded() as guard:
        cache = ThreadCache(guard, prefix=redis_prefix)
    assert cache.keys("abc") == (
        f"{redis_prefix}thread:{{abc}}",
        f"{redis_prefix}thread:{{abc}}:gen",
    )


async def test_a_write_invalidates_the_cached_thread(redis_prefix: str) -> None:
    async with guarded() as guard:
        cache = ThreadCache(guard, prefix=redis_prefix)
        _, gen = await cache.lookup("t1")
        await cache.fill(_thread(1), gen, now=NOW)
        assert await cache.invalidate("t1")
        cached, _ = await cache.lookup("t1")
    assert cached is None


async def test_a_fill_that_raced_a_write_is_refused(redis_prefix: str) -> None:
    async with guarded() as guard:
        reader = ThreadCache(guard, prefix=redis_prefix)
        writer = ThreadCache(guard, prefix=redis_prefix)
        _, gen = await reader.lookup("t1")  # the reader misses and goes to the store ...
        await writer.invalidate("t1")  # ... a writer commits turn 2 and invalidates ...
        assert not await reader.fill(_thread(1), gen, now=NOW)  # ... the stale fill is refused
        cached, gen2 = await reader.lookup("t1")
        assert cached is None
        assert await reader.fill(_thread(2), gen2, now=NOW)
    assert reader.stale_fills_refused == 1


async def test_an_expired_thread_is_not_cached(redis_prefix: str) -> None:
    async with guarded() as guard:
        cache = ThreadCache(guard, prefix=redis_prefix)
        _, gen = await cache.lookup("t1")
        assert not await cache.fill(_thread(1), gen, now=NOW + 7200)


async def test_invalidations_that_cannot_be_delivered_are_retried_and_bypass_the_cache(
    redis_prefix: str,
) -> None:
    async with (
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
        guarded(proxy.port, timeout_s=0.5) as guard,
    ):
        cache = ThreadCache(guard, prefix=redis_prefix)
        _, gen = await cache.lookup("t1")
        await cache.fill(_thread(1), gen, now=NOW)
        proxy.cut()
        assert not await cache.invalidate("t1")
        assert guard.pending == 1
        proxy.restore()
        # the next lookup delivers the invalidation first, so the old value is never served
        for _ in range(20):
            cached, _ = await cache.lookup("t1")
            if guard.pending == 0:
                break
        assert guard.pending == 0
        assert cached is None


async def test_redis_unreachable_is_a_counted_miss_not_an_error(redis_prefix: str) -> None:
    async with (
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
        guarded(proxy.port, timeout_s=0.5) as guard,
    ):
        cache = ThreadCache(guard, prefix=redis_prefix)
        proxy.cut()
        for _ in range(4):
            cached, gen = await cache.lookup("t1")
            assert cached is None and gen is None
            assert not await cache.fill(_thread(1), gen, now=NOW)
    assert guard.errors >= 2
    assert guard.breaker.state == "open" or guard.rejected > 0


async def test_the_first_idempotency_result_wins(redis_prefix: str) -> None:
    async with guarded() as guard:
        results = IdempotencyResults(guard, prefix=redis_prefix)
        assert await results.get("req-1") is None
        assert await results.put("req-1", {"content": [{"type": "text", "text": "a"}]}, 60)
        assert not await results.put("req-1", {"content": "other"}, 60)
        assert await results.get("req-1") == {"content": [{"type": "text", "text": "a"}]}


async def test_idempotency_results_without_redis_are_unknown(redis_prefix: str) -> None:
    async with (
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
        guarded(proxy.port, timeout_s=0.5) as guard,
    ):
        results = IdempotencyResults(guard, prefix=redis_prefix)
        proxy.cut()
        assert not await results.put("req-1", {"x": 1}, 60)
        assert await results.get("req-1") is None
