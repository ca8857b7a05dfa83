"""Admission: connection caps (:class:`Admission`) and the daemon-wide call slots
(:class:`CallSlots`).

A connection slot is taken before the WebSocket upgrade and released in ``finally`` by the code
that took it, so a client that vanishes mid-handshake or mid-session gives its slot back. A call
takes its session's slot, then (for a connection's second and later concurrent calls) a shared
slot, its client identity's and the daemon's — see :meth:`exai.server.session.Session._launch`.
"""

from __future__ import annotations

from collections import Counter

import trio

from exai.config import Settings
from exai.resilience import TokenBucket

__all__ = ["Admission", "CallSlots"]


class Admission:
    """Counts open connections in all and per peer address.

    Args:
        max_connections: open connections allowed in all.
        max_per_ip: open connections allowed from one address.
    """

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.open = 0
        self.per_ip: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.accepted_total = 0

    def try_admit(self, ip: str) -> str | None:
        """Take a slot for ``ip``. Returns None when admitted, else the reason it was refused
        (``"max_connections"`` or ``"max_connections_per_ip"``)."""
        if self.open >= self.max_connections:
            self.rejected["max_connections"] += 1
            return "max_connections"
        if self.per_ip[ip] >= self.max_per_ip:
            self.rejected["max_connections_per_ip"] += 1
            return "max_connections_per_ip"
        self.open += 1
        self.per_ip[ip] += 1
        self.accepted_total += 1
        return None

    def release(self, ip: str) -> None:
        """Give back the slot ``try_admit`` took for ``ip``."""
        self.open -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    def snapshot(self) -> dict[str, object]:
        return {
            "open": self.open,
            "max_connections": self.max_connections,
            "max_connections_per_ip": self.max_per_ip,
            "addresses": len(self.per_ip),
            "accepted_total": self.accepted_total,
            "rejected": dict(self.rejected),
        }


class CallSlots:
    """The limiters every session's calls share, and the per-identity message buckets.

    Attributes:
        inflight: ``max_inflight`` calls running in the daemon.
        shared_inflight: what connections' second and later concurrent calls share: three
            quarters of the daemon's slots, so a quarter stays for connections running one
            call each.

    Per-identity limiters and buckets are made on first use and kept for the daemon's life
    (one per configured identity: their number is bounded by the tokens table).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.inflight = trio.CapacityLimiter(settings.max_inflight)
        self.shared_inflight = trio.CapacityLimiter(max(1, settings.max_inflight * 3 // 4))
        self._identity_buckets: dict[str, TokenBucket] = {}
        self._identity_limiters: dict[str, trio.CapacityLimiter] = {}

    def identity_bucket(self, name: str) -> TokenBucket | None:
        """The message bucket shared by every connection of one client identity."""
        s = self._settings
        if s.identity_rate_per_s <= 0:
            return None
        bucket = self._identity_buckets.get(name)
        if bucket is None:
            bucket = TokenBucket(s.identity_rate_per_s, s.identity_burst)
            self._identity_buckets[name] = bucket
        return bucket

    def identity_limiter(self, name: str) -> trio.CapacityLimiter | None:
        """The in-flight limiter shared by every connection of one client identity."""
        if self._settings.identity_max_inflight <= 0:
            return None
        lim = self._identity_limiters.get(name)
        if lim is None:
            lim = trio.CapacityLimiter(self._settings.identity_max_inflight)
            self._identity_limiters[name] = lim
        return lim
