"""RedisSlots: a counting semaphore shared by processes through Redis, with leases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from exai.errors import RateLimiterUnavailableError
from exai.resilience.redis_slots import ACQUIRE_SCRIPT, RedisSlots
from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge
from exai.testing import FaultProxy
from tests.storage.conftest import REDIS_HOST, REDIS_PORT, redis_prefix  # noqa: F401

pytestmark = pytest.mark.anyio

WITHIN_S = 15.0

#: Redis's clock in milliseconds, as the slot scripts read it.
NOW_MS_SCRIPT = """
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
#: KEYS[1]: a slot set. ARGV[1]: a holder. Its lease's end (ms on Redis's clock).
SCORE_SCRIPT = "return redis.call('ZSCORE', KEYS[1], ARGV[1])"


@pytest.fixture
def anyio_backend() -> str:
    # real time on trio: leases and Redis round trips are real
    return "trio"


@asynccontextmanager
async def _redis(port: int = REDIS_PORT) -> AsyncIterator[BridgedRedis]:
    async with open_asyncio_bridge() as bridge:
        client = BridgedRedis.from_url(
            bridge, f"redis://{REDIS_HOST}:{port}/0", max_connections=4, socket_timeout_s=1.0
        )
        try:
            yield client
        finally:
            await client.aclose()


async def test_two_processes_share_one_limit_and_a_release_frees_a_slot(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with (
        _redis() as redis,
        RedisSlots(redis, key_prefix=redis_prefix) as one,
        RedisSlots(redis, key_prefix=redis_prefix) as two,
    ):
        assert await one.try_acquire("identity:alice", "a1", 3)
        assert await two.try_acquire("identity:alice", "b1", 3)
        assert await one.try_acquire("identity:alice", "a2", 3)
        assert not await two.try_acquire("identity:alice", "b2", 3)  # 3 in all
        assert await two.try_acquire("identity:bob", "b2", 3)  # another key, its own count
        assert await one.try_acquire("identity:alice", "a1", 3)  # held already: still held
        one.release("identity:alice", "a1")
        assert one.holding("identity:alice") == 1
        with trio.fail_after(WITHIN_S):
            while not await two.try_acquire("identity:alice", "b2", 3):
                await trio.sleep(0.02)
        assert two.refused >= 1


async def test_the_slot_of_a_process_that_died_frees_itself_after_its_lease(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with _redis() as redis, RedisSlots(redis, key_prefix=redis_prefix) as alive:
        # a holder that nobody renews (its process is gone), with a lease of 0.5 s
        key = alive.redis_key("ip:203.0.113.9")
        assert await redis.run_script(ACQUIRE_SCRIPT, [key], ["dead-1", "1", "500"]) == 1
        assert not await alive.try_acquire("ip:203.0.113.9", "me", 1)
        with trio.fail_after(WITHIN_S):
            while not await alive.try_acquire("ip:203.0.113.9", "me", 1):
                await trio.sleep(0.05)


async def test_a_live_process_keeps_its_slots_past_the_lease_by_renewing_them(
    redis_prefix: str,  # noqa: F811
) -> None:
    # A lease of 3 s is renewed every second: it takes a process off the CPU for two seconds
    # to lose it, which is what a lease is for (with 0.6 s, a busy machine's 0.4 s did).
    async with (
        _redis() as redis,
        RedisSlots(redis, key_prefix=redis_prefix, lease_s=3.0) as one,
        RedisSlots(redis, key_prefix=redis_prefix, lease_s=3.0) as two,
    ):
        assert await one.try_acquire("identity:alice", "a1", 1)
        key = one.redis_key("identity:alice")
        taken_until_ms = float(await redis.run_script(SCORE_SCRIPT, [key], ["a1"]))
        # until Redis's clock is past the lease first taken: only renewal keeps the slot now
        with trio.fail_after(WITHIN_S):
            while await redis.run_script(NOW_MS_SCRIPT, [key], []) <= taken_until_ms:
                await trio.sleep(0.1)
        assert not await two.try_acquire("identity:alice", "b1", 1)
        renewed_until_ms = float(await redis.run_script(SCORE_SCRIPT, [key], ["a1"]))
        assert renewed_until_ms > taken_until_ms


async def test_with_redis_cut_each_process_admits_its_local_share_or_fails_closed(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with (
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
        _redis(proxy.port) as redis,
        RedisSlots(
            redis, key_prefix=redis_prefix, on_redis_error="local_share", replicas=2
        ) as shared,
        RedisSlots(redis, key_prefix=redis_prefix, on_redis_error="fail_closed") as closed,
    ):
        assert await shared.try_acquire("identity:alice", "a0", 4)  # through Redis
        proxy.cut()
        # 4 in all, 2 replicas: 2 here — the one taken before the cut counts
        assert await shared.try_acquire("identity:alice", "a1", 4)
        assert not await shared.try_acquire("identity:alice", "a2", 4)
        assert shared.degraded >= 1
        with pytest.raises(RateLimiterUnavailableError):
            await closed.try_acquire("identity:alice", "c1", 4)
