"""Prometheus metrics of one daemon, served at ``/metrics`` on the admin listener.

Each daemon has its own :class:`DaemonMetrics` (several daemons can run in one test process): a
:class:`prometheus_client.CollectorRegistry` with two kinds of figures:

* observed as they happen (histograms a part is handed): call latency, in-flight slot waits,
  loop stalls;
* read at scrape time from live state by collectors the composition root registers with
  :meth:`DaemonMetrics.add_collector` — the functions below, each given only the parts it
  reads: connections and refusals (:func:`connection_metrics`), calls and in-flight
  (:func:`call_metrics`), pending bytes and overload (:func:`pressure_metrics`), the loop
  (:func:`loop_metrics`), the round pacer (:func:`pacing_metrics`), memory
  (:func:`memory_metrics`), and whatever the services report through ``metrics_snapshot()``
  (:func:`service_metrics`) — breaker states and transitions, token-bucket waits and
  rejections, pool use, spool depth.

A service (providers, conversations) opts in by having ``metrics_snapshot() -> dict`` with any of
these keys::

    {"breakers": [BreakerStatistics, …],
     "buckets": {name: {"waits": int, "rejections": int}},
     "pools": {name: {"in_use": int, "size": int}},
     "spool": {"depth": int, "bytes": int, "writes": int}}
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exai.server.admission import Admission
from exai.server.budget import MemoryBudget
from exai.server.calls import CallRegistry
from exai.server.overload import OverloadManager
from exai.server.pacing import RoundPacer
from exai.server.readiness import Readiness
from exai.server.stalls import LoopProbe
from exai.server.stats import DaemonStats

__all__ = [
    "BREAKER_STATE_VALUE",
    "DaemonMetrics",
    "call_metrics",
    "connection_metrics",
    "loop_metrics",
    "memory_metrics",
    "pacing_metrics",
    "pressure_metrics",
    "service_metrics",
]

BREAKER_STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_STALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

#: a collector: the metric families of some live state, read at scrape time
CollectFn = Callable[[], Iterable[Metric]]


class DaemonMetrics:
    """The metrics registry of one daemon: its histograms and the collectors of live state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.call_duration = Histogram(
            "exai_call_duration_seconds",
            "Duration of tools/call executions.",
            ["tool", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.slot_wait = Histogram(
            "exai_inflight_slot_wait_seconds",
            "Time a tools/call waited for its per-session and global in-flight slots.",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.loop_stall = Histogram(
            "exai_loop_stall_seconds",
            "Times the event loop was blocked longer than the stall threshold "
            "(run-queue delay excluded).",
            buckets=_STALL_BUCKETS,
            registry=self.registry,
        )
        self._collector = _Collectors()
        self.registry.register(self._collector)

    def add_collector(self, collect: CollectFn) -> None:
        """Have ``collect()`` read at every scrape (in the order added)."""
        self._collector.functions.append(collect)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _Collectors(Collector):
    def __init__(self) -> None:
        self.functions: list[CollectFn] = []

    def collect(self) -> Iterator[Metric]:
        for fn in self.functions:
            yield from fn()


def connection_metrics(
    admission: Admission, stats: DaemonStats, sessions: Callable[[], int]
) -> Iterator[Metric]:
    """Open and accepted connections, refusals before the upgrade and of requests, sessions."""
    g = GaugeMetricFamily("exai_connections_open", "Open MCP WebSocket connections.")
    g.add_metric([], admission.open)
    yield g
    c = CounterMetricFamily(
        "exai_connections_accepted", "Connections admitted since start.", labels=[]
    )
    c.add_metric([], admission.accepted_total)
    yield c
    # every connection refused before a session began (DaemonStats.refuse_connection: the
    # listener's refusals, a first head's 400/408/431/505 and its handshake_timeout included),
    # with the caps Admission counts; a door's refusals of requests and calls are not
    # connections' (they are in exai_rejections, as every refusal is)
    # The admin listener's refused connections are in both, with listener="admin" (the MCP
    # listener's, and its doors' refusals of requests and calls, with "mcp").
    rej = CounterMetricFamily(
        "exai_connections_rejected",
        "Connections refused before a session began (WebSocket or HTTP), by listener and reason.",
        labels=["listener", "reason"],
    )
    reasons = collections.Counter(admission.rejected)
    reasons.update(stats.connections_rejected)
    for reason, n in sorted(reasons.items()):
        rej.add_metric(["mcp", reason], n)
    for reason, n in sorted(stats.admin_rejected.items()):
        rej.add_metric(["admin", reason], n)
    yield rej
    r = CounterMetricFamily(
        "exai_rejections",
        "Refusals of connections, requests and calls, by listener and reason.",
        labels=["listener", "reason"],
    )
    for reason, n in sorted(stats.rejections.items()):
        r.add_metric(["mcp", reason], n)
    for reason, n in sorted(stats.admin_rejected.items()):
        r.add_metric(["admin", reason], n)
    yield r
    sess = GaugeMetricFamily(
        "exai_sessions",
        "Open sessions: WebSocket and op-protocol sessions after the upgrade, HTTP connections.",
    )
    sess.add_metric([], sessions())
    yield sess


def call_metrics(
    stats: DaemonStats, calls: CallRegistry, *, max_inflight: int, session_max_inflight: int
) -> Iterator[Metric]:
    """Finished calls by tool and outcome, running calls, the in-flight limits."""
    finished = CounterMetricFamily(
        "exai_calls",
        "Finished tools/call executions, by tool and outcome.",
        labels=["tool", "outcome"],
    )
    for (tool, outcome), n in sorted(stats.by_tool.items()):
        finished.add_metric([tool, outcome], n)
    yield finished
    infl = GaugeMetricFamily("exai_inflight_calls", "tools/call executions running now.")
    infl.add_metric([], len(calls.running))
    yield infl
    lim = GaugeMetricFamily("exai_inflight_limit", "In-flight limits.", labels=["scope"])
    lim.add_metric(["global"], max_inflight)
    lim.add_metric(["session"], session_max_inflight)
    yield lim


def pacing_metrics(pacer: RoundPacer) -> Iterator[Metric]:
    """Calls' starts and answer reads the round pacer held for a later scheduler round (its
    round had run past ``round_budget_s``), and those waiting now."""
    c = CounterMetricFamily(
        "exai_paced_steps",
        "Call starts and answer reads that waited for a later scheduler round (the round's "
        "time budget, EXAI_ROUND_BUDGET_S, was spent).",
    )
    c.add_metric([], pacer.waited)
    yield c
    g = GaugeMetricFamily("exai_paced_waiting", "Call starts and answer reads waiting now.")
    g.add_metric([], pacer.waiting)
    yield g


def pressure_metrics(
    readiness: Readiness, budget: MemoryBudget, calls: CallRegistry
) -> Iterator[Metric]:
    """Whether admission is suspended, the pending bytes and their budget, stored results."""
    over = GaugeMetricFamily(
        "exai_overloaded", "1 while admission is suspended (memory budget or draining)."
    )
    over.add_metric([], 1 if (readiness.overloaded_reason or readiness.draining) else 0)
    yield over
    pend = GaugeMetricFamily(
        "exai_pending_bytes",
        "Bytes of frames being received, pending requests and unwritten answers.",
    )
    pend.add_metric([], budget.charged_bytes)
    yield pend
    plim = GaugeMetricFamily("exai_pending_limit_bytes", "Budget of exai_pending_bytes.")
    plim.add_metric([], budget.limit_bytes)
    yield plim
    store = GaugeMetricFamily("exai_result_store_bytes", "Bytes of stored finished results.")
    store.add_metric([], calls.nbytes)
    yield store


def loop_metrics(detector: LoopProbe) -> Iterator[Metric]:
    """The longest event-loop stall and the number of stalls (:class:`LoopProbe`)."""
    mx = GaugeMetricFamily(
        "exai_loop_max_stall_seconds",
        "Longest time the event loop was blocked since start (run-queue delay excluded).",
    )
    mx.add_metric([], detector.max_stall_s)
    yield mx
    st = CounterMetricFamily(
        "exai_loop_stalls", "Event-loop stalls over the stall threshold since start."
    )
    st.add_metric([], detector.stall_count)
    yield st


def memory_metrics(memory: OverloadManager) -> Iterator[Metric]:
    """The memory the watermarks watch, and its limit."""
    mem = GaugeMetricFamily("exai_memory_used_bytes", "Memory the watermarks watch.")
    mem.add_metric([], memory.used_bytes)
    yield mem
    mlim = GaugeMetricFamily("exai_memory_limit_bytes", "Memory limit watched.")
    mlim.add_metric([], memory.limit_bytes)
    yield mlim


def service_metrics(services: Mapping[str, Any]) -> Iterator[Metric]:
    """What each service reports through ``metrics_snapshot()`` (see the module docstring)."""
    state = GaugeMetricFamily(
        "exai_breaker_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
        labels=["breaker"],
    )
    trans = CounterMetricFamily(
        "exai_breaker_transitions", "Breaker state changes.", labels=["breaker"]
    )
    brej = CounterMetricFamily(
        "exai_breaker_rejections", "Calls refused by an open breaker.", labels=["breaker"]
    )
    bwait = CounterMetricFamily(
        "exai_bucket_waits", "Acquisitions that had to wait for tokens.", labels=["bucket"]
    )
    brj = CounterMetricFamily(
        "exai_bucket_rejections", "Acquisitions refused by a token bucket.", labels=["bucket"]
    )
    pool_use = GaugeMetricFamily(
        "exai_pool_in_use", "Connections of a pool in use.", labels=["pool"]
    )
    pool_size = GaugeMetricFamily("exai_pool_size", "Size of a pool.", labels=["pool"])
    spool_depth = GaugeMetricFamily("exai_spool_depth", "Records waiting in the local spool.")
    spool_bytes = GaugeMetricFamily("exai_spool_bytes", "Bytes in the local spool.")
    spool_writes = CounterMetricFamily("exai_spool_writes", "Records written to the spool.")
    seen_spool = False
    for service in services.values():
        snap_fn = getattr(service, "metrics_snapshot", None)
        if snap_fn is None:
            continue
        snap: dict[str, Any] = snap_fn()
        for b in snap.get("breakers", ()):
            state.add_metric([b.name], BREAKER_STATE_VALUE.get(b.state, 0))
            trans.add_metric([b.name], b.transitions)
            brej.add_metric([b.name], b.rejections)
        for name, figures in snap.get("buckets", {}).items():
            bwait.add_metric([name], figures.get("waits", 0))
            brj.add_metric([name], figures.get("rejections", 0))
        for name, figures in snap.get("pools", {}).items():
            pool_use.add_metric([name], figures.get("in_use", 0))
            pool_size.add_metric([name], figures.get("size", 0))
        if "spool" in snap:
            seen_spool = True
            spool_depth.add_metric([], snap["spool"].get("depth", 0))
            spool_bytes.add_metric([], snap["spool"].get("bytes", 0))
            spool_writes.add_metric([], snap["spool"].get("writes", 0))
    yield from (state, trans, brej, bwait, brj, pool_use, pool_size)
    if seen_spool:
        yield from (spool_depth, spool_bytes, spool_writes)
