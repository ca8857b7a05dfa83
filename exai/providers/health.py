"""Provider health shared by every daemon of a deployment: an "open until" per provider.

When a provider is closed to calls on one daemon — its breaker opened on the provider's own
failures, the provider answered 429 with ``Retry-After``, or it said its quota is used up — that
daemon publishes "closed until *T*" for the provider in Redis. Every daemon reads the shared
values in the background and holds its own copy of the provider closed until then, so the others
refuse locally (and fall back at once) instead of each paying for its own failures, its own 429s
or its own quota errors. The provider's key and quota are shared by every daemon; so is its
health.

**Never on the hot path.** A call reads only the provider's local breaker and hold. Publishing
is a non-blocking :meth:`SharedHealth.offer` into a slot per (provider, kind) — the later "until"
wins, so the slots are bounded by providers × 3 — drained by a background task; learning is a
background poll every ``poll_interval_s``. Each Redis round trip is bounded by
``call_bound_s``.

**Redis outage.** Polls and publishes fail (bounded, counted, retried with backoff up to
:data:`MAX_BACKOFF_S`); each daemon is back to its own breaker alone, and what it had learned
runs out by itself. Nothing waits for Redis and nothing is refused because of it.

**Clocks.** The value in Redis is an instant on Redis's own clock (``TIME``, µs); the reading
script returns "µs from now", which a daemon turns into a hold of that length on its own loop
clock — the daemons' clocks never need to agree.

Redis layout: one hash ``<prefix>health:{providers}`` (one key: one Redis Cluster slot), field
``<provider>|<kind>`` → until (µs, Redis clock), ``kind`` one of :data:`KINDS`. Writes keep the
later instant (a hold is only ever extended, as on a local breaker); expired fields are dropped
by the next write; the key's TTL covers the longest hold.

What a learned hold does on a daemon: ``breaker`` opens its breaker until then (not a trip: the
next open time of its own does not double; at the end it lets its own probe through);
``rate_limited`` and ``quota`` set the provider's local hold, so calls are refused with
``upstream_rate_limited`` / ``quota_exhausted`` and ``retry_after_s`` as if it had seen the answer
itself. A provider that recovers early is not announced: the others wait out the published time
(at most ``breaker_max_open_s``, or the provider's own ``Retry-After``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import anyio
import anyio.abc

from exai.logs import log_event

__all__ = ["KINDS", "MAX_BACKOFF_S", "PUBLISH_SCRIPT", "READ_SCRIPT", "SharedHealth"]

#: what closed a provider: its breaker, a Retry-After, an exhausted quota
KINDS = ("breaker", "rate_limited", "quota")
#: longest pause between Redis attempts while Redis fails
MAX_BACKOFF_S = 5.0
#: longest hold accepted from Redis (a corrupt or hostile value cannot close a provider longer)
MAX_HOLD_S = 24 * 3600.0

#: KEYS[1]: the hash. ARGV: field, seconds (float), longest hold (s). Returns 1 when stored.
PUBLISH_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local secs = tonumber(ARGV[2])
if secs == nil or secs <= 0 then return 0 end
if secs > tonumber(ARGV[3]) then secs = tonumber(ARGV[3]) end
local u = now + math.floor(secs * 1000000)
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if cur ~= nil and cur >= u then return 0 end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = tonumber(all[i + 1])
  if v == nil or v <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', u))
local want = math.ceil((u - now) / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < want then redis.call('PEXPIRE', KEYS[1], want) end
return 1
"""

#: KEYS[1]: the hash. Returns {field, µs from now, …} for the holds still running.
READ_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local v = tonumber(all[i + 1])
  if v ~= nil and v > now then
    out[#out + 1] = all[i]
    out[#out + 1] = string.format('%.0f', v - now)
  end
end
return out
"""


class ScriptRunner(Protocol):
    """What :class:`SharedHealth` needs of a Redis client (the daemon's ``BridgedRedis``)."""

    async def run_script(self, script: str, keys: Any, args: Any) -> Any: ...


class HealthMember(Protocol):
    """What :class:`SharedHealth` needs of a provider (:class:`~exai.providers.Provider`)."""

    name: str
    on_opened: Any

    def learn(self, kind: str, seconds: float) -> bool: ...


class SharedHealth:
    """Publish and learn providers' "open until" through Redis, in the background.

    Args:
        redis: a client with ``run_script(script, keys, args)`` (EVALSHA with a fallback).
        providers: the providers to share; each gets its ``on_opened`` hook set to
            :meth:`offer` for the span of the ``async with``.
        key_prefix: ``settings.redis_key_prefix``; daemons with the same prefix share health.
        poll_interval_s: how often shared holds are read (and pending ones published).
        call_bound_s: the longest one Redis round trip may take.

    Use as an async context manager; it owns one background task.

    Resource handling:
        The task lives in a task group of this object and ends with the ``async with``; the
        providers' hooks are removed on exit. The slots hold at most one entry per
        (provider, kind).

    Error handling:
        Nothing raises to a caller: a failed round trip is counted (``errors``), logged once per
        outage, and retried after a backoff.
    """

    def __init__(
        self,
        redis: ScriptRunner,
        providers: Iterable[HealthMember],
        *,
        key_prefix: str = "exai:",
        poll_interval_s: float = 0.5,
        call_bound_s: float = 0.5,
    ) -> None:
        if not poll_interval_s > 0:
            raise ValueError("poll_interval_s must be > 0")
        if not call_bound_s > 0:
            raise ValueError("call_bound_s must be > 0")
        self.redis = redis
        self.providers = {p.name: p for p in providers}
        self.key = f"{key_prefix}health:{{providers}}"
        self.poll_interval_s = poll_interval_s
        self.call_bound_s = call_bound_s
        #: (provider, kind) → until, on this process's loop clock
        self._outbox: dict[tuple[str, str], float] = {}
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.published = 0
        self.learned = 0
        self.polls = 0
        self.errors = 0
        self.last_error: str | None = None
        self._failing = False
        self._backoff_s = 0.0

    async def __aenter__(self) -> SharedHealth:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        for p in self.providers.values():
            p.on_opened = self.offer
        tg.start_soon(self._run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self.providers.values():
            p.on_opened = None
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    # -- hot path: never waits ---------------------------------------------------------------
    def offer(self, provider: str, kind: str, seconds: float) -> None:
        """Queue "``provider`` is closed for ``seconds`` (because of ``kind``)" for publishing.

        Synchronous and O(1); the background task sends it. A later offer for the same
        (provider, kind) replaces an earlier one only when it ends later.
        """
        if kind not in KINDS or not seconds > 0 or provider not in self.providers:
            return
        until = anyio.current_time() + min(seconds, MAX_HOLD_S)
        slot = (provider, kind)
        if until > self._outbox.get(slot, -1.0):
            self._outbox[slot] = until
            self._wake.set()

    # -- background ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            ok = await self._publish_pending()
            if ok:
                ok = await self._poll()
            if ok:
                if self._failing:
                    log_event("provider.health_shared", outcome="redis_back")
                self._failing = False
                self._backoff_s = 0.0
                wait = self.poll_interval_s
            else:
                self._backoff_s = min(MAX_BACKOFF_S, max(self.poll_interval_s, self._backoff_s * 2))
                wait = self._backoff_s
            with anyio.move_on_after(wait):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def _publish_pending(self) -> bool:
        now = anyio.current_time()
        for slot, until in sorted(self._outbox.items(), key=lambda kv: kv[1]):
            remaining = until - now
            if remaining <= 0:
                self._outbox.pop(slot, None)
                continue
            provider, kind = slot
            if not await self._script(
                PUBLISH_SCRIPT, [f"{provider}|{kind}", repr(remaining), repr(MAX_HOLD_S)]
            ):
                return False
            # a newer offer made meanwhile stays for the next round
            if self._outbox.get(slot) == until:
                del self._outbox[slot]
            self.published += 1
            log_event("provider.health_shared", provider=provider, kind=kind, published_s=remaining)
        return True

    async def _poll(self) -> bool:
        reply: list[Any] = []
        if not await self._script(READ_SCRIPT, [], out=reply):
            return False
        self.polls += 1
        items = reply[0] if reply else []
        if not isinstance(items, list):
            return True
        for i in range(0, len(items) - 1, 2):
            field = _text(items[i])
            try:
                micros = float(_text(items[i + 1]))
            except ValueError:
                continue
            provider, _, kind = field.rpartition("|")
            member = self.providers.get(provider)
            if member is None or kind not in KINDS or not micros > 0:
                continue
            if member.learn(kind, min(micros / 1e6, MAX_HOLD_S)):
                self.learned += 1
                log_event(
                    "provider.health_learned",
                    provider=provider,
                    kind=kind,
                    seconds=round(micros / 1e6, 3),
                )
        return True

    async def _script(self, script: str, args: list[str], *, out: list[Any] | None = None) -> bool:
        """One bounded round trip; False (counted) when Redis did not answer in time."""
        reply: Any = None
        done = False
        try:
            with anyio.move_on_after(self.call_bound_s):
                reply = await self.redis.run_script(script, [self.key], args)
                done = True
        except Exception as exc:  # any failure of Redis is the same to us: no shared state now
            self._failed(f"{type(exc).__name__}: {str(exc)[:200]}")
            return False
        if not done:
            self._failed(f"no answer within {self.call_bound_s:g}s")
            return False
        if out is not None:
            out.append(reply)
        return True

    def _failed(self, why: str) -> None:
        self.errors += 1
        self.last_error = why
        if not self._failing:
            log_event("provider.health_shared", outcome="redis_unavailable", error=why)
        self._failing = True

    def status(self) -> dict[str, Any]:
        """Counters for ``status``: polls, published and learned holds, Redis errors."""
        return {
            "shared": True,
            "redis_ok": not self._failing,
            "polls": self.polls,
            "published": self.published,
            "learned": self.learned,
            "pending": len(self._outbox),
            "errors": self.errors,
            "last_error": self.last_error,
            "poll_interval_s": self.poll_interval_s,
        }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)
