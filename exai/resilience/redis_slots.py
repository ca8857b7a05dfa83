"""A counting semaphore shared through Redis: at most ``limit`` holders of a key, in all.

Every process of a deployment that uses the same Redis and key prefix sees the same count, so a
limit on concurrent things (calls in flight of one client identity, connections from one
address) holds for the deployment instead of per process — never N × the limit.

Each holder is a *lease*: a member of a sorted set ``<key_prefix>{<key>}`` scored by when it
expires on Redis's clock (``TIME``). The process renews the leases it holds in the background
every ``lease_s / 3``; a process that dies (SIGKILL, power loss) stops renewing, and its slots
free themselves within ``lease_s``. Taking a slot is one atomic script (expired leases dropped,
count checked, lease added); giving it back is synchronous for the caller (:meth:`release`) and
sent by the background task — the caller never waits for Redis to let go.

When Redis cannot be reached (connection refused or reset, a timeout, or the semaphore's own
breaker open), ``on_redis_error`` decides, as for :class:`~exai.resilience.RedisTokenBucket`:

``"fail_closed"``
    :meth:`try_acquire` raises :class:`~exai.errors.RateLimiterUnavailableError`.
``"local_share"``
    this process admits up to ``ceil(limit / replicas)`` holders of the key on its own (the
    ones it already holds count), so the replicas together stay within the limit.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import anyio
import anyio.abc

from exai.errors import CircuitOpenError, RateLimiterUnavailableError

from .breaker import CircuitBreaker
from .redis_bucket import is_redis_unreachable

__all__ = ["ACQUIRE_SCRIPT", "RedisSlots"]

OnRedisError = Literal["fail_closed", "local_share"]

#: KEYS[1]: the set. ARGV: holder, limit, lease (ms). Returns 1 when the holder has a slot.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease + 1000 then
  redis.call('PEXPIRE', KEYS[1], lease + 1000)
end
return 1
"""

#: KEYS[1]: the set. ARGV: lease (ms), holder… Renews the holders still present.
RENEW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease + 1000)
return 1
"""

#: KEYS[1]: the set. ARGV: holder… Gives the slots back.
RELEASE_SCRIPT = """
for i = 1, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
end
return 1
"""


class ScriptRunner(Protocol):
    """What :class:`RedisSlots` needs of a client (the daemon's ``BridgedRedis``)."""

    async def run_script(self, script: str, keys: Any, args: Any) -> Any: ...


class _Unreachable(Exception):
    def __init__(self, cause: BaseException, retry_after_s: float) -> None:
        super().__init__(str(cause))
        self.retry_after_s = retry_after_s


class RedisSlots:
    """Counting semaphores shared through Redis, one per key (see the module docstring).

    Args:
        redis: a client with ``run_script(script, keys, args)`` (EVALSHA with a fallback).
        key_prefix: prepended to each hash-tagged key (``"exai:slots:"``).
        lease_s: how long a slot outlives the process that took it without renewal.
        on_redis_error: ``"fail_closed"`` or ``"local_share"``.
        replicas: processes sharing the keys; required for ``"local_share"``.
        redis_call_bound_s: the longest one Redis round trip may take.
        breaker: the breaker fronting Redis (default: one named ``redis-slots``).

    Use as an async context manager: it owns the background task that renews leases and sends
    releases.

    Resource handling:
        The holders this process has are kept in memory until released (bounded by what the
        caller holds at once); releases waiting to be sent are bounded the same way, and one
        that cannot be sent expires with its lease.
    """

    def __init__(
        self,
        redis: ScriptRunner,
        *,
        key_prefix: str = "exai:slots:",
        lease_s: float = 30.0,
        on_redis_error: OnRedisError = "fail_closed",
        replicas: int | None = None,
        redis_call_bound_s: float = 0.5,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if not lease_s > 0:
            raise ValueError("lease_s must be > 0")
        if on_redis_error not in ("fail_closed", "local_share"):
            raise ValueError("on_redis_error must be 'fail_closed' or 'local_share'")
        if on_redis_error == "local_share" and (replicas is None or replicas < 1):
            raise ValueError("on_redis_error='local_share' needs replicas >= 1")
        self.redis = redis
        self.key_prefix = key_prefix
        self.lease_s = lease_s
        self.on_redis_error: OnRedisError = on_redis_error
        self.replicas = replicas or 1
        self.redis_call_bound_s = redis_call_bound_s
        self.breaker = breaker or CircuitBreaker(
            "redis-slots",
            failure_rate_threshold=0.5,
            minimum_calls=3,
            window_size=10,
            slow_call_duration_s=redis_call_bound_s,
            open_duration_s=1.0,
            max_open_duration_s=30.0,
            record=is_redis_unreachable,
        )
        #: key → holders this process has (taken through Redis or, in an outage, locally)
        self.held: dict[str, set[str]] = {}
        self._releases: dict[str, set[str]] = {}
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.refused = 0
        self.degraded = 0
        self.errors = 0

    async def __aenter__(self) -> RedisSlots:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._background)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None
        # a last, bounded attempt to give back what is still held or waiting
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.redis_call_bound_s):
            for key in list(self.held):
                self._releases.setdefault(key, set()).update(self.held.pop(key))
            await self._send_releases()

    def redis_key(self, key: str) -> str:
        return f"{self.key_prefix}{{{key}}}"

    # -- the semaphore ---------------------------------------------------------------------
    async def try_acquire(self, key: str, holder: str, limit: int) -> bool:
        """Take a slot of ``key`` for ``holder`` if fewer than ``limit`` are taken in all.

        Taking a slot ``holder`` already has succeeds (and renews it).

        Raises:
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        if limit < 1:
            return False
        try:
            reply = await self._script(
                ACQUIRE_SCRIPT, key, [holder, str(limit), str(int(self.lease_s * 1000))]
            )
        except _Unreachable as exc:
            return self._degraded_acquire(key, holder, limit, exc)
        if int(reply) != 1:
            self.refused += 1
            return False
        self.held.setdefault(key, set()).add(holder)
        return True

    def release(self, key: str, holder: str) -> None:
        """Give ``holder``'s slot of ``key`` back (sent to Redis in the background)."""
        holders = self.held.get(key)
        if holders is None or holder not in holders:
            return
        holders.discard(holder)
        if not holders:
            del self.held[key]
        self._releases.setdefault(key, set()).add(holder)
        self._wake.set()

    def holding(self, key: str) -> int:
        """Slots of ``key`` this process holds now."""
        return len(self.held.get(key, ()))

    def _degraded_acquire(self, key: str, holder: str, limit: int, exc: _Unreachable) -> bool:
        if self.on_redis_error == "fail_closed":
            raise RateLimiterUnavailableError(
                f"shared limit {key!r} is unavailable: Redis cannot be reached ({exc}); "
                "refusing rather than admitting unchecked",
                retry_after_s=exc.retry_after_s,
                data={"limiter": key},
            ) from exc
        self.degraded += 1
        share = max(1, math.ceil(limit / self.replicas))
        holders = self.held.setdefault(key, set())
        if holder in holders:
            return True
        if len(holders) >= share:
            if not holders:
                del self.held[key]
            self.refused += 1
            return False
        holders.add(holder)
        return True

    # -- Redis -----------------------------------------------------------------------------
    async def _script(self, script: str, key: str, args: list[str]) -> Any:
        try:
            async with self.breaker:
                reply: Any = None
                done = False
                # shielded: a cancelled caller must not leave a slot taken that it does not
                # know about; bounded: a silent network counts as unreachable
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.redis_call_bound_s):
                    reply = await self.redis.run_script(script, [self.redis_key(key)], args)
                    done = True
                if not done:
                    raise TimeoutError(f"Redis did not answer within {self.redis_call_bound_s}s")
                return reply
        except CircuitOpenError as exc:
            raise _Unreachable(exc, exc.retry_after_s or 0.0) from exc
        except Exception as exc:
            if is_redis_unreachable(exc):
                self.errors += 1
                raise _Unreachable(exc, self.breaker.open_duration_s) from exc
            raise

    async def _background(self) -> None:
        every = self.lease_s / 3
        next_renew = anyio.current_time() + every
        while True:
            with anyio.move_on_at(next_renew):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self._send_releases()
            if anyio.current_time() >= next_renew:
                await self._renew()
                next_renew = anyio.current_time() + every

    async def _send_releases(self) -> None:
        for key in list(self._releases):
            holders = self._releases.pop(key)
            try:
                await self._script(RELEASE_SCRIPT, key, sorted(holders))
            except _Unreachable:
                pass  # the leases run out by themselves

    async def _renew(self) -> None:
        lease_ms = str(int(self.lease_s * 1000))
        for key, holders in list(self.held.items()):
            if not holders:
                continue
            try:
                await self._script(RENEW_SCRIPT, key, [lease_ms, *sorted(holders)])
            except _Unreachable:
                return  # try again at the next round

    def status(self) -> dict[str, Any]:
        return {
            "keys_held": len(self.held),
            "slots_held": sum(len(h) for h in self.held.values()),
            "refused": self.refused,
            "degraded_admissions": self.degraded,
            "redis_errors": self.errors,
            "breaker": self.breaker.state,
            "lease_s": self.lease_s,
        }
