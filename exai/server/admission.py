"""Connection admission: a global cap and a per-address cap, counted exactly.

A slot is taken before the WebSocket upgrade and released in ``finally`` by the code that took
it, so a client that vanishes mid-handshake or mid-session gives its slot back.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Admission"]


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
