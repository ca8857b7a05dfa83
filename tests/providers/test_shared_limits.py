"""Provider request limits shared by several daemons through Redis."""

from __future__ import annotations

import attrs
import pytest

from exai.errors import RateLimitedError
from exai.providers import ProviderRouter
from exai.providers.types import ChatRequest
from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge
from exai.testing import MockUpstream
from tests.providers.conftest import provider_settings, settings_with
from tests.storage.conftest import redis_prefix, redis_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio


async def test_two_routers_sharing_redis_admit_the_configured_rpm_in_total(redis_prefix):  # noqa: F811
    async with MockUpstream(models=("mock-a",)) as mock, open_asyncio_bridge() as bridge:
        settings = attrs.evolve(
            settings_with(
                provider_settings("a", mock.base_url, None, ("mock-a",), rpm=12.0),
                fast=("mock-a",),
                quality=("mock-a",),
            ),
            redis_key_prefix=redis_prefix,
        )
        redis = BridgedRedis.from_url(bridge, redis_url().reveal(), max_connections=4)
        admitted = refused = 0
        try:
            async with (
                ProviderRouter(settings, attempts=1) as r1,
                ProviderRouter(settings, attempts=1) as r2,
            ):
                r1.share_limits(redis)
                r2.share_limits(redis)
                for _ in range(10):
                    for router in (r1, r2):
                        try:
                            await router.complete(
                                ChatRequest(
                                    messages=[{"role": "user", "content": "hi"}], model="mock-a"
                                )
                            )
                            admitted += 1
                        except RateLimitedError as exc:
                            assert exc.extra.get("shared") is True
                            refused += 1
        finally:
            await redis.aclose()
        # capacity 12 (one minute's worth) shared by both routers; refill is 0.2/s
        assert 12 <= admitted <= 13
        assert admitted + refused == 20
        assert len(mock.chat_requests) == admitted


async def test_a_call_refused_by_an_open_breaker_gives_its_shared_token_back(redis_prefix):  # noqa: F811
    from exai.errors import CircuitOpenError

    async with MockUpstream(models=("mock-a",)) as mock, open_asyncio_bridge() as bridge:
        settings = attrs.evolve(
            settings_with(
                provider_settings("a", mock.base_url, None, ("mock-a",), rpm=12.0),
                fast=("mock-a",),
                quality=("mock-a",),
            ),
            redis_key_prefix=redis_prefix,
        )
        redis = BridgedRedis.from_url(bridge, redis_url().reveal(), max_connections=4)
        req = ChatRequest(messages=[{"role": "user", "content": "hi"}], model="mock-a")
        try:
            async with (
                ProviderRouter(settings, attempts=1) as r1,
                ProviderRouter(settings, attempts=1) as r2,
            ):
                r1.share_limits(redis)
                r2.share_limits(redis)
                r1.providers["a"].breaker.open_until(30)
                for _ in range(5):
                    with pytest.raises(CircuitOpenError):
                        await r1.complete(req)
                for _ in range(12):  # the whole minute's worth is still there for r2
                    await r2.complete(req)
        finally:
            await redis.aclose()
        assert len(mock.chat_requests) == 12
