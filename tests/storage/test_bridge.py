"""The trio-asyncio bridge: asyncpg and redis-py from trio, with trio cancellation."""

from __future__ import annotations

import uuid

import anyio
import asyncpg
import pytest
import trio

from exai.errors import StoreUnavailableError
from exai.storage.aio_bridge import BridgedPgPool, BridgedRedis, open_asyncio_bridge
from tests.storage.conftest import PG_HOST, PG_PORT

pytestmark = pytest.mark.anyio

#: A bound on waits that end at once unless something hangs.
HANG_GUARD_S = 30


def _dsn(database: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{database}"


async def test_a_cancel_scope_cancels_an_in_flight_query_and_the_pool_stays_usable(
    pg_database: str, stall_detector: object
) -> None:
    marker = f"exai-cancel-{uuid.uuid4().hex[:8]}"
    lock_key = uuid.uuid4().int % (1 << 62)
    async with open_asyncio_bridge() as bridge:
        # The query waits for an advisory lock the test holds on another connection: it
        # cannot finish until the test lets go (only if the cancel hangs), so a caller that
        # gets control back while the lock is held was not made to wait for the query,
        # whatever the machine's load (no wall-clock figure is asserted).
        # (a connection of its own: a pool's release would unlock it)
        holder = await bridge.run(asyncpg.connect, _dsn(pg_database))
        pool = await BridgedPgPool.create(bridge, _dsn(pg_database), min_size=1, max_size=2)
        try:
            await bridge.run(holder.execute, "SELECT pg_advisory_lock($1)", lock_key)
            unlocked = False
            async with trio.open_nursery() as nursery:

                async def unlock_if_hung() -> None:
                    nonlocal unlocked
                    await trio.sleep(HANG_GUARD_S)
                    unlocked = True
                    await bridge.run(holder.execute, "SELECT pg_advisory_unlock_all()")

                nursery.start_soon(unlock_if_hung)
                with trio.move_on_after(0.2) as scope:
                    await pool.run(
                        lambda c: c.fetch(f"SELECT pg_advisory_lock($1) /* {marker} */", lock_key)
                    )
                assert not unlocked, "the cancel waited for the query to end"
                nursery.cancel_scope.cancel()
            assert scope.cancelled_caught
            assert await pool.run(lambda c: c.fetchval("SELECT 41 + 1")) == 42
            # the server stops the query too (the disconnect check notices within a second)
            with trio.fail_after(HANG_GUARD_S):
                while await pool.run(
                    lambda c: c.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 "
                        "AND pid <> pg_backend_pid()",
                        f"%{marker}%",
                    )
                ):
                    await trio.sleep(0.1)
            assert pool.status()["in_use"] == 0
        finally:
            await pool.close()
            await bridge.run(holder.close)


async def test_a_task_from_a_nursery_opened_before_the_bridge_can_use_it(
    pg_database: str,
) -> None:
    results: list[int] = []
    async with trio.open_nursery() as outer, open_asyncio_bridge() as bridge:
        pool = await BridgedPgPool.create(bridge, _dsn(pg_database), min_size=1, max_size=1)
        done = trio.Event()

        async def query() -> None:
            results.append(await pool.run(lambda c: c.fetchval("SELECT 7")))
            done.set()

        outer.start_soon(query)
        with trio.fail_after(5):
            await done.wait()
        await pool.close()
    assert results == [7]


async def test_an_unreachable_postgres_is_store_unavailable() -> None:
    port = _free_port()
    async with open_asyncio_bridge() as bridge:
        with pytest.raises(StoreUnavailableError):
            await BridgedPgPool.create(
                bridge, f"postgresql://postgres@127.0.0.1:{port}/x", min_size=1, max_size=1
            )


async def test_redis_commands_run_through_the_bridge(redis_prefix: str) -> None:
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(bridge, "redis://127.0.0.1:6379/0", max_connections=2)
        try:
            key = redis_prefix + "k"
            assert await redis.ping()
            assert await redis.set(key, b"v", ex_s=5)
            assert not await redis.set(key, b"w", nx=True)
            assert await redis.get(key) == b"v"
            assert await redis.mget(key, key + "-missing") == [b"v", None]
            assert await redis.run_script("return ARGV[1]", [key], ["x"]) == b"x"
            seconds, _micros = await redis.time()
            assert seconds > 1_600_000_000
            assert await redis.delete(key) == 1
            assert redis.status()["max"] == 2
        finally:
            await redis.aclose()


async def test_an_unreachable_redis_is_store_unavailable() -> None:
    port = _free_port()
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(bridge, f"redis://127.0.0.1:{port}/0", max_connections=2)
        try:
            with pytest.raises(StoreUnavailableError):
                await redis.get("x")
        finally:
            await redis.aclose()


async def test_a_cancelled_redis_call_leaves_the_pool_usable(redis_prefix: str) -> None:
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(bridge, "redis://127.0.0.1:6379/0", max_connections=1)
        try:
            with anyio.move_on_after(0.1) as scope:
                # BLPOP on an empty list blocks server-side for 5 s
                await redis._call(redis._client.blpop, [redis_prefix + "empty"], 5)
            assert scope.cancelled_caught
            assert await redis.ping()
        finally:
            await redis.aclose()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_shared_limit_works_on_a_fresh_redis_whose_script_cache_is_empty(
    private_redis: str,
) -> None:
    # A fresh server knows no script: EVALSHA answers NOSCRIPT, which the daemon's adapter
    # maps to ScriptNotLoadedError, and the bucket must fall back to EVAL (by type, not text).
    from exai.errors import ScriptNotLoadedError
    from exai.resilience import RedisTokenBucket
    from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge

    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(bridge, private_redis, max_connections=2)
        try:
            with pytest.raises(ScriptNotLoadedError):
                await redis.evalsha("0" * 40, 0)
            bucket = RedisTokenBucket(redis, "fresh", rate_per_s=1.0, capacity=2.0)
            assert await bucket.try_acquire(1) == 0.0
            assert await bucket.try_acquire(1) == 0.0
            assert await bucket.try_acquire(1) > 0.0
        finally:
            await redis.aclose()
