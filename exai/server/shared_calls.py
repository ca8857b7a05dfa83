"""Exactly-once across daemons: one daemon runs a keyed call, a retry elsewhere joins it.

A ``tools/call`` with an idempotency key (every call ``exai bridge`` forwards has one) may be
re-sent to another daemon while the first one still runs it: the bridge's connection broke (the
balancer restarted, a network blip, a daemon closing sessions on drain) but the daemon did not.
Each daemon already answers a retry of a *finished* call from the result stored in Redis; this
module makes a retry of a *running* one wait for that result instead of running the call again:

* **claim** (one script, replacing the plain result lookup): the stored result if there is one;
  else the run key ``<prefix>idem:{<key>}:run`` is set to this daemon's instance id and this
  daemon runs the call (*owner*); else another daemon runs it (*running*, with its id).
* **join**: a daemon that found the call running elsewhere polls (backoff 50 ms → 1 s, bounded
  by the call's deadline) until the result appears — the answer is the owner's — or the run key
  is gone without a result (the owner cancelled it), and then claims again.
* **owner liveness**: each daemon keeps ``<prefix>alive:{<instance>}`` alive (TTL
  ``alive_ttl_s``, renewed three times per TTL in the background). A joiner that finds the
  owner's key gone (SIGKILL, power loss) takes the call over at once instead of waiting for the
  owner's deadline.
* **finish** (one script, replacing the plain result write): the owner stores the result (first
  one wins, TTL ``result_ttl_s``) and drops its run key; a cancelled call only drops the key, so
  a joiner runs it. A finish Redis did not take (it was away for a moment) is sent again with
  each liveness beat until it is (at most :data:`MAX_UNFINISHED`, oldest out): a joiner would
  otherwise wait for the run key's whole TTL, the owner alive and its result never there.

Keys carry the call's key as a Redis Cluster hash tag (the result and run keys share a slot);
the liveness check is a separate round trip, so no script spans slots.

Redis unreachable (or slow past ``call_bound_s``): :meth:`SharedCalls.claim` says so and the
caller runs the call itself — during a Redis outage a call retried onto another daemon may run
twice (docs/deploy.md). Nothing waits on Redis longer than the bound, and after a few failures
the breaker ``redis-calls`` answers "unavailable" at once until Redis answers again.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Literal, Protocol

import anyio
import anyio.abc
import attrs

from exai.errors import CircuitOpenError
from exai.logs import log_event
from exai.resilience.breaker import CircuitBreaker

__all__ = ["CLAIM_SCRIPT", "FINISH_SCRIPT", "Claim", "SharedCalls"]

#: KEYS: result, run. ARGV: this daemon's id, run key TTL (ms).
#: Returns {"result", <json>} | {"owner", ""} | {"running", <owner id>}.
CLAIM_SCRIPT = """
local r = redis.call('GET', KEYS[1])
if r then return {'result', r} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'owner', ''} end
local who = redis.call('GET', KEYS[2])
if who == ARGV[1] or not who then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'owner', ''}
end
return {'running', who}
"""

#: KEYS: run. ARGV: the dead owner's id, this daemon's id, run key TTL (ms). 1 when taken over.
TAKEOVER_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

#: KEYS: result, run. ARGV: this daemon's id, result json ('' = none), result TTL (ms).
FINISH_SCRIPT = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

#: finishes kept to send again while Redis is away (oldest dropped beyond)
MAX_UNFINISHED = 1024

ClaimKind = Literal["result", "owner", "running", "unavailable"]


@attrs.frozen
class Claim:
    """What :meth:`SharedCalls.claim` found: a stored ``result``, this daemon is the ``owner``,
    another daemon (``owner_id``) has it ``running``, or Redis is ``unavailable``."""

    kind: ClaimKind
    result: dict[str, Any] | None = None
    owner_id: str = ""


class ScriptRunner(Protocol):
    async def run_script(self, script: str, keys: Any, args: Any) -> Any: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(
        self, key: str, value: bytes | str, *, ex_s: float | None = None, nx: bool = False
    ) -> bool: ...


class SharedCalls:
    """See the module docstring.

    Args:
        redis: the daemon's bridged Redis client (``run_script``, ``get``, ``set``).
        key_prefix: ``settings.redis_key_prefix``.
        instance_id: this daemon run's id (``Daemon.instance_id``).
        result_ttl_s: how long a finished call's result is kept (``idempotency_ttl_s``).
        alive_ttl_s: how soon a dead daemon's running calls may be taken over.
        call_bound_s: the longest one Redis round trip may take.

    Use as an async context manager: it owns the task keeping this daemon's liveness key.
    """

    def __init__(
        self,
        redis: ScriptRunner,
        *,
        key_prefix: str,
        instance_id: str,
        result_ttl_s: float,
        alive_ttl_s: float = 3.0,
        call_bound_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.prefix = key_prefix
        self.instance_id = instance_id
        self.result_ttl_s = result_ttl_s
        self.alive_ttl_s = alive_ttl_s
        self.call_bound_s = call_bound_s
        self._tg: anyio.abc.TaskGroup | None = None
        self.breaker = CircuitBreaker(
            "redis-calls",
            minimum_calls=3,
            window_size=10,
            slow_call_duration_s=call_bound_s,
            open_duration_s=1.0,
            max_open_duration_s=30.0,
            record=lambda exc: isinstance(exc, Exception),
        )
        #: key → (keys, args) of a finish Redis did not take, sent again with each beat
        self._unfinished: OrderedDict[str, tuple[list[str], list[str]]] = OrderedDict()
        self.rejected = 0
        self.joined = 0
        self.taken_over = 0
        self.errors = 0

    async def __aenter__(self) -> SharedCalls:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        await self._beat()
        tg.start_soon(self._alive)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    # -- keys ------------------------------------------------------------------------------
    def result_key(self, key: str) -> str:
        # the key IdempotencyResults uses, so plain readers and writers still agree
        return f"{self.prefix}idem:{{{key}}}"

    def run_key(self, key: str) -> str:
        return f"{self.prefix}idem:{{{key}}}:run"

    def alive_key(self, instance: str) -> str:
        return f"{self.prefix}alive:{{{instance}}}"

    # -- the protocol ----------------------------------------------------------------------
    async def claim(self, key: str, run_ttl_s: float) -> Claim:
        """The stored result, or ownership of the run, or who runs it (one round trip)."""
        reply = await self._run(
            CLAIM_SCRIPT,
            [self.result_key(key), self.run_key(key)],
            [self.instance_id, str(max(1, int(run_ttl_s * 1000)))],
        )
        if not isinstance(reply, list) or len(reply) != 2:
            return Claim("unavailable")
        kind, value = _text(reply[0]), _text(reply[1])
        if kind == "result":
            try:
                doc = json.loads(value)
            except ValueError:
                return Claim("unavailable")
            return Claim("result", doc) if isinstance(doc, dict) else Claim("unavailable")
        if kind == "owner":
            return Claim("owner")
        return Claim("running", owner_id=value)

    async def join(self, key: str, run_ttl_s: float, first: Claim) -> Claim:
        """Wait while another daemon runs ``key``: its result, or ownership once it stopped
        or died (bound the wait with a cancel scope: the call's deadline)."""
        claim = first
        delay = 0.05
        self.joined += 1
        while claim.kind == "running":
            if not await self._is_alive(claim.owner_id):
                took = await self._run(
                    TAKEOVER_SCRIPT,
                    [self.run_key(key)],
                    [claim.owner_id, self.instance_id, str(max(1, int(run_ttl_s * 1000)))],
                )
                if took is not None and int(took) == 1:
                    self.taken_over += 1
                    log_event("call.taken_over", owner=claim.owner_id)
                    return Claim("owner")
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)
            claim = await self.claim(key, run_ttl_s)
        return claim

    async def finish(self, key: str, payload: dict[str, Any] | None) -> None:
        """Store the owner's result (``None``: cancelled, store nothing) and drop its run key."""
        data = "" if payload is None else json.dumps(payload, separators=(",", ":"), default=str)
        keys = [self.result_key(key), self.run_key(key)]
        args = [self.instance_id, data, str(max(1, int(self.result_ttl_s * 1000)))]
        if await self._run(FINISH_SCRIPT, keys, args) is None:
            self._unfinished[key] = (keys, args)
            self._unfinished.move_to_end(key)
            while len(self._unfinished) > MAX_UNFINISHED:
                self._unfinished.popitem(last=False)

    async def _finish_again(self) -> None:
        """Send the finishes Redis did not take, oldest first, until one fails again."""
        while self._unfinished:
            key, (keys, args) = next(iter(self._unfinished.items()))
            if await self._run(FINISH_SCRIPT, keys, args) is None:
                return
            if self._unfinished.get(key) == (keys, args):
                del self._unfinished[key]

    # -- internals -------------------------------------------------------------------------
    async def _is_alive(self, instance: str) -> bool:
        try:
            with anyio.move_on_after(self.call_bound_s):
                return await self.redis.get(self.alive_key(instance)) is not None
        except Exception:
            self.errors += 1
        return True  # cannot tell: assume alive, keep waiting

    async def _beat(self) -> None:
        try:
            with anyio.move_on_after(self.call_bound_s):
                await self.redis.set(self.alive_key(self.instance_id), "1", ex_s=self.alive_ttl_s)
        except Exception:
            self.errors += 1

    async def _alive(self) -> None:
        while True:
            await anyio.sleep(self.alive_ttl_s / 3)
            await self._beat()
            await self._finish_again()

    async def _run(self, script: str, keys: list[str], args: list[str]) -> Any:
        """One bounded script round trip behind the breaker; ``None`` when Redis did not
        answer (or the breaker is open: a Redis that hangs costs a few calls the bound, then
        none until it answers again)."""
        try:
            async with self.breaker:
                with anyio.fail_after(self.call_bound_s):
                    return await self.redis.run_script(script, keys, args)
        except CircuitOpenError:
            self.rejected += 1
        except Exception:  # unreachable, timed out, or a bad reply: no shared state now
            self.errors += 1
        return None

    def status(self) -> dict[str, Any]:
        return {
            "joined": self.joined,
            "taken_over": self.taken_over,
            "errors": self.errors,
            "rejected": self.rejected,
            "unfinished": len(self._unfinished),
            "breaker": self.breaker.state,
        }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)
