"""The daemon's counters: refusals by reason, calls by outcome (and by tool), dropped progress.

One :class:`DaemonStats` per daemon, handed to the parts that count (the listener, sessions,
the call runner) and read by ``status`` and ``/metrics``. Plain counters: nothing here waits.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["DaemonStats"]


class DaemonStats:
    """Counters for ``status`` and ``/metrics``."""

    def __init__(self) -> None:
        #: requests, calls and connections refused, by reason (``rate_limited``, ``overloaded``,
        #: …): ``exai_rejections``
        self.rejections: Counter[str] = Counter()
        #: connections refused before a session began, by reason (:meth:`refuse_connection`;
        #: with the caps :class:`~exai.server.admission.Admission` counts:
        #: ``exai_connections_rejected``)
        self.connections_rejected: Counter[str] = Counter()
        #: the admin listener's refused connections, by reason (:meth:`refuse_admin_connection`:
        #: in both of the above metrics with ``listener="admin"``, the rest with ``"mcp"``)
        self.admin_rejected: Counter[str] = Counter()
        #: finished calls by outcome
        self.calls: Counter[str] = Counter()
        #: finished calls by (tool, outcome)
        self.by_tool: Counter[tuple[str, str]] = Counter()
        #: progress notifications dropped because a slow client's send queue was full
        self.progress_dropped = 0

    def refuse_connection(self, reason: str) -> None:
        """Count a connection refused before a session began: by the listener before any door
        took it (a first head malformed or cut at its bound, a refused upgrade, readiness, the
        deployment's cap, …) or by the old op protocol's ``hello``. Counted in
        :attr:`rejections` too; a door's refusal of a request or a call is counted there
        only."""
        self.rejections[reason] += 1
        self.connections_rejected[reason] += 1

    def refuse_admin_connection(self, reason: str) -> None:
        """Count a connection the admin listener refused (a first head's 400/408/431/505, one
        that sent nothing in time, one closed for a newer: ``evicted``)."""
        self.admin_rejected[reason] += 1
