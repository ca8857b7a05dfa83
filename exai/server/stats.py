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
        #: requests and connections refused, by reason (``rate_limited``, ``overloaded``, …)
        self.rejections: Counter[str] = Counter()
        #: finished calls by outcome
        self.calls: Counter[str] = Counter()
        #: finished calls by (tool, outcome)
        self.by_tool: Counter[tuple[str, str]] = Counter()
        #: progress notifications dropped because a slow client's send queue was full
        self.progress_dropped = 0
