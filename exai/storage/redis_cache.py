"""Redis as an optional cache of threads and a shared store of idempotency results.

Redis is never a source of truth here: every error (unreachable, timeout, open breaker) is a
cache miss or a "don't know", counted in :meth:`GuardedRedis.status`, never a failed call.

Thread cache: read-through, invalidated on write with a generation counter
---------------------------------------------------------------------------
Keys (one hash tag per thread, so both live in one Redis Cluster slot)::

    <prefix>thread:{<id>}       the thread as JSON, with a TTL
    <prefix>thread:{<id>}:gen   a counter bumped by every write to the thread

A reader does ``MGET value gen``; on a hit it returns the value. On a miss it loads the thread
from the store and fills the cache with a script that sets the value **only if gen is still what
it read before loading**. A writer commits to the store first, then runs a script that bumps gen
and deletes the value. So a reader that loaded a version older than a concurrent write can never
put it back (its fill sees a new gen), and a write is visible to every daemon's next read once
its invalidation ran. When the invalidation itself cannot reach Redis, the thread id is kept in
a bounded local set (count and bytes), retried before this process's next Redis read and by a
background loop that waits between attempts (:func:`exai.resilience.drain_loop`: at least the
Redis breaker's retry time), and the cache is not read here meanwhile;
the cache TTL bounds what another daemon could read in that window.

Idempotency results
-------------------
``<prefix>idem:{<key>}`` holds a finished call's result (JSON) for the daemon core, so a retry
that lands on another daemon is answered with the same result. The first result stored wins
(``SET NX``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from exai.errors import CircuitOpenError, StoreError
from exai.resilience import CircuitBreaker
from exai.resilience.backoff import Wakeup
from exai.storage.aio_bridge import BridgedRedis
from exai.storage.model import Thread

__all__ = ["GuardedRedis", "IdempotencyResults", "ThreadCache"]

T = TypeVar("T")

_FILL = """
local g = redis.call('GET', KEYS[2])
if (g or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

_INVALIDATE = """
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

#: how many un-delivered invalidations are remembered while Redis is unreachable, and their
#: bytes (two keys each); beyond either the invalidation is dropped and counted (the cache TTL
#: then bounds how stale another daemon's read can be)
MAX_PENDING_INVALIDATIONS = 10_000
MAX_PENDING_INVALIDATION_BYTES = 4 << 20


class GuardedRedis:
    """A :class:`~exai.storage.aio_bridge.BridgedRedis` behind its own breaker and a per-call
    bound; every failure is swallowed and counted.

    Args:
        redis: the bridged client.
        breaker: the breaker named ``"redis"`` in status.
        call_timeout_s: bound on one Redis round trip (inside the caller's deadline).
    """

    def __init__(self, redis: BridgedRedis, breaker: CircuitBreaker, *, call_timeout_s: float):
        self.redis = redis
        self.breaker = breaker
        self._timeout_s = call_timeout_s
        self.errors = 0
        self.rejected = 0
        self._pending: dict[str, str] = {}  # value key -> gen key
        self._pending_bytes = 0
        self.pending_overflow = 0
        self._gen_ttl_ms = 0
        #: set when an invalidation is remembered (wakes the loop that delivers them)
        self.work = Wakeup()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> tuple[bool, T | None]:
        """Run ``fn(*args)`` under the breaker and the bound: (True, result) or (False, None)."""
        try:
            async with self.breaker:
                with anyio.fail_after(self._timeout_s):
                    return True, await fn(*args)
        except CircuitOpenError:
            self.rejected += 1
        except (StoreError, TimeoutError):
            self.errors += 1
        return False, None

    # -- invalidations that could not be delivered ----------------------------------------
    def remember(self, value_key: str, gen_key: str, gen_ttl_ms: int) -> None:
        self._gen_ttl_ms = gen_ttl_ms
        if value_key in self._pending:
            return
        size = len(value_key) + len(gen_key)
        if (
            len(self._pending) >= MAX_PENDING_INVALIDATIONS
            or self._pending_bytes + size > MAX_PENDING_INVALIDATION_BYTES
        ):
            self.pending_overflow += 1
            return
        self._pending[value_key] = gen_key
        self._pending_bytes += size
        self.work.set()

    def is_pending(self, value_key: str) -> bool:
        return value_key in self._pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush_pending(self) -> int:
        """Deliver remembered invalidations, oldest first, until one fails; how many were
        delivered (0 when Redis is away: callers must not treat that as done)."""
        delivered = 0
        for value_key, gen_key in list(self._pending.items()):
            ok, _ = await self.call(
                self.redis.run_script, _INVALIDATE, [value_key, gen_key], [self._gen_ttl_ms]
            )
            if not ok:
                break
            if self._pending.pop(value_key, None) is not None:
                self._pending_bytes -= len(value_key) + len(gen_key)
            delivered += 1
        return delivered

    def status(self) -> dict[str, Any]:
        stats = self.breaker.statistics()
        return {
            "breaker": _breaker_status(self.breaker, stats),
            "pool": self.redis.status(),
            "errors": self.errors,
            "rejected": self.rejected,
            "pending_invalidations": len(self._pending),
            "pending_invalidation_bytes": self._pending_bytes,
            "pending_overflow": self.pending_overflow,
        }


def _breaker_status(breaker: CircuitBreaker, stats: Any) -> dict[str, Any]:
    return {
        "name": breaker.name,
        "state": stats.state,
        "calls": stats.calls,
        "failures": stats.failures,
        "rejections": stats.rejections,
        "trips": stats.trips,
    }


class ThreadCache:
    """Read-through cache of threads (see the module docstring for the protocol).

    Args:
        guard: the guarded Redis client.
        prefix: the key prefix (``settings.redis_key_prefix``).
        ttl_s: the longest a cached thread lives (never past the thread's own expiry).
    """

    def __init__(self, guard: GuardedRedis, *, prefix: str, ttl_s: float = 300.0) -> None:
        self.guard = guard
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._gen_ttl_ms = int(max(2 * ttl_s, 3600.0) * 1000)
        self.hits = 0
        self.misses = 0
        self.fills = 0
        self.stale_fills_refused = 0
        self.invalidations = 0

    def keys(self, thread_id: str) -> tuple[str, str]:
        """(value key, generation key) of a thread."""
        value = f"{self.prefix}thread:{{{thread_id}}}"
        return value, value + ":gen"

    async def lookup(self, thread_id: str) -> tuple[Thread | None, bytes | None]:
        """(cached thread or None, the generation token to pass to :meth:`fill`)."""
        value_key, gen_key = self.keys(thread_id)
        if self.guard.pending:
            await self.guard.flush_pending()
            if self.guard.pending:  # Redis still away: the cache may be stale, so miss
                self.misses += 1
                return None, None
        ok, reply = await self.guard.call(self.guard.redis.mget, value_key, gen_key)
        if not ok or reply is None:
            self.misses += 1
            return None, None
        value, gen = reply
        if value is not None:
            try:
                thread = Thread.from_json(value)
            except (ValueError, KeyError, TypeError):
                thread = None
            if thread is not None:
                self.hits += 1
                return thread, gen
        self.misses += 1
        return None, gen if gen is not None else b""

    async def fill(self, thread: Thread, gen: bytes | None, *, now: float) -> bool:
        """Cache ``thread`` unless it was written since ``gen`` was read; True if cached.

        ``gen`` None (the lookup failed) never fills: the generation is unknown.
        """
        if gen is None:
            return False
        ttl_s = min(self.ttl_s, thread.expires_at - now)
        if ttl_s <= 0:
            return False
        value_key, gen_key = self.keys(thread.id)
        ok, reply = await self.guard.call(
            self.guard.redis.run_script,
            _FILL,
            [value_key, gen_key],
            [
                gen.decode() if isinstance(gen, bytes) else str(gen),
                thread.to_json(),
                max(1, math.floor(ttl_s * 1000)),
            ],
        )
        if ok and reply == 1:
            self.fills += 1
            return True
        if ok:
            self.stale_fills_refused += 1
        return False

    async def invalidate(self, thread_id: str) -> bool:
        """Bump the thread's generation and drop its cached value; True when delivered (else
        remembered and retried later)."""
        value_key, gen_key = self.keys(thread_id)
        ok, _ = await self.guard.call(
            self.guard.redis.run_script, _INVALIDATE, [value_key, gen_key], [self._gen_ttl_ms]
        )
        if ok:
            self.invalidations += 1
            return True
        self.guard.remember(value_key, gen_key, self._gen_ttl_ms)
        return False

    def status(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fills": self.fills,
            "stale_fills_refused": self.stale_fills_refused,
            "invalidations": self.invalidations,
            "ttl_s": self.ttl_s,
        }


class IdempotencyResults:
    """Finished calls' results shared by every daemon (for exactly-once answers to retries).

    Args:
        guard: the guarded Redis client.
        prefix: the key prefix (``settings.redis_key_prefix``).
    """

    def __init__(self, guard: GuardedRedis, *, prefix: str) -> None:
        self.guard = guard
        self.prefix = prefix

    def key(self, key: str) -> str:
        return f"{self.prefix}idem:{{{key}}}"

    async def get(self, key: str) -> dict[str, Any] | None:
        """The stored result for ``key``, or None (absent, or Redis unavailable)."""
        ok, raw = await self.guard.call(self.guard.redis.get, self.key(key))
        if not ok or raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    async def put(self, key: str, result: dict[str, Any], ttl_s: float) -> bool:
        """Store ``result`` for ``ttl_s`` unless a result is already stored (first one wins).

        Returns True when this call stored it; False when one existed or Redis is unavailable
        (the daemon keeps its local copy either way).
        """
        data = json.dumps(result, separators=(",", ":"), default=str)
        ok, stored = await self.guard.call(self._set_nx, self.key(key), data, ttl_s)
        return bool(ok and stored)

    async def _set_nx(self, key: str, data: str, ttl_s: float) -> bool:
        return await self.guard.redis.set(key, data, ex_s=ttl_s, nx=True)
