"""A token bucket shared by every process that uses the same Redis key.

One atomic Lua script implements GCRA (the generic cell rate algorithm of redis-cell and
Stripe's limiters): the key holds one number, the *theoretical arrival time* (TAT) in
microseconds on Redis's own clock (``TIME``), so the callers' clocks never matter. With
``T = 1/rate`` per token and ``τ = capacity × T``, a request of cost ``c`` is admitted when
``max(TAT, now) + c·T − τ ≤ now``; otherwise the script answers the exact wait. This admits
exactly what a token bucket of that rate and capacity admits, starting full.

The Redis key is ``<key_prefix>{<key>}``: the braces are a Redis Cluster hash tag, so the key
maps to one slot whatever the prefix.

When Redis cannot be reached (connection refused or reset, a timeout, or the bucket's own
breaker open), ``on_redis_error`` decides:

``"fail_closed"``
    raise :class:`~exai.errors.RateLimiterUnavailableError`: nothing is admitted.
``"local_share"``
    admit from a local :class:`~exai.resilience.TokenBucket` of ``rate/replicas`` and
    ``capacity/replicas``: together the replicas stay within the limit, and no process ever
    spends the full rate on its own.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal, Protocol

import anyio

from exai.errors import (
    CircuitOpenError,
    RateLimiterUnavailableError,
    ScriptNotLoadedError,
    StoreUnavailableError,
)

from .breaker import CircuitBreaker
from .bucket import TokenBucket

__all__ = [
    "GCRA_GROUP_SCRIPT",
    "GCRA_SCRIPT",
    "RedisBucketGroup",
    "RedisLike",
    "RedisTokenBucket",
    "is_redis_unreachable",
]

OnRedisError = Literal["fail_closed", "local_share"]

#: KEYS[1]: the bucket's key. ARGV: µs per token, capacity (tokens), cost (negative: refund),
#: and optionally ``"1"`` to *charge*: take the cost even when it is not there (the bucket goes
#: into debt that later requests wait out; at most one capacity's worth per charge).
#: Returns {admitted (0/1), µs to wait (0 when admitted)}.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = ARGV[4] == '1'
if force and cost > capacity then
  cost = capacity
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + cost * interval
if cost < 0 then
  if new_tat <= now then
    redis.call('DEL', KEYS[1])
  else
    redis.call('SET', KEYS[1], string.format('%.17g', new_tat),
               'PX', math.ceil((new_tat - now) / 1000) + 1)
  end
  return {1, 0}
end
local allow_at = new_tat - capacity * interval
if allow_at > now and not force then
  return {0, math.ceil(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"""

_SCRIPT_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()

#: KEYS: the buckets (one hash tag). ARGV, four per key: µs per token, capacity, cost, credit.
#: Credits (tokens given back since the last reservation) are applied first, whatever the
#: outcome; then every cost is taken, or none. Returns {1, 0, 0} when admitted, else
#: {0, index of the first bucket short (1-based), µs to wait}.
GCRA_GROUP_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats = {}
for i = 1, n do
  local interval = tonumber(ARGV[4 * i - 3])
  local credit = tonumber(ARGV[4 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  if credit > 0 then
    tat = tat - credit * interval
    if tat < now then tat = now end
  end
  tats[i] = tat
end
local short, wait = 0, 0
for i = 1, n do
  local interval = tonumber(ARGV[4 * i - 3])
  local capacity = tonumber(ARGV[4 * i - 2])
  local cost = tonumber(ARGV[4 * i - 1])
  local allow_at = tats[i] + cost * interval - capacity * interval
  if allow_at > now and short == 0 then
    short, wait = i, math.ceil(allow_at - now)
  end
end
for i = 1, n do
  local tat = tats[i]
  if short == 0 then tat = tat + tonumber(ARGV[4 * i - 1]) * tonumber(ARGV[4 * i - 3]) end
  if tat <= now then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
end
if short == 0 then return {1, 0, 0} end
return {0, short, wait}
"""


class RedisLike(Protocol):
    """What :class:`RedisTokenBucket` needs of a client (``redis.asyncio.Redis`` fits)."""

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...

    async def script_load(self, script: str) -> Any: ...


def _redis_py_unreachable() -> tuple[type[BaseException], ...]:
    # Optional and lazy: exai.resilience must import without redis-py, and the hot path never
    # imports it.
    try:
        from redis import exceptions
    except ImportError:  # pragma: no cover - redis-py is a dependency of the daemon only
        return ()
    # (a Redis that answers but refuses every write counts too: see map_redis_error in
    # exai.storage.aio_bridge, which the daemon's client goes through)
    return (
        exceptions.ConnectionError,
        exceptions.TimeoutError,
        exceptions.ReadOnlyError,
        exceptions.OutOfMemoryError,
        exceptions.TryAgainError,
        exceptions.ClusterDownError,
    )


_UNREACHABLE: tuple[type[BaseException], ...] | None = None


def is_redis_unreachable(exc: BaseException) -> bool:
    """True for errors that mean "Redis cannot be reached" rather than "the command failed".

    ``OSError`` (which includes ``ConnectionError`` and ``TimeoutError``), redis-py's
    ``ConnectionError`` / ``TimeoutError``, and exai's ``StoreUnavailableError`` (what the
    daemon's trio-asyncio Redis adapter raises). A script error or a wrong reply is not one of
    them.
    """
    global _UNREACHABLE
    if _UNREACHABLE is None:
        _UNREACHABLE = (OSError, StoreUnavailableError, *_redis_py_unreachable())
    return isinstance(exc, _UNREACHABLE)


def _redis_py_noscript() -> tuple[type[BaseException], ...]:
    try:
        from redis import exceptions
    except ImportError:  # pragma: no cover - redis-py is a dependency of the daemon only
        return ()
    return (exceptions.NoScriptError,)


_NOSCRIPT: tuple[type[BaseException], ...] | None = None


def _is_noscript(exc: BaseException) -> bool:
    """True when Redis did not know the script's SHA: redis-py's ``NoScriptError``, or exai's
    :class:`~exai.errors.ScriptNotLoadedError` (what the daemon's Redis adapter maps it to).

    By type only: error messages are for people, and a mapped message starts with the URL.
    """
    global _NOSCRIPT
    if _NOSCRIPT is None:
        _NOSCRIPT = (ScriptNotLoadedError, *_redis_py_noscript())
    return isinstance(exc, _NOSCRIPT)


class _RedisUnreachable(Exception):
    """Internal: the Redis round trip failed for want of Redis (or its breaker is open)."""

    def __init__(self, cause: BaseException, retry_after_s: float) -> None:
        super().__init__(str(cause))
        self.retry_after_s = retry_after_s


class RedisTokenBucket:
    """The :class:`~exai.resilience.TokenBucket` contract, shared through Redis.

    Args:
        redis: a client with awaitable ``evalsha``, ``eval`` and ``script_load``
            (``redis.asyncio.Redis``, or the daemon's trio adapter of it).
        key: names the limit (``"provider:kimi:rpm"``); every process using it shares it.
        rate_per_s: tokens added per second.
        capacity: the largest burst; a single request can cost at most this much.
        on_redis_error: ``"fail_closed"`` or ``"local_share"`` (see the module docstring).
        replicas: how many processes share the key; required for ``"local_share"``.
        key_prefix: prepended to the hash-tagged key.
        hash_tag: when set, the key is ``<key_prefix>{<hash_tag>}:<key>``, so buckets with the
            same tag live in one Redis Cluster slot and can be reserved together
            (:class:`RedisBucketGroup`).
        breaker: the breaker fronting Redis; by default one named ``redis-bucket:<key>`` that
            opens after a few failed round trips, so an outage fails fast.
        redis_call_bound_s: the most one Redis round trip may take before it counts as
            unreachable (an internal bound, so a silent network cannot hang a caller).

    Unlike the local bucket, :meth:`try_acquire` and :meth:`refund` are coroutines (they talk
    to Redis). Waiters of one process are served in FIFO order; across processes, Redis's
    atomic script decides.

    Raises:
        RateLimiterUnavailableError: from every method when Redis is unreachable and the policy
            is ``"fail_closed"`` (or the request is larger than the local share).

    Resource handling:
        The bucket does not own the client; close it yourself. A Redis round trip is shielded
        from the caller's cancellation (and bounded by ``redis_call_bound_s``), so a cancelled
        caller never leaves tokens taken on the server without knowing it.
    """

    def __init__(
        self,
        redis: RedisLike,
        key: str,
        rate_per_s: float,
        capacity: float,
        *,
        on_redis_error: OnRedisError = "fail_closed",
        replicas: int | None = None,
        key_prefix: str = "exai:bucket:",
        breaker: CircuitBreaker | None = None,
        redis_call_bound_s: float = 1.0,
        hash_tag: str | None = None,
    ) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError("rate_per_s must be a finite number > 0")
        if not (capacity > 0 and math.isfinite(capacity)):
            raise ValueError("capacity must be a finite number > 0")
        if on_redis_error not in ("fail_closed", "local_share"):
            raise ValueError("on_redis_error must be 'fail_closed' or 'local_share'")
        if on_redis_error == "local_share" and (replicas is None or replicas < 1):
            raise ValueError(
                "on_redis_error='local_share' needs replicas >= 1 (the number of processes "
                "sharing the key), so that an outage never admits the full rate in each"
            )
        if not redis_call_bound_s > 0:
            raise ValueError("redis_call_bound_s must be > 0")
        self.redis = redis
        self.key = key
        # buckets reserved together (RedisBucketGroup) share a hash tag: one Cluster slot
        self.redis_key = (
            f"{key_prefix}{{{hash_tag}}}:{key}" if hash_tag else f"{key_prefix}{{{key}}}"
        )
        self.rate_per_s = float(rate_per_s)
        self.capacity = float(capacity)
        self.on_redis_error: OnRedisError = on_redis_error
        self.replicas = replicas
        self.redis_call_bound_s = redis_call_bound_s
        self.breaker = breaker or CircuitBreaker(
            f"redis-bucket:{key}",
            failure_rate_threshold=0.5,
            minimum_calls=3,
            window_size=10,
            slow_call_duration_s=redis_call_bound_s,
            half_open_max_calls=1,
            open_duration_s=1.0,
            max_open_duration_s=30.0,
            record=is_redis_unreachable,
        )
        self._interval_us = 1e6 / self.rate_per_s
        self._fifo = anyio.Lock()
        self._local: TokenBucket | None = None
        if on_redis_error == "local_share":
            assert replicas is not None
            self._local = TokenBucket(self.rate_per_s / replicas, self.capacity / replicas)

    # -- public API -----------------------------------------------------------------------------

    async def try_acquire(self, cost: float = 1) -> float:
        """Take ``cost`` tokens now if the shared bucket has them.

        Returns:
            ``0.0`` when admitted; otherwise the seconds until it would be, taking nothing.

        Raises:
            ValueError: ``cost`` is negative or larger than ``capacity``.
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        self._check_cost(cost)
        try:
            return await self._redis_try(cost)
        except _RedisUnreachable as exc:
            return self._degraded_try(cost, exc)

    async def acquire(self, cost: float = 1) -> None:
        """Wait until ``cost`` tokens are taken from the shared bucket.

        Bound the wait with a cancel scope. A caller cancelled while waiting takes nothing.

        Raises:
            ValueError: ``cost`` is negative or larger than ``capacity``.
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        self._check_cost(cost)
        async with self._fifo:
            while True:
                try:
                    wait = await self._redis_try(cost)
                except _RedisUnreachable as exc:
                    wait = self._degraded_try(cost, exc)
                if wait == 0.0:
                    return
                await anyio.sleep(wait)

    async def refund(self, cost: float) -> None:
        """Give back ``cost`` tokens reserved but not used.

        Raises:
            ValueError: ``cost`` is negative.
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        if cost < 0 or math.isnan(cost):
            raise ValueError("refund cost must be >= 0")
        if cost == 0:
            return
        try:
            await self._eval(-cost)
        except _RedisUnreachable as exc:
            if self._local is None:
                raise self._unavailable(exc) from exc
            self._local.refund(min(cost, self._local.capacity))

    async def charge(self, cost: float) -> None:
        """Take ``cost`` tokens whether or not the bucket has them (settling an overrun).

        What a reservation did not cover is still spent: the shared bucket goes into debt and
        later requests — on every process — wait it out, so over time the bucket sees the real
        use. One charge takes at most ``capacity``. While Redis is unreachable a local share
        takes what it can of it; fail-closed raises.

        Raises:
            ValueError: ``cost`` is negative.
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        if cost < 0 or math.isnan(cost):
            raise ValueError("charge cost must be >= 0")
        if cost == 0:
            return
        try:
            await self._eval(min(cost, self.capacity), force=True)
        except _RedisUnreachable as exc:
            if self._local is None:
                raise self._unavailable(exc) from exc
            self._local.try_acquire(min(cost, self._local.capacity))

    def __repr__(self) -> str:
        return (
            f"<RedisTokenBucket key={self.redis_key!r} rate_per_s={self.rate_per_s} "
            f"capacity={self.capacity} on_redis_error={self.on_redis_error} "
            f"breaker={self.breaker.state}>"
        )

    # -- internals ------------------------------------------------------------------------------

    def _check_cost(self, cost: float) -> None:
        if not 0 <= cost <= self.capacity:
            raise ValueError(
                f"cost {cost!r} must be between 0 and the bucket's capacity {self.capacity}"
            )

    async def _redis_try(self, cost: float) -> float:
        admitted, wait_us = await self._eval(cost)
        if admitted:
            return 0.0
        return max(wait_us / 1e6, 1e-6)

    async def _eval(self, cost: float, *, force: bool = False) -> tuple[bool, int]:
        """One atomic script run; maps "cannot reach Redis" to :class:`_RedisUnreachable`."""
        args = [repr(self._interval_us), repr(self.capacity), repr(float(cost))]
        if force:
            args.append("1")
        reply = await self._eval_script(GCRA_SCRIPT, _SCRIPT_SHA, [self.redis_key], args)
        return bool(int(reply[0])), int(reply[1])

    async def _eval_script(self, script: str, sha: str, keys: list[str], args: list[str]) -> Any:
        """Run ``script`` under this bucket's breaker and bound; maps "cannot reach Redis" to
        :class:`_RedisUnreachable`."""
        try:
            async with self.breaker:
                reply = None
                # Shielded so a cancelled caller cannot abandon a script that may have run;
                # bounded so a black-holed connection counts as unreachable instead of hanging.
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.redis_call_bound_s):
                    reply = await self._run_script(script, sha, keys, args)
                if reply is None:
                    raise TimeoutError(f"Redis did not answer within {self.redis_call_bound_s}s")
        except CircuitOpenError as exc:
            raise _RedisUnreachable(exc, exc.retry_after_s or 0.0) from exc
        except Exception as exc:
            if is_redis_unreachable(exc):
                raise _RedisUnreachable(exc, self.breaker.open_duration_s) from exc
            raise
        return reply

    async def _run_script(self, script: str, sha: str, keys: list[str], args: list[str]) -> Any:
        try:
            return await self.redis.evalsha(sha, len(keys), *keys, *args)
        except Exception as exc:
            if not _is_noscript(exc):
                raise
        # The server lost its script cache (restart, failover, SCRIPT FLUSH): EVAL runs the
        # script and caches it again for the next EVALSHA.
        return await self.redis.eval(script, len(keys), *keys, *args)

    def _degraded_try(self, cost: float, exc: _RedisUnreachable) -> float:
        local = self._local
        if local is None:
            raise self._unavailable(exc) from exc
        if cost > local.capacity:
            raise RateLimiterUnavailableError(
                f"rate limiter {self.key!r}: Redis is unreachable and a request of cost {cost} "
                f"exceeds this process's local share ({local.capacity:g})",
                retry_after_s=exc.retry_after_s,
                data={"limiter": self.key},
            ) from exc
        return local.try_acquire(cost)

    def _unavailable(self, exc: _RedisUnreachable) -> RateLimiterUnavailableError:
        return RateLimiterUnavailableError(
            f"rate limiter {self.key!r} is unavailable: Redis cannot be reached ({exc}); "
            "refusing rather than admitting unchecked",
            retry_after_s=exc.retry_after_s,
            data={"limiter": self.key},
        )


class RedisBucketGroup:
    """Several :class:`RedisTokenBucket` reserved in **one** round trip, all or none.

    A provider's requests-per-minute and tokens-per-minute buckets are asked together for every
    call; tokens given back (a refund after the call, a request that was never sent) are passed
    as *credits* with the next reservation instead of costing a round trip of their own. A
    credit waits in this process until then — on an idle process a refund stays unapplied, so
    the shared limit only errs on the strict side; what is pending is bounded by each bucket's
    capacity.

    Args:
        buckets: the buckets, on one Redis client, with one ``hash_tag`` (one Cluster slot).

    While Redis is unreachable each bucket's own policy applies to its part (the credits go to
    the local shares); ``fail_closed`` on any of them refuses.
    """

    def __init__(self, buckets: list[RedisTokenBucket]) -> None:
        if not buckets:
            raise ValueError("a group needs at least one bucket")
        self.buckets = buckets
        self.credits = [0.0] * len(buckets)
        self._first = buckets[0]

    def credit(self, index: int, tokens: float) -> None:
        """Give ``tokens`` back to bucket ``index`` with the next reservation (no round trip)."""
        if tokens > 0 and math.isfinite(tokens):
            cap = self.buckets[index].capacity
            self.credits[index] = min(cap, self.credits[index] + tokens)

    async def try_acquire(self, costs: list[float]) -> tuple[int | None, float]:
        """Take ``costs[i]`` from each bucket ``i``, all or none (pending credits applied first).

        Returns:
            ``(None, 0.0)`` when admitted; else ``(i, seconds)``: bucket ``i`` is short and
            would admit in ``seconds``; nothing was taken.

        Raises:
            ValueError: a cost is negative or larger than its bucket's capacity.
            RateLimiterUnavailableError: Redis is unreachable and a bucket's policy is
                fail-closed.
        """
        for b, cost in zip(self.buckets, costs, strict=True):
            b._check_cost(cost)
        credits = list(self.credits)
        args: list[str] = []
        for b, cost, credit in zip(self.buckets, costs, credits, strict=True):
            args += [repr(b._interval_us), repr(b.capacity), repr(float(cost)), repr(credit)]
        keys = [b.redis_key for b in self.buckets]
        try:
            reply = await self._first._eval_script(GCRA_GROUP_SCRIPT, _GROUP_SHA, keys, args)
        except _RedisUnreachable as exc:
            return self._degraded(costs, exc)
        # the credits were applied (whatever the outcome); newer ones stay for next time
        for i, credit in enumerate(credits):
            self.credits[i] = max(0.0, self.credits[i] - credit)
        if int(reply[0]) == 1:
            return None, 0.0
        return int(reply[1]) - 1, max(int(reply[2]) / 1e6, 1e-6)

    def _degraded(self, costs: list[float], exc: _RedisUnreachable) -> tuple[int | None, float]:
        for b in self.buckets:
            if b._local is None:
                raise b._unavailable(exc) from exc
        for i, b in enumerate(self.buckets):
            assert b._local is not None
            if self.credits[i]:
                b._local.refund(min(self.credits[i], b._local.capacity))
                self.credits[i] = 0.0
        taken: list[tuple[TokenBucket, float]] = []
        for i, (b, cost) in enumerate(zip(self.buckets, costs, strict=True)):
            wait = b._degraded_try(cost, exc)
            if wait > 0:
                for local, took in taken:
                    local.refund(took)
                return i, wait
            assert b._local is not None
            taken.append((b._local, cost))
        return None, 0.0


_GROUP_SHA = hashlib.sha1(GCRA_GROUP_SCRIPT.encode()).hexdigest()
