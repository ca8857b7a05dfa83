"""RedisTokenBucket against the real Redis on 127.0.0.1:6379, and through a fault proxy.

Each test uses its own key prefix (``exai-test:<owner>:<hex>:``, :mod:`tests.leftovers`) and
deletes its keys afterwards; the server is never flushed. Tests run on asyncio with
``redis.asyncio`` and on trio through a small trio-asyncio adapter (the shape of the daemon's
storage bridge). Real time: waits stay short.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from exai.errors import RateLimiterUnavailableError, RejectedError
from exai.resilience import CircuitBreaker, RedisTokenBucket, is_redis_unreachable
from exai.testing.faultproxy import FaultProxy
from tests.leftovers import delete_prefix, new_redis_prefix

pytestmark = pytest.mark.redis

HOST, PORT = "127.0.0.1", 6379
#: A bound on waits that end soon unless something hangs (never a figure under test).
HANG_GUARD_S = 30.0
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # Real clocks: a mock clock would jump over the time Redis takes to answer.
    return str(request.param)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own (:func:`tests.leftovers.new_redis_prefix`: a killed
    run's keys are deleted by the next run); its keys are deleted afterwards."""
    value = new_redis_prefix()
    try:
        yield value
    finally:
        delete_prefix(value)


class TrioRedis:
    """Runs redis-py's asyncio client from trio through trio-asyncio (tests only)."""

    def __init__(self, client: aredis.Redis) -> None:
        self.client = client

    async def _run(self, method: str, *args: Any) -> Any:
        import trio_asyncio

        return await trio_asyncio.aio_as_trio(getattr(self.client, method))(*args)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._run("evalsha", sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._run("eval", script, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> Any:
        return await self._run("script_load", script)

    async def get(self, key: str) -> Any:
        return await self._run("get", key)

    async def pttl(self, key: str) -> Any:
        return await self._run("pttl", key)


def new_client(host: str, port: int) -> aredis.Redis:
    # No retries inside redis-py (its default backoff spends seconds on a dead server): the
    # bucket's breaker is what turns an outage into fast answers.
    return aredis.Redis(
        host=host, port=port, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0)
    )


@contextlib.asynccontextmanager
async def redis_client(backend: str, host: str = HOST, port: int = PORT) -> AsyncIterator[Any]:
    """A client for the current backend: redis.asyncio, or it wrapped for trio."""
    if backend == "asyncio":
        client = new_client(host, port)
        try:
            yield client
        finally:
            await client.aclose()
        return
    import trio_asyncio

    async with trio_asyncio.open_loop():
        client = new_client(host, port)
        try:
            yield TrioRedis(client)
        finally:
            await trio_asyncio.aio_as_trio(client.aclose)()


def fast_breaker(name: str = "redis-test", open_duration_s: float = 0.2) -> CircuitBreaker:
    return CircuitBreaker(
        name,
        minimum_calls=2,
        window_size=4,
        slow_call_duration_s=1.0,
        open_duration_s=open_duration_s,
        max_open_duration_s=max(0.4, open_duration_s),
        record=is_redis_unreachable,
    )


# -- the contract on a live Redis ---------------------------------------------------------------


@pytest.mark.anyio
async def test_admits_the_capacity_then_reports_the_wait(anyio_backend: str, prefix: str) -> None:
    async with redis_client(anyio_backend) as client:
        bucket = RedisTokenBucket(client, "rpm", rate_per_s=10.0, capacity=5, key_prefix=prefix)
        assert [await bucket.try_acquire() for _ in range(5)] == [0.0] * 5
        wait = await bucket.try_acquire()
        assert 0.05 < wait <= 0.1
        assert await bucket.try_acquire(5) > 0.4


@pytest.mark.anyio
async def test_key_carries_a_cluster_hash_tag_and_expires_when_full(
    anyio_backend: str, prefix: str
) -> None:
    async with redis_client(anyio_backend) as client:
        bucket = RedisTokenBucket(client, "kimi:tpm", 1000.0, 2000, key_prefix=prefix)
        assert bucket.redis_key == f"{prefix}{{kimi:tpm}}"
        await bucket.acquire(1500)
        ttl_ms = await client.pttl(bucket.redis_key)
        assert 0 < ttl_ms <= 1502  # gone once the bucket would be full again


@pytest.mark.anyio
async def test_acquire_waits_for_the_shared_tokens(anyio_backend: str, prefix: str) -> None:
    async with redis_client(anyio_backend) as client:
        bucket = RedisTokenBucket(client, "rps", rate_per_s=20.0, capacity=1, key_prefix=prefix)
        await bucket.acquire()
        start = anyio.current_time()
        with anyio.fail_after(HANG_GUARD_S):
            await bucket.acquire()
        assert anyio.current_time() - start >= 0.04  # one token takes 50 ms to come back


@pytest.mark.anyio
async def test_refund_gives_reserved_tokens_back(anyio_backend: str, prefix: str) -> None:
    async with redis_client(anyio_backend) as client:
        bucket = RedisTokenBucket(client, "tpm", rate_per_s=1.0, capacity=100, key_prefix=prefix)
        await bucket.acquire(100)  # reserve an estimate
        assert await bucket.try_acquire(60) > 50
        await bucket.refund(70)  # the call used 30
        assert await bucket.try_acquire(60) == 0.0


@pytest.mark.anyio
async def test_charge_takes_tokens_that_are_not_there_and_later_requests_wait_out_the_debt(
    anyio_backend: str, prefix: str
) -> None:
    async with redis_client(anyio_backend) as client:
        bucket = RedisTokenBucket(client, "tpm", rate_per_s=100.0, capacity=100, key_prefix=prefix)
        assert await bucket.try_acquire(60) == 0.0
        await bucket.charge(90)  # 60 reserved, 150 used: 50 more than the bucket held
        wait = await bucket.try_acquire(10)
        assert 0.4 < wait <= 0.61  # the 50 of debt, then the 10 asked for, at 100/s
        await bucket.charge(10_000)  # one charge takes at most one capacity's worth
        assert 1.3 < await bucket.try_acquire(1) <= 1.52
        with pytest.raises(ValueError):
            await bucket.charge(-1)


@pytest.mark.anyio
async def test_a_cancelled_waiter_takes_nothing(anyio_backend: str, prefix: str) -> None:
    async with redis_client(anyio_backend) as client:
        bucket = RedisTokenBucket(client, "rps", rate_per_s=5.0, capacity=1, key_prefix=prefix)
        await bucket.acquire()
        with anyio.move_on_after(0.05) as scope:
            await bucket.acquire()  # needs 200 ms
        assert scope.cancelled_caught
        # Had the cancelled waiter taken a token, the next one would be ~400 ms away.
        assert await bucket.try_acquire() < 0.2


@pytest.mark.anyio
async def test_noscript_falls_back_to_eval(anyio_backend: str, prefix: str) -> None:
    async with redis_client(anyio_backend) as client:
        evals = 0

        class ForgetfulRedis:
            """A server that lost its script cache (restart or failover)."""

            async def evalsha(self, *args: Any) -> Any:
                raise redis.exceptions.NoScriptError("NOSCRIPT No matching script.")

            async def eval(self, *args: Any) -> Any:
                nonlocal evals
                evals += 1
                return await client.eval(*args)

            async def script_load(self, script: str) -> Any:
                return await client.script_load(script)

        bucket = RedisTokenBucket(ForgetfulRedis(), "rpm", 10.0, 2, key_prefix=prefix)
        assert await bucket.try_acquire(2) == 0.0
        assert await bucket.try_acquire() > 0.0
        assert evals == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_two_processes_sharing_a_key_admit_the_configured_rate(prefix: str) -> None:
    """Over 10 s at 200/s, two processes together admit within 2 % of rate × time (plus the
    full bucket they start with), time being Redis's clock.

    The bucket holds a second of tokens: tokens are lost only while it is full and nobody
    takes, so on a busy machine both processes would have to be off the CPU for a whole second
    together to lose any (with 4 tokens, 20 ms did: the figure then measured the machine's
    load, not the limiter). Both children start and stop on Redis's clock."""
    rate, duration = 200.0, 10.0
    capacity = rate * 1.0
    sync = redis.Redis(host=HOST, port=PORT)
    try:
        sec, usec = sync.time()
    finally:
        sync.close()
    start_us = sec * 1_000_000 + usec + 3_000_000  # both children start together, 3 s from now
    argv = [
        sys.executable,
        str(HERE / "redis_hammer.py"),
        prefix,
        "shared",
        str(rate),
        str(capacity),
        str(duration),
        str(start_us),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outputs: list[bytes] = []

    async def child() -> None:
        result = await anyio.run_process(argv, cwd=REPO, env=env, check=True)
        outputs.append(result.stdout)

    with anyio.fail_after(duration + 20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            tg.start_soon(child)
    results = [json.loads(out) for out in outputs]
    counts = [r["admitted"] for r in results]
    expected = capacity + rate * duration  # the full bucket at the start, then the refill
    tolerance = 0.02 * rate * duration
    assert sum(counts) >= expected - tolerance, counts
    # At most what the refill gives over the window on Redis's clock (the one the script
    # reads): a child descheduled past its deadline, or a step of the host's wall clock, may
    # lengthen that window — it does not make the limiter wrong (seen once at load 8: 2,345).
    window_s = (max(r["end_us"] for r in results) - start_us) / 1e6
    assert window_s >= duration, window_s
    assert sum(counts) <= capacity + rate * window_s + tolerance, (counts, window_s)
    assert all(count > 0.25 * expected for count in counts), counts  # both took part


# -- Redis cut (fault proxy) --------------------------------------------------------------------


@pytest.mark.anyio
async def test_fail_closed_rejects_with_a_clear_error_when_redis_is_cut(
    anyio_backend: str, prefix: str
) -> None:
    with anyio.fail_after(10):
        async with (
            FaultProxy(HOST, PORT) as proxy,
            redis_client(anyio_backend, proxy.host, proxy.port) as client,
        ):
            bucket = RedisTokenBucket(
                client, "rpm", 100.0, 10, key_prefix=prefix, breaker=fast_breaker()
            )
            assert await bucket.try_acquire() == 0.0
            proxy.cut()
            for _ in range(5):
                with pytest.raises(RateLimiterUnavailableError) as info:
                    await bucket.try_acquire()
                with pytest.raises(RateLimiterUnavailableError):
                    await bucket.acquire()
            error = info.value
            assert isinstance(error, RejectedError) and error.retryable
            assert error.to_error_data()["reason"] == "rate_limiter_unavailable"
            assert "Redis cannot be reached" in str(error)
            assert bucket.breaker.state == "open"  # later calls fail fast, without Redis


@pytest.mark.anyio
async def test_local_share_admits_at_most_rate_over_replicas_while_redis_is_cut(
    anyio_backend: str, prefix: str
) -> None:
    rate, capacity, replicas = 100.0, 8.0, 4
    with anyio.fail_after(10):
        async with (
            FaultProxy(HOST, PORT) as proxy,
            redis_client(anyio_backend, proxy.host, proxy.port) as client,
        ):
            bucket = RedisTokenBucket(
                client,
                "rpm",
                rate,
                capacity,
                key_prefix=prefix,
                on_redis_error="local_share",
                replicas=replicas,
                breaker=fast_breaker(),
            )
            proxy.cut()
            admitted = 0
            start = anyio.current_time()
            # A count, not a window of time: on a busy machine a window can pass with the
            # process off the CPU. Admitting them at all is the share working (not fail-closed).
            while admitted < 12:
                await bucket.acquire()
                admitted += 1
            elapsed = anyio.current_time() - start
    # One replica's share: a burst of 8 / 4 = 2, then 100 / 4 = 25 a second; the full rate
    # would admit 12 within 0.04 s, the share needs 0.4 s at least, however busy the machine.
    assert admitted <= capacity / replicas + rate / replicas * elapsed + 1


@pytest.mark.anyio
async def test_a_black_holed_redis_counts_as_unreachable_within_the_call_bound(
    anyio_backend: str, prefix: str
) -> None:
    with anyio.fail_after(10):
        async with (
            FaultProxy(HOST, PORT) as proxy,
            redis_client(anyio_backend, proxy.host, proxy.port) as client,
        ):
            bucket = RedisTokenBucket(
                client,
                "rpm",
                100.0,
                10,
                key_prefix=prefix,
                # open long enough that a busy machine cannot see it half-open again here
                breaker=fast_breaker(open_duration_s=60.0),
                redis_call_bound_s=0.2,
            )
            proxy.cut(mode="blackhole")
            for _ in range(3):
                with pytest.raises(RateLimiterUnavailableError):
                    await bucket.try_acquire()
            assert bucket.breaker.state == "open"
            before = bucket.breaker.statistics()
            with pytest.raises(RateLimiterUnavailableError):
                await bucket.try_acquire()
            after = bucket.breaker.statistics()
            # the open breaker answers at once: refused without a call to the black hole
            assert after.rejections == before.rejections + 1
            assert after.calls == before.calls


@pytest.mark.anyio
async def test_shared_limit_resumes_when_redis_comes_back(anyio_backend: str, prefix: str) -> None:
    with anyio.fail_after(10):
        async with (
            FaultProxy(HOST, PORT) as proxy,
            redis_client(anyio_backend, proxy.host, proxy.port) as client,
        ):
            bucket = RedisTokenBucket(
                client, "rpm", 100.0, 10, key_prefix=prefix, breaker=fast_breaker()
            )
            proxy.cut()
            for _ in range(3):
                with pytest.raises(RateLimiterUnavailableError):
                    await bucket.try_acquire()
            proxy.restore()
            while True:
                try:
                    assert await bucket.try_acquire() == 0.0
                    break
                except RateLimiterUnavailableError:
                    await anyio.sleep(0.05)  # the breaker lets a probe through soon
            assert bucket.breaker.state == "closed"


# -- error mapping without a server -------------------------------------------------------------


class BrokenRedis:
    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    async def evalsha(self, *args: Any) -> Any:
        self.calls += 1
        raise self.error

    async def eval(self, *args: Any) -> Any:
        raise self.error

    async def script_load(self, script: str) -> Any:
        raise self.error


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379."),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
    ],
    ids=["refused", "timeout", "redis-connection", "redis-timeout"],
)
async def test_connection_errors_of_any_kind_mean_unreachable(
    anyio_backend: str, error: Exception
) -> None:
    bucket = RedisTokenBucket(BrokenRedis(error), "rpm", 10.0, 5)
    with pytest.raises(RateLimiterUnavailableError) as info:
        await bucket.try_acquire()
    assert info.value.__cause__ is not None


@pytest.mark.anyio
async def test_a_script_error_is_a_bug_not_an_outage(anyio_backend: str) -> None:
    broken = BrokenRedis(redis.exceptions.ResponseError("ERR Error running script"))
    bucket = RedisTokenBucket(broken, "rpm", 10.0, 5, breaker=fast_breaker())
    for _ in range(5):
        with pytest.raises(redis.exceptions.ResponseError):
            await bucket.try_acquire()
    assert bucket.breaker.state == "closed"
    assert broken.calls == 5


def test_local_share_requires_the_number_of_replicas() -> None:
    with pytest.raises(ValueError, match="replicas"):
        RedisTokenBucket(BrokenRedis(OSError()), "rpm", 10.0, 5, on_redis_error="local_share")


def test_default_breaker_is_named_after_the_key() -> None:
    bucket = RedisTokenBucket(BrokenRedis(OSError()), "provider:kimi:rpm", 10.0, 5)
    assert bucket.breaker.name == "redis-bucket:provider:kimi:rpm"
