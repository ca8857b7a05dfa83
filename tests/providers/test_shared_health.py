"""Provider health shared across daemons through Redis (issue 16: "open until" per provider).

Two (or three) routers stand for daemons: each has its own providers, breakers and
:class:`~exai.providers.health.SharedHealth`, and they share one Redis key prefix. The upstream
is a real :class:`~exai.testing.MockUpstream`, so "the others do not pay for the failures" is
counted as requests the upstream received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from exai.config import Settings
from exai.errors import (
    CircuitOpenError,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.providers import ChatRequest, ProviderRouter
from exai.providers.health import SharedHealth
from exai.storage.aio_bridge import BridgedRedis, open_asyncio_bridge
from exai.testing import Fault, FaultProxy, MockUpstream
from tests.providers.conftest import provider_settings, settings_with
from tests.storage.conftest import REDIS_HOST, REDIS_PORT, redis_prefix  # noqa: F401

pytestmark = pytest.mark.anyio

#: generous: only turns a hang into a failure
WITHIN_S = 15.0
POLL_S = 0.05


def _settings(mock: MockUpstream, prefix: str, **kw: Any) -> Settings:
    kw.setdefault("breaker_open_s", 20.0)
    kw.setdefault("breaker_max_open_s", 40.0)
    return attrs.evolve(
        settings_with(
            provider_settings("a", mock.base_url, None, ("mock-a",), **kw),
            fast=("mock-a",),
            quality=("mock-a",),
        ),
        redis_key_prefix=prefix,
    )


def _ask() -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hi"}], model="mock-a")


@asynccontextmanager
async def _daemons(
    settings: Settings, n: int, redis_url: str
) -> AsyncIterator[tuple[list[ProviderRouter], list[SharedHealth]]]:
    """``n`` routers, each with its own SharedHealth on its own Redis client."""
    async with AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(open_asyncio_bridge())
        routers, healths = [], []
        for _ in range(n):
            redis = BridgedRedis.from_url(
                bridge, redis_url, max_connections=4, socket_timeout_s=1.0
            )
            stack.push_async_callback(redis.aclose)
            router = await stack.enter_async_context(ProviderRouter(settings, attempts=1))
            health = await stack.enter_async_context(
                SharedHealth(
                    redis,
                    router.providers.values(),
                    key_prefix=settings.redis_key_prefix,
                    poll_interval_s=POLL_S,
                )
            )
            router.shared_health = health
            routers.append(router)
            healths.append(health)
        yield routers, healths


async def _until(predicate: Any) -> None:
    with trio.fail_after(WITHIN_S):
        while not predicate():
            await trio.sleep(POLL_S / 2)


async def _trip(router: ProviderRouter) -> int:
    """Call until the provider's breaker opens; the number of requests it sent."""
    sent = 0
    for _ in range(20):
        try:
            await router.complete(_ask())
        except UpstreamRetryableError:
            sent += 1
        except CircuitOpenError:
            return sent
    raise AssertionError("the breaker never opened")


async def test_a_breaker_opened_on_one_daemon_closes_the_provider_on_the_other_without_a_request(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with MockUpstream(models=("mock-a",)) as mock:
        mock.set_fault(Fault.status(503))
        settings = _settings(mock, redis_prefix)
        async with _daemons(settings, 2, f"redis://{REDIS_HOST}:{REDIS_PORT}/0") as (
            (one, two),
            (_, health_two),
        ):
            sent_by_one = await _trip(one)
            assert sent_by_one == 3  # breaker_minimum_calls of the test settings
            await _until(lambda: two.providers["a"].breaker.state == "open")
            for _ in range(5):
                with pytest.raises(CircuitOpenError) as refused:
                    await two.complete(_ask())
                assert refused.value.retry_after_s is not None
                assert 5.0 < refused.value.retry_after_s <= 20.0
            # the second daemon paid nothing: every request the upstream saw was the first's
            assert len(mock.chat_requests) == sent_by_one
            assert health_two.learned >= 1
            assert two.status()["shared_health"]["learned"] >= 1


@pytest.mark.parametrize(
    ("fault", "refusal"),
    [
        (Fault.rate_limited(retry_after_s=30), UpstreamRateLimited),
        (Fault.quota_exhausted(), UpstreamQuotaExhausted),
    ],
    ids=["retry_after", "quota"],
)
async def test_a_hold_seen_by_one_daemon_holds_the_provider_on_the_other(
    redis_prefix: str,  # noqa: F811
    fault: Fault,
    refusal: type[Exception],
) -> None:
    async with MockUpstream(models=("mock-a",)) as mock:
        mock.push(fault)
        settings = _settings(mock, redis_prefix, quota_hold_s=60.0)
        async with _daemons(settings, 2, f"redis://{REDIS_HOST}:{REDIS_PORT}/0") as (
            (one, two),
            _,
        ):
            with pytest.raises(refusal):
                await one.complete(_ask())
            assert len(mock.chat_requests) == 1
            await _until(lambda: two.providers["a"].status()["use"]["retry_after_s"] > 0)
            with pytest.raises(refusal) as refused:
                await two.complete(_ask())
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 20
            assert len(mock.chat_requests) == 1  # the upstream answered (and billed) once


async def test_with_redis_cut_each_daemon_falls_back_to_its_own_breaker_and_learning_resumes(
    redis_prefix: str,  # noqa: F811
) -> None:
    async with (
        MockUpstream(models=("mock-a",)) as mock,
        FaultProxy(REDIS_HOST, REDIS_PORT) as proxy,
    ):
        mock.set_fault(Fault.status(503))
        settings = _settings(mock, redis_prefix)
        url = f"redis://{proxy.host}:{proxy.port}/0"
        async with _daemons(settings, 2, url) as ((one, two), (health_one, health_two)):
            await _until(lambda: health_one.polls > 0 and health_two.polls > 0)
            proxy.cut(mode="blackhole")
            sent_by_one = await _trip(one)
            # the second daemon knows nothing: it pays for its own failures, and its own breaker
            # decides (no call waits on Redis, none fails because of it)
            sent_by_two = await _trip(two)
            assert (sent_by_one, sent_by_two) == (3, 3)
            assert len(mock.chat_requests) == 6
            await _until(lambda: health_one.errors > 0)
            assert health_one.status()["redis_ok"] is False
            proxy.restore()
            # what the first daemon could not publish during the outage goes out now
            await _until(lambda: health_one.published >= 1)
        async with _daemons(settings, 1, url) as ((three,), _):
            await _until(lambda: three.providers["a"].breaker.state == "open")
            with pytest.raises(CircuitOpenError):
                await three.complete(_ask())
        assert len(mock.chat_requests) == 6


class _HungRedis:
    """A Redis that never answers; records which task asked."""

    def __init__(self) -> None:
        self.callers: list[trio.lowlevel.Task] = []

    async def run_script(self, script: str, keys: Any, args: Any) -> Any:
        self.callers.append(trio.lowlevel.current_task())
        await trio.sleep_forever()


async def test_a_call_never_waits_on_redis_to_decide() -> None:
    async with MockUpstream(models=("mock-a",)) as mock:
        mock.set_fault(Fault.status(503))
        settings = _settings(mock, "unused:")
        hung = _HungRedis()
        async with (
            ProviderRouter(settings, attempts=1) as router,
            SharedHealth(hung, router.providers.values(), poll_interval_s=POLL_S) as health,
        ):
            await _until(lambda: len(hung.callers) > 0)
            with trio.fail_after(WITHIN_S):
                sent = await _trip(router)  # trips, offers the hold to a Redis that hangs
                for _ in range(3):
                    with pytest.raises(CircuitOpenError):
                        await router.complete(_ask())
            assert sent == 3
            await _until(lambda: health.errors >= 2)
        me = trio.lowlevel.current_task()
        assert me not in hung.callers  # only the background task ever talked to Redis
        assert len(mock.chat_requests) == 3
