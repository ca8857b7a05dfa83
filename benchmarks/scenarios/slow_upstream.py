"""Slow upstream: 2,000 concurrent calls (500 short) against a mock that takes 2 s per answer.

The daemon's limits are opened wide enough for all of them (global and provider concurrency,
connection pool, slot wait), so the figure is what the daemon itself adds when it holds
thousands of calls at once. A connection's second and later concurrent calls also take one of
the slots all connections share — three quarters of ``max_inflight``
(:class:`exai.server.admission.CallSlots`) — so ``max_inflight`` is ``⌈4n/3⌉``. With
``max_inflight = n`` (this scenario's setting until issue 18's part 4) only 1,540 of the 2,000
calls (385 of 500) could run at once; the other 460 (115) waited for the first answers, a whole
second upstream latency. ``slot_waits_over_1s`` (from the daemon's
``exai_inflight_slot_wait_seconds``) counts the calls that still took that long to get their
slots: a limit left closed shows there (460 at 2,000 before), but so does a CPU-starved loop,
where taking a free slot (one checkpoint) can wait a whole scheduler round of 2,000 calls.

The result holds the wall time from the first request sent to the last answer received, every
call's latency, the daemon's RSS (peak and per call in flight), and errors; and
``cpu_s_in_storm``: the CPU seconds (user + system) of each of the three processes — the
daemon, the mock upstream, the load generator — over that same window (sampled every 50 ms),
so that on a small machine one can see whose CPU the storm waits for. ``phases`` splits the wall
time at the upstream (the mock runs as :mod:`benchmarks.load.traced_mock`, which notes when each
request reached it): *intake* until the last request reached the upstream, then its latency,
and *drain* from the first answer received to the last — each with the CPU of each process.

The load process opens ``sessions`` MCP sessions first, then each session fires
``per_session`` calls at once and waits for their answers.

Target: all calls done within 1.25 × the upstream latency, none failed.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any

from benchmarks.daemon import (
    LoadProcess,
    RssSampler,
    chat_unavailable,
    count,
    exai_daemon,
    latency_summary,
    loop_stalls,
    machine_load,
    mock_upstream,
    plot_name,
    pyplot,
    run_load,
    save_figure,
)

NAME = "slow_upstream"
DESCRIPTION = (
    "2,000 concurrent chat calls (500 short) with 2 s upstream latency: wall time to complete "
    "all, RSS, errors"
)

UPSTREAM_LATENCY_S = 2.0
PER_SESSION = 50


def run(full: bool) -> dict[str, Any]:
    n = 2_000 if full else 500
    sessions = n // PER_SESSION
    settings = daemon_settings(n)
    max_inflight = settings["max_inflight"]
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "calls": n,
            "sessions": sessions,
            "calls_per_session": PER_SESSION,
            "upstream_latency_s": UPSTREAM_LATENCY_S,
            "max_inflight": max_inflight,
            "shared_slots": max_inflight * 3 // 4,
        },
    }
    trace_dir = tempfile.TemporaryDirectory(prefix="exai-bench-trace-")
    trace_path = os.path.join(trace_dir.name, "mock-trace.json")
    with (
        trace_dir,
        mock_upstream(latency_s=UPSTREAM_LATENCY_S, trace_path=trace_path) as mock,
        exai_daemon(
            mock=mock,
            provider={"max_concurrency": n, "pool_max": n, "stall_timeout_s": 60},
            **settings,
        ) as d,
    ):
        result["settings"]["daemon_env"] = d.env_settings
        if full:
            result["floor_bare_httpx"] = _bare_httpx(mock.base_url, n)
        why = chat_unavailable(d)
        if why is not None:
            result.update(
                measured=False,
                reason=why,
                targets={"measured": False, "reason": why},
            )
            return result
        time.sleep(0.3)
        rss_before = d.rss_bytes()
        t_wall0 = time.time()
        with RssSampler(d.pid, 0.05) as sampler, CpuSampler() as cpu:
            cpu.watch("daemon", d.pid)
            cpu.watch("mock", mock.pid)
            lp = LoadProcess(
                "closed",
                {
                    "mode": "mcp",
                    "url": d.url,
                    "connections": sessions,
                    "inflight": PER_SESSION,
                    "calls_per_worker": 1,
                    "warmup_s": 0,
                    "duration_s": 120,
                },
            )
            cpu.watch("load", lp.proc.pid)
            res = lp.result(300)
            time.sleep(0.3)
        rss_after = d.rss_bytes()
        result["loop_stall"] = loop_stalls(d, t_wall0)
        result["slot_waits_over_1s"] = slot_waits_over(d.metrics_text(), 1.0)
        mock.stop()  # it writes its trace
        trace = _read_trace(trace_path)

    recs = res["records"]
    starts = recs["t"]
    ends = [t + lat for t, lat in zip(starts, recs["lat"], strict=True)]
    result["phases"] = phases(starts, ends, trace, cpu) if starts else None
    outcomes = count(recs["outcome"])
    failed = sum(v for k, v in outcomes.items() if k != "ok")
    wall = max(ends) - min(starts) if starts else None
    bound = 1.25 * UPSTREAM_LATENCY_S
    result.update(
        {
            "calls_made": len(starts),
            "outcomes": outcomes,
            "failed": failed,
            "exceptions": res["exceptions"],
            "wall_time_s": None if wall is None else round(wall, 3),
            "send_spread_s": round(max(starts) - min(starts), 3) if starts else None,
            "latency": latency_summary(recs["lat"]),
            "rss_mb": {
                "before": round(rss_before / 2**20, 1),
                "peak": round(sampler.peak / 2**20, 1),
                "after": round(rss_after / 2**20, 1),
            },
            "rss_per_call_in_flight_kb": round((sampler.peak - rss_before) / max(n, 1) / 1024, 1),
            "cpu_s_in_storm": cpu.between(min(starts), max(ends)) if starts else None,
        }
    )
    result["targets"] = {
        "all_done_within_1.25x_upstream_latency": {
            "value_s": result["wall_time_s"],
            "bound_s": bound,
            "met": wall is not None and wall <= bound and len(starts) == n,
            "note": None if full else f"{n} calls (short form), not 2,000",
        },
        "none_failed": {"value": failed, "met": failed == 0 and len(starts) == n},
    }
    result["plots"] = [_plot(starts, ends, sampler.samples, n)]
    return result


def daemon_settings(n: int) -> dict[str, Any]:
    """The daemon's settings for ``n`` calls at once, :data:`PER_SESSION` per connection: every
    limit open. Each call takes a daemon slot, and each after its connection's first one of the
    shared slots too (three quarters of ``max_inflight``): so ``max_inflight`` is ``⌈4n/3⌉``."""
    return {
        "max_inflight": -(-4 * n // 3),
        "session_max_inflight": PER_SESSION,
        "session_rate_per_s": 1_000_000,
        "session_burst": 1_000_000,
        "slot_wait_s": 30,
        "call_timeout_s": 60,
    }


def _read_trace(path: str) -> dict[str, list[float]] | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def phases(
    starts: list[float],
    ends: list[float],
    trace: dict[str, list[float]] | None,
    cpu: CpuSampler,
) -> dict[str, Any]:
    """The storm's wall time split at the upstream (times from the first request sent):

    *intake* — until the last request reached the upstream (the mock's trace); *wait* — the
    upstream's latency; *drain* — from the first answer received to the last. With each phase,
    the CPU seconds each process spent in it (intake and drain overlap when the intake takes
    longer than the upstream's latency; ``arrived_after_first_answer`` counts those requests).
    """
    t0, first_answer, last_answer = min(starts), min(ends), max(ends)
    out: dict[str, Any] = {
        "first_answer_s": round(first_answer - t0, 3),
        "drain_s": round(last_answer - first_answer, 3),
        "cpu_s_in_drain": cpu.between(first_answer, last_answer),
    }
    if trace is None:
        out["intake"] = "no trace from the mock"
        return out
    # the trace also holds the warm-up call and, in the full form, the bare-httpx floor's calls
    arrived = sorted(t for t in trace.get("arrived", []) if t >= t0)
    if not arrived:
        out["intake"] = "no request of the storm in the mock's trace"
        return out
    out.update(
        {
            "reached_upstream": len(arrived),
            "first_reached_upstream_s": round(arrived[0] - t0, 3),
            "intake_s": round(arrived[-1] - t0, 3),
            "intake_p50_s": round(arrived[len(arrived) // 2] - t0, 3),
            "arrived_after_first_answer": sum(t > first_answer for t in arrived),
            "cpu_s_in_intake": cpu.between(t0, arrived[-1]),
        }
    )
    return out


def slot_waits_over(metrics: str | None, bound_s: float) -> int | None:
    """Calls that waited longer than ``bound_s`` (a bucket bound of the histogram) for their
    in-flight slots, from the daemon's ``/metrics`` text (``None`` when it cannot be read)."""
    if metrics is None:
        return None
    total = within = None
    bucket = f'exai_inflight_slot_wait_seconds_bucket{{le="{float(bound_s)}"}}'
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "exai_inflight_slot_wait_seconds_count":
            total = float(value)
        elif name == bucket:
            within = float(value)
    if total is None or within is None:
        return None
    return int(total - within)


class CpuSampler:
    """Samples the CPU time (user + system) of named processes every ``interval_s`` in a thread.

    :meth:`between` gives each process's CPU seconds between two ``time.monotonic()`` instants
    (from the samples nearest them), so the storm's CPU can be split by process: on 2 cores,
    whether the daemon, the mock or the load generator is what the storm waits for.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: dict[str, list[tuple[float, float]]] = {}
        self._procs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        import psutil

        with self._lock:
            self._procs[name] = psutil.Process(pid)
            self.samples[name] = []
        self._sample_one(name)

    def _sample_one(self, name: str) -> None:
        with self._lock:
            proc = self._procs.get(name)
        if proc is None:
            return
        try:
            t = proc.cpu_times()
        except Exception:
            return
        self.samples[name].append((time.monotonic(), t.user + t.system))

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in list(self._procs):
                self._sample_one(name)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        out: dict[str, Any] = {"window_s": round(t1 - t0, 3)}
        for name, samples in self.samples.items():
            inside = [
                (t, c) for t, c in samples if t0 - self.interval_s <= t <= t1 + self.interval_s
            ]
            if len(inside) < 2:
                out[name] = None
                continue
            out[name] = round(inside[-1][1] - inside[0][1], 3)
        return out


def _bare_httpx(base_url: str, n: int) -> dict[str, Any]:
    """The same ``n`` calls from one bare ``httpx.AsyncClient`` (pool of ``n``) to the mock."""
    res = run_load(
        "closed",
        {
            "mode": "httpx",
            "url": base_url,
            "connections": n,
            "inflight": 1,
            "calls_per_worker": 1,
            "warmup_s": 0,
            "duration_s": 120,
        },
        limit_s=300,
    )
    recs = res["records"]
    ends = [t + lat for t, lat in zip(recs["t"], recs["lat"], strict=True)]
    return {
        "wall_time_s": round(max(ends) - min(recs["t"]), 3) if ends else None,
        "latency": latency_summary(recs["lat"]),
        "outcomes": count(recs["outcome"]),
    }


def _plot(starts: list[float], ends: list[float], rss: list[tuple[float, int]], n: int) -> str:
    plt = pyplot()
    t0 = min(starts)
    fig, ax1 = plt.subplots(figsize=(10, 4.5))
    events = sorted([(s - t0, 1) for s in starts] + [(e - t0, -1) for e in ends])
    xs, ys, level = [], [], 0
    for t, d in events:
        level += d
        xs.append(t)
        ys.append(level)
    ax1.step(xs, ys, where="post", label="calls in flight (client view)")
    ax1.set_xlabel("time since first request (s)")
    ax1.set_ylabel("calls in flight")
    ax1.axvline(UPSTREAM_LATENCY_S, color="grey", ls=":", label="upstream latency")
    ax1.axvline(1.25 * UPSTREAM_LATENCY_S, color="red", ls="--", label="target (1.25×)")
    ax2 = ax1.twinx()
    ax2.plot(
        [t - t0 for t, _ in rss if t >= t0 - 0.5],
        [b / 2**20 for t, b in rss if t >= t0 - 0.5],
        color="tab:red",
        alpha=0.7,
    )
    ax2.set_ylabel("daemon RSS (MiB)", color="tab:red")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"slow upstream: {n} concurrent calls, {UPSTREAM_LATENCY_S:g} s upstream latency")
    ax1.grid(True, alpha=0.3)
    return save_figure(fig, plot_name(NAME))
