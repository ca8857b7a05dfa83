"""SharedCalls: one daemon runs a keyed call; a retry on another daemon joins it (real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from exai.server.shared_calls import Claim, SharedCalls
from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge
from exai.testing import FaultProxy
from tests.storage.conftest import REDIS_HOST, REDIS_PORT, redis_prefix  # noqa: F401

pytestmark = pytest.mark.anyio

WITHIN_S = 15.0
RESULT = {"result": {"content": [{"type": "text", "text": "the one answer"}], "isError": False}}


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


def _calls(redis: BridgedRedis, prefix: str, name: str, **kw: float) -> SharedCalls:
    return SharedCalls(redis, key_prefix=prefix, instance_id=name, result_ttl_s=60, **kw)


async def test_a_retry_on_another_daemon_waits_for_the_owners_result_instead_of_running(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with (
        _redis() as redis,
        _calls(redis, redis_prefix, "daemon-a") as a,
        _calls(redis, redis_prefix, "daemon-b") as b,
    ):
        assert await a.claim("alice:k1", 30) == Claim("owner")
        first = await b.claim("alice:k1", 30)
        assert first == Claim("running", owner_id="daemon-a")
        got: list[Claim] = []
        async with trio.open_nursery() as nursery:

            async def joiner() -> None:
                with trio.fail_after(WITHIN_S):
                    got.append(await b.join("alice:k1", 30, first))

            nursery.start_soon(joiner)
            await trio.sleep(0.3)
            assert got == []  # still waiting: the owner has not finished
            await a.finish("alice:k1", RESULT)
        assert got == [Claim("result", RESULT)]
        # and anyone asking later gets it at once
        assert await a.claim("alice:k1", 30) == Claim("result", RESULT)


async def test_a_call_whose_owner_died_is_taken_over_once_its_liveness_lapses(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with _redis() as redis, _calls(redis, redis_prefix, "daemon-b") as b:
        async with _calls(redis, redis_prefix, "daemon-a", alive_ttl_s=0.6) as a:
            assert await a.claim("alice:k2", 300) == Claim("owner")
        # daemon-a is gone (its liveness key is no longer renewed); its run key would last 300 s
        first = await b.claim("alice:k2", 30)
        assert first.kind == "running"
        with trio.fail_after(WITHIN_S):
            assert await b.join("alice:k2", 30, first) == Claim("owner")
        assert b.taken_over == 1


async def test_a_cancelled_call_leaves_no_result_and_the_joiner_runs_it(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with (
        _redis() as redis,
        _calls(redis, redis_prefix, "daemon-a") as a,
        _calls(redis, redis_prefix, "daemon-b") as b,
    ):
        assert await a.claim("alice:k3", 30) == Claim("owner")
        first = await b.claim("alice:k3", 30)
        await a.finish("alice:k3", None)
        with trio.fail_after(WITHIN_S):
            assert await b.join("alice:k3", 30, first) == Claim("owner")


async def test_with_redis_cut_a_claim_says_unavailable_at_once(
    redis_prefix: str,  # noqa: F811
) -> None:
    proxy = FaultProxy(REDIS_HOST, REDIS_PORT)
    async with proxy, _redis(proxy.port) as redis, _calls(redis, redis_prefix, "daemon-a") as a:
        proxy.cut(mode="blackhole")
        with trio.fail_after(WITHIN_S):
            for i in range(10):
                assert await a.claim(f"alice:k4-{i}", 30) == Claim("unavailable")
        # a few claims waited for the bound; then the breaker answered at once
        assert a.errors >= 3 and a.rejected >= 1
        assert a.errors + a.rejected >= 10


async def test_a_result_redis_did_not_take_is_shared_once_it_is_back(
    redis_prefix: str,  # noqa: F811
) -> None:
    """The owner's finish failed (Redis away for a moment): the result is sent again in the
    background once Redis answers, so a daemon that joined the call gets it — it waited for
    the run key's whole TTL (the call's deadline), the owner alive and the result never there."""
    proxy = FaultProxy(REDIS_HOST, REDIS_PORT)
    async with (
        proxy,
        _redis(proxy.port) as through_proxy,
        _redis() as direct,
        _calls(through_proxy, redis_prefix, "daemon-a", alive_ttl_s=6) as a,
        _calls(direct, redis_prefix, "daemon-b") as b,
    ):
        assert await a.claim("alice:k5", 300) == Claim("owner")
        first = await b.claim("alice:k5", 300)
        assert first == Claim("running", owner_id="daemon-a")
        got: list[Claim] = []
        async with trio.open_nursery() as nursery:

            async def joiner() -> None:
                with trio.fail_after(WITHIN_S):  # (hang guard: the old code waited 300 s)
                    got.append(await b.join("alice:k5", 300, first))

            nursery.start_soon(joiner)
            proxy.cut(mode="refuse")
            await a.finish("alice:k5", RESULT)  # Redis is away: not taken
            assert a.errors >= 1
            proxy.restore()
        assert got == [Claim("result", RESULT)]
