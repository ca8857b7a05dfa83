"""Flood isolation: one client floods; do the others notice?

Processes: the mock upstream, the daemon with its **default** per-session limits (message token
bucket, abuse limit, in-flight slots — the protections under test), a process with a few
well-behaved sessions making ``tools/call chat`` calls with a pause between them the whole time,
and a flooder process that sends ``tools/call`` frames back to back without waiting for answers
(reconnecting at once when the daemon closes it).

Phases on one timeline: baseline (the well-behaved sessions alone), then the flood. The figure
is the well-behaved sessions' p99 during the flood against their p99 without it.

Note: on a 2-core machine the flooder's own CPU competes with the daemon for the same cores;
that is part of what a flood does, and the figure includes it.

Target: the other clients' p99 at most 2 × their p99 without the flood.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.daemon import (
    LoadProcess,
    StallPoller,
    cdf_points,
    chat_unavailable,
    count,
    exai_daemon,
    health,
    latency_summary,
    loop_stalls,
    machine_load,
    mock_upstream,
    plot_name,
    pyplot,
    save_figure,
)

NAME = "flood"
DESCRIPTION = (
    "one client floods requests as fast as it can; the other clients' p99 against their p99 "
    "without the flood"
)

SESSIONS = 4
THINK_S = 0.025


def run(full: bool) -> dict[str, Any]:
    baseline_s = 15.0 if full else 6.0
    flood_s = 15.0 if full else 6.0
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "well_behaved_sessions": SESSIONS,
            "think_s": THINK_S,
            "baseline_s": baseline_s,
            "flood_s": flood_s,
            "daemon_limits": "defaults (EXAI_SESSION_RATE_PER_S, _BURST, _MAX_INFLIGHT, …)",
        },
    }
    with mock_upstream(latency_s=0.0) as mock, exai_daemon(mock=mock) as d:
        result["settings"]["daemon_env"] = d.env_settings
        why = chat_unavailable(d)
        tool, arguments = "chat", {"prompt": "ping", "model": "mock-fast"}
        if why is not None:
            tool, arguments = "version", {}
            result["tool_note"] = f"chat unavailable ({why}); every call is to version"
        result["settings"]["tool"] = tool
        t_wall0 = time.time()
        good = LoadProcess(
            "closed",
            {
                "mode": "mcp",
                "url": d.url,
                "connections": SESSIONS,
                "inflight": 1,
                "think_s": THINK_S,
                "warmup_s": 1.0,
                "until_stop": True,
                "tool": tool,
                "arguments": arguments,
            },
        )
        ready = good.wait_event("ready", 60)
        t_base = ready["t"] + 1.0
        time.sleep(1.0 + baseline_s)
        t_flood = time.monotonic()
        with StallPoller(d, 0.5) as poller:
            flood = run_flood(d.url, flood_s, tool, arguments)
            t_flood_end = time.monotonic()
        time.sleep(1.0)  # the well-behaved sessions go on a moment after the flood
        good.send("stop")
        g = good.result(60)
        time.sleep(0.5)
        status = d.status()
        result["loop_stall"] = loop_stalls(d, t_wall0, poller=poller)
        result["daemon"] = health(d)

    recs = g["records"]
    rows = list(zip(recs["t"], recs["lat"], recs["outcome"], strict=True))
    base = [r for r in rows if t_base <= r[0] < t_flood]
    during = [r for r in rows if t_flood <= r[0] < t_flood_end]

    def summary(sel: list[tuple[float, float, str]]) -> dict[str, Any]:
        s = latency_summary([r[1] for r in sel if r[2] == "ok"])
        s["outcomes"] = count([r[2] for r in sel])
        return s

    b, f = summary(base), summary(during)
    result.update(
        {
            "well_behaved": {"baseline": b, "during_flood": f},
            "flooder": flood,
            "daemon_rejections": ((status or {}).get("daemon") or {}).get("rejections"),
        }
    )
    rat = round(f["p99_ms"] / b["p99_ms"], 2) if b.get("p99_ms") and f.get("p99_ms") else None
    errors_during = sum(v for k, v in f["outcomes"].items() if k != "ok")
    result["targets"] = {
        "others_p99_at_most_2x_without_flood": {
            "value": rat,
            "met": rat is not None and rat <= 2.0 and errors_during == 0,
            "errors_of_well_behaved_during_flood": errors_during,
        },
        "daemon_survived": {"met": bool(result["daemon"].get("alive"))},
    }
    result["plots"] = [_plot(base, during, rows, t_flood, t_flood_end)]
    return result


def run_flood(url: str, duration_s: float, tool: str, arguments: dict[str, Any]) -> dict:
    lp = LoadProcess(
        "flood", {"url": url, "duration_s": duration_s, "tool": tool, "arguments": arguments}
    )
    try:
        res = lp.result(duration_s + 60)
    finally:
        lp.kill()
    return {k: v for k, v in res.items() if k != "event"}


def _plot(
    base: list[tuple[float, float, str]],
    during: list[tuple[float, float, str]],
    rows: list[tuple[float, float, str]],
    t_flood: float,
    t_flood_end: float,
) -> str:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for sel, label in ((base, "without flood"), (during, "during flood")):
        xs, ys = cdf_points([r[1] for r in sel if r[2] == "ok"])
        ax1.plot(xs, ys, label=label)
    ax1.set_xscale("log")
    ax1.set_xlabel("well-behaved call latency (ms, log)")
    ax1.set_ylabel("fraction of calls")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    t0 = rows[0][0] if rows else 0.0
    ax2.scatter([r[0] - t0 for r in rows], [r[1] * 1000 for r in rows], s=3)
    ax2.axvspan(t_flood - t0, t_flood_end - t0, color="red", alpha=0.15, label="flood")
    ax2.set_yscale("log")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("latency (ms, log)")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    fig.suptitle("flood isolation: well-behaved sessions with and without a flooding client")
    return save_figure(fig, plot_name(NAME))
