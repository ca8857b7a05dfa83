"""A provider's tokens-per-minute limit shared by several daemons: reserve, then settle.

Two routers stand for two daemons sharing one Redis key prefix. Their upstreams are
``httpx.MockTransport`` handlers reporting a fixed usage, so the arithmetic of the shared bucket
is exact: every request reserves the estimate (prompt characters / 3 + 8 + ``max_output_tokens``)
and is settled with the usage the provider reported.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from exai.errors import RateLimitedError, RateLimiterUnavailableError
from exai.providers import ChatRequest, ProviderRouter
from exai.providers.provider import estimate_tokens
from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge
from exai.testing import FaultProxy
from tests.providers.conftest import ScriptedUpstream, provider_settings, settings_with
from tests.storage.conftest import REDIS_HOST, REDIS_PORT, redis_prefix  # noqa: F401

pytestmark = pytest.mark.anyio

MESSAGES = ({"role": "user", "content": "hi"},)
MAX_OUT = 500
ESTIMATE = estimate_tokens(list(MESSAGES), MAX_OUT)


def _ask() -> ChatRequest:
    return ChatRequest(messages=MESSAGES, model="mock-a", max_output_tokens=MAX_OUT)


def _settings(prefix: str, tpm: float, **kw: Any) -> Any:
    return attrs.evolve(
        settings_with(
            provider_settings("a", "http://a.test/v1", None, ("mock-a",), tpm=tpm),
            fast=("mock-a",),
            quality=("mock-a",),
        ),
        redis_key_prefix=prefix,
        **kw,
    )


async def _admitted(routers: list[ProviderRouter], rounds: int) -> tuple[int, int]:
    """Alternate calls between the routers: (admitted, refused at the TPM limit)."""
    admitted = refused = 0
    for _ in range(rounds):
        for router in routers:
            try:
                await router.complete(_ask())
                admitted += 1
            except RateLimitedError as exc:
                assert exc.extra.get("limit") == "tpm"
                refused += 1
    return admitted, refused


async def test_two_daemons_share_one_tpm_limit_and_settle_each_call_to_its_real_usage(
    redis_prefix: str,  # noqa: F811
) -> None:
    # usage 200 per call against an estimate of ~520: settling refunds the difference
    upstream = ScriptedUpstream("a", usage=(100, 100))
    settings = _settings(redis_prefix, tpm=2000)
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(
            bridge, f"redis://{REDIS_HOST}:{REDIS_PORT}/0", max_connections=4
        )
        try:
            async with (
                ProviderRouter(settings, attempts=1, transports={"a": upstream.transport}) as r1,
                ProviderRouter(settings, attempts=1, transports={"a": upstream.transport}) as r2,
            ):
                r1.share_limits(redis)
                r2.share_limits(redis)
                admitted, refused = await _admitted([r1, r2], 10)
                st = r1.providers["a"].status()
        finally:
            await redis.aclose()
    # 2000 tokens a minute in all: k calls fit while 2000 - 200·k ≥ the next estimate.
    # Per daemon (2 × the limit) it would be 16; reserving without settling, 3.
    fits = int((2000 - ESTIMATE) // 200) + 1
    assert fits == 8
    assert admitted in (fits, fits + 1)  # + what refills meanwhile (33 tokens/s)
    assert admitted + refused == 20
    assert len(upstream.requests) == admitted
    assert st["use"]["shared_limits"] == ["tpm"]


async def test_an_overrun_on_one_daemon_is_waited_out_by_the_other(
    redis_prefix: str,  # noqa: F811
) -> None:
    # the provider reports 2500 tokens for a call reserved at ~520: the difference is charged
    upstream = ScriptedUpstream("a", usage=(1500, 1000))
    settings = _settings(redis_prefix, tpm=3000)
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(
            bridge, f"redis://{REDIS_HOST}:{REDIS_PORT}/0", max_connections=4
        )
        try:
            async with (
                ProviderRouter(settings, attempts=1, transports={"a": upstream.transport}) as r1,
                ProviderRouter(settings, attempts=1, transports={"a": upstream.transport}) as r2,
            ):
                r1.share_limits(redis)
                r2.share_limits(redis)
                await r1.complete(_ask())
                with pytest.raises(RateLimitedError) as refused:
                    await r2.complete(_ask())
        finally:
            await redis.aclose()
    # 3000 − 2500 left (plus a few tokens of refill): less than the next estimate
    assert refused.value.extra["limit"] == "tpm" and refused.value.extra["shared"] is True
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
    assert len(upstream.requests) == 1


async def test_with_redis_cut_each_daemon_admits_only_its_local_share_of_the_tpm(
    redis_prefix: str,  # noqa: F811
) -> None:
    upstream = ScriptedUpstream("a", usage=(100, 100))
    settings = _settings(
        redis_prefix, tpm=2000, rate_limit_replicas=2, rate_limit_on_redis_error="local_share"
    )
    async with (
        open_asyncio_bridge() as bridge,
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
    ):
        redis = BridgedRedis.from_url(
            bridge, f"redis://{proxy.host}:{proxy.port}/0", max_connections=4
        )
        try:
            async with (
                ProviderRouter(settings, attempts=1, transports={"a": upstream.transport}) as r1,
                ProviderRouter(settings, attempts=1, transports={"a": upstream.transport}) as r2,
            ):
                r1.share_limits(redis)
                r2.share_limits(redis)
                proxy.cut()
                admitted, refused = await _admitted([r1, r2], 10)
        finally:
            await redis.aclose()
    # each daemon alone has 2000 / 2 = 1000: calls fit while 1000 - 200·k ≥ the estimate
    per_daemon = int((1000 - ESTIMATE) // 200) + 1
    assert per_daemon == 3
    assert admitted in (2 * per_daemon, 2 * per_daemon + 1)
    assert admitted <= int((2000 - ESTIMATE) // 200) + 1  # never more than the shared limit
    assert admitted + refused == 20


async def test_with_redis_cut_and_fail_closed_nothing_is_admitted(
    redis_prefix: str,  # noqa: F811
) -> None:
    upstream = ScriptedUpstream("a", usage=(100, 100))
    settings = _settings(redis_prefix, tpm=2000, rate_limit_on_redis_error="fail_closed")
    async with (
        open_asyncio_bridge() as bridge,
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
    ):
        redis = BridgedRedis.from_url(
            bridge, f"redis://{proxy.host}:{proxy.port}/0", max_connections=4
        )
        try:
            async with ProviderRouter(
                settings, attempts=1, transports={"a": upstream.transport}
            ) as r1:
                r1.share_limits(redis)
                proxy.cut()
                for _ in range(5):
                    with pytest.raises(RateLimiterUnavailableError):
                        await r1.complete(_ask())
        finally:
            await redis.aclose()
    assert upstream.requests == []


async def test_a_call_costs_one_redis_round_trip_for_both_limits_and_its_refund_rides_along(
    redis_prefix: str,  # noqa: F811
) -> None:
    upstream = ScriptedUpstream("a", usage=(100, 100))
    settings = attrs.evolve(
        settings_with(
            provider_settings("a", "http://a.test/v1", None, ("mock-a",), rpm=600, tpm=100_000),
            fast=("mock-a",),
            quality=("mock-a",),
        ),
        redis_key_prefix=redis_prefix,
    )
    async with open_asyncio_bridge() as bridge:
        redis = BridgedRedis.from_url(
            bridge, f"redis://{REDIS_HOST}:{REDIS_PORT}/0", max_connections=4
        )
        try:
            async with ProviderRouter(
                settings, attempts=1, transports={"a": upstream.transport}
            ) as router:
                router.share_limits(redis)
                for _ in range(10):
                    await router.complete(_ask())
                group = router.providers["a"].shared_group
                pending = list(group.credits) if group else None
        finally:
            await redis.aclose()
    assert redis.calls == 10  # RPM and TPM reserved together; refunds sent with the next one
    # only the last call's unused estimate still waits in this process
    assert pending == [0.0, float(ESTIMATE - 200)]
