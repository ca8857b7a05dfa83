"""Per-identity and per-address limits that hold for the whole deployment, through Redis.

With ``EXAI_REDIS_URL`` set, N daemons behind a balancer enforce these limits together — never
N × the limit:

* connections per address (``EXAI_MAX_CONNECTIONS_PER_IP``): a lease per connection
  (:class:`~exai.resilience.redis_slots.RedisSlots`);
* calls in flight per identity (``EXAI_IDENTITY_MAX_INFLIGHT``): a lease per call (the same);
* messages per identity (``EXAI_IDENTITY_RATE_PER_S`` / ``EXAI_IDENTITY_BURST``): a GCRA bucket
  per identity (:class:`~exai.resilience.RedisTokenBucket`).

Each daemon keeps its own local limit as well (the same numbers), so the local check — no
network — refuses first whatever a daemon can refuse alone; Redis is asked only for what the
local check admitted. While Redis is unreachable, ``EXAI_RATE_LIMIT_ON_REDIS_ERROR`` applies to
each: ``local_share`` admits ``limit / EXAI_RATE_LIMIT_REPLICAS`` per daemon, ``fail_closed``
refuses. The address is the client's (``X-Forwarded-For`` from ``EXAI_TRUSTED_PROXIES``, see
:mod:`exai.server.forwarded`), so the balancer's own address is not what is limited.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import anyio

from exai.config import Settings
from exai.errors import RateLimiterUnavailableError
from exai.resilience.redis_bucket import RedisTokenBucket
from exai.resilience.redis_slots import RedisSlots

__all__ = ["SharedLimits", "SharedSlot"]

#: identities whose shared message bucket is kept (least recently used dropped beyond it)
MAX_IDENTITY_BUCKETS = 10_000
#: how often a call waiting for a shared identity slot asks again (within slot_wait_s)
SLOT_POLL_S = 0.05


def _holder(instance_id: str, what: str) -> str:
    # short and fixed-size whatever the key: the member names a slot in Redis
    return f"{instance_id}:{hashlib.sha256(what.encode()).hexdigest()[:20]}"


class SharedSlot:
    """A slot taken in Redis, given back like a ``trio.CapacityLimiter`` slot
    (``release_on_behalf_of``), so it sits in the same list of held limiters as the local
    ones."""

    def __init__(self, slots: RedisSlots, key: str, holder: str) -> None:
        self._slots = slots
        self.key = key
        self.holder = holder

    def release_on_behalf_of(self, borrower: object) -> None:
        self._slots.release(self.key, self.holder)


class SharedLimits:
    """The deployment-wide limits of one daemon (see the module docstring).

    Args:
        settings: the limits, the outage policy and the key prefix.
        redis: the daemon's bridged Redis client.
        instance_id: this daemon run's id (names its leases).

    Use as an async context manager (it owns the lease-renewing task of its slots).
    """

    def __init__(self, settings: Settings, redis: Any, instance_id: str) -> None:
        self.settings = settings
        self.redis = redis
        self.instance_id = instance_id
        self.slots = RedisSlots(
            redis,
            key_prefix=f"{settings.redis_key_prefix}slots:",
            on_redis_error=settings.rate_limit_on_redis_error,  # type: ignore[arg-type]
            replicas=settings.rate_limit_replicas,
        )
        self._buckets: OrderedDict[str, RedisTokenBucket] = OrderedDict()
        self.refused: dict[str, int] = {"ip": 0, "identity_inflight": 0, "identity_rate": 0}

    async def __aenter__(self) -> SharedLimits:
        await self.slots.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.slots.__aexit__(*exc)

    # -- connections per address ---------------------------------------------------------
    async def connection(self, ip: str, connection_id: str) -> bool:
        """Take a deployment-wide connection slot of ``ip``; False when they are all taken.

        Raises:
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        ok = await self.slots.try_acquire(
            f"ip:{ip}",
            _holder(self.instance_id, connection_id),
            self.settings.max_connections_per_ip,
        )
        if not ok:
            self.refused["ip"] += 1
        return ok

    def release_connection(self, ip: str, connection_id: str) -> None:
        self.slots.release(f"ip:{ip}", _holder(self.instance_id, connection_id))

    # -- calls in flight per identity --------------------------------------------------------
    async def identity_slot(self, identity: str, call_key: str) -> SharedSlot | None:
        """A deployment-wide in-flight slot of ``identity``, asked again every
        :data:`SLOT_POLL_S` until the caller's cancel scope ends the wait; None when the
        identity has no limit.

        Raises:
            RateLimiterUnavailableError: Redis is unreachable and the policy is fail-closed.
        """
        limit = self.settings.identity_max_inflight
        if limit <= 0:
            return None
        key = f"identity:{identity}"
        holder = _holder(self.instance_id, call_key)
        while not await self.slots.try_acquire(key, holder, limit):
            self.refused["identity_inflight"] += 1
            await anyio.sleep(SLOT_POLL_S)
        return SharedSlot(self.slots, key, holder)

    # -- messages per identity ---------------------------------------------------------------
    async def message_wait(self, identity: str, cost: float) -> float:
        """Take ``cost`` from the identity's deployment-wide message bucket: 0 when admitted,
        else the seconds until it would be. 0 when the identity has no rate limit."""
        s = self.settings
        if s.identity_rate_per_s <= 0:
            return 0.0
        bucket = self._buckets.get(identity)
        if bucket is None:
            bucket = RedisTokenBucket(
                self.redis,
                f"identity:{identity}:messages",
                s.identity_rate_per_s,
                max(1.0, float(s.identity_burst)),
                on_redis_error=s.rate_limit_on_redis_error,  # type: ignore[arg-type]
                replicas=s.rate_limit_replicas,
                key_prefix=f"{s.redis_key_prefix}bucket:",
            )
            self._buckets[identity] = bucket
            if len(self._buckets) > MAX_IDENTITY_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(identity)
        try:
            wait = await bucket.try_acquire(min(cost, bucket.capacity))
        except RateLimiterUnavailableError as exc:
            wait = exc.retry_after_s or 1.0
        if wait > 0:
            self.refused["identity_rate"] += 1
        return wait

    def status(self) -> dict[str, Any]:
        return {"slots": self.slots.status(), "refused": dict(self.refused)}
