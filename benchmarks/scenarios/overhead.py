"""Overhead: ``tools/call chat`` through exai against a zero-latency mock, and its floor — over
the WebSocket door and over the Streamable HTTP door (JSON and SSE answers), in the same run.

Three processes: the mock upstream (no injected latency), the daemon, and a closed-loop load
process (each worker sends a call and waits for its answer). At concurrency 1 one session (one
keep-alive HTTP connection) makes one call at a time; at concurrency 64, 64 of them each keep
one call in flight. The HTTP calls are 2026-07-28 (stateless) POSTs to ``/mcp`` from a
hand-written keep-alive HTTP/1.1 client (``mcp_http`` in :mod:`benchmarks.load.closed`):
``Accept: application/json`` for JSON answers; for SSE the call asks for progress and accepts
``text/event-stream``, so its answer streams (a progress notification, then the response).

The floor is measured in the same run with the same load client code:

* ``echo``: the same request frame to a bare trio-websocket echo server (its own process);
* ``http_echo`` / ``http_echo_sse``: the same POST to a bare h11 echo server (its own process,
  :mod:`benchmarks.load.http_echo_server`), answered as JSON, or as an SSE stream of one
  notification and the echoed request;
* ``httpx``: a bare ``httpx.AsyncClient`` POST of the provider's body to the same mock.

For context (not part of the issue's floor) the same POST over hand-written keep-alive HTTP/1.1
(``http_raw``): the exchange without a client library, which shows what httpx's connection pool
costs at concurrency 64.

A call through exai does both (the client↔daemon round trip and the daemon↔mock HTTP exchange),
so the floor latency of one call is ``echo + httpx`` at each percentile (``http_echo + httpx``
for the HTTP door, ``http_echo_sse + httpx`` for its SSE answers), and the floor throughput at
concurrency 64 is ``1 / (1/echo_rate + 1/httpx_rate)`` (the two kinds of work done one after the
other for each call). Ratios are exai / floor.

Targets: p50 ≤ 1.5 × floor at concurrency 1; calls/s ≥ 0.5 × floor at concurrency 64.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.daemon import (
    cdf_points,
    chat_unavailable,
    count,
    echo_server,
    exai_daemon,
    http_echo_server,
    latency_summary,
    loop_stalls,
    machine_load,
    mock_upstream,
    plot_name,
    process_rss_mb,
    pyplot,
    ratio,
    run_load,
    save_figure,
)

NAME = "overhead"
DESCRIPTION = (
    "tools/call chat vs a zero-latency mock at concurrency 1 and 64, over WebSocket and over "
    "Streamable HTTP (JSON and SSE): p50/p95/p99 and calls/s, against a floor (bare "
    "trio-websocket or h11 echo + bare httpx call) measured in the same run"
)
#: (exai series, its client↔daemon floor series, label) of each door
DOORS = (
    ("exai", "echo", "WebSocket"),
    ("exai_http", "http_echo", "HTTP, JSON answers"),
    ("exai_http_sse", "http_echo_sse", "HTTP, SSE answers"),
)

PROMPT = "ping"


def _measure(
    mode: str, url: str, concurrency: int, duration_s: float, warmup_s: float, **extra: Any
) -> dict:
    res = run_load(
        "closed",
        {
            "mode": mode,
            "url": url,
            "connections": concurrency,
            "inflight": 1,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "prompt": PROMPT,
            "model": "mock-fast",
            **extra,
        },
    )
    recs = res["records"]
    ok = [lat for lat, o in zip(recs["lat"], recs["outcome"], strict=True) if o == "ok"]
    window = res["t_end"] - res["measure_from"]
    summary = latency_summary(ok)
    summary["calls_per_s"] = round(len(ok) / window, 1) if window > 0 else None
    summary["not_ok"] = {k: v for k, v in count(recs["outcome"]).items() if k != "ok"}
    summary["exceptions"] = res["exceptions"]
    meter = res.get("meter")
    if meter and meter.get("completed"):
        # the daemon's CPU per completed call: a figure that holds on a shared machine
        pid = str(extra["cpu_pids"][0])
        summary["daemon_cpu_ms_per_call"] = round(
            1000 * meter["cpu_s"].get(pid, 0.0) / meter["completed"], 3
        )
    return {"summary": summary, "lat": ok}


def _floor(echo: dict, httpx: dict) -> dict[str, Any]:
    e, h = echo["summary"], httpx["summary"]
    out: dict[str, Any] = {}
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        out[key] = round(e[key] + h[key], 3) if e.get(key) and h.get(key) else None
    er, hr = e.get("calls_per_s"), h.get("calls_per_s")
    out["calls_per_s"] = round(1 / (1 / er + 1 / hr), 1) if er and hr else None
    return out


def run(full: bool) -> dict[str, Any]:
    duration_s = 20.0 if full else 3.0
    warmup_s = 2.0 if full else 0.5
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "duration_s_per_series": duration_s,
            "warmup_s": warmup_s,
            "concurrency": [1, 64],
            "mock_latency_s": 0.0,
            "prompt": PROMPT,
        },
    }
    series: dict[str, dict] = {}
    with mock_upstream(latency_s=0.0) as mock:
        with echo_server() as echo, http_echo_server() as hecho:
            h_url = hecho.found["url"]
            for c in (1, 64):
                series[f"echo_c{c}"] = _measure("echo", echo.found["url"], c, duration_s, warmup_s)
                series[f"http_echo_c{c}"] = _measure("mcp_http", h_url, c, duration_s, warmup_s)
                series[f"http_echo_sse_c{c}"] = _measure(
                    "mcp_http", h_url, c, duration_s, warmup_s, stream=True
                )
                series[f"httpx_c{c}"] = _measure("httpx", mock.base_url, c, duration_s, warmup_s)
                series[f"raw_c{c}"] = _measure("http_raw", mock.base_url, c, duration_s, warmup_s)
        with exai_daemon(
            mock=mock,
            provider={"max_concurrency": 128, "pool_max": 128},
            max_inflight=256,
            session_max_inflight=8,
            session_rate_per_s=1_000_000,
            session_burst=1_000_000,
            max_connections=1024,
        ) as d:
            result["settings"]["daemon_env"] = d.env_settings
            why = chat_unavailable(d)
            t0 = time.time()
            if why is None:
                http_url = d.url.replace("ws://", "http://", 1)
                cpu = {"cpu_pids": [d.pid]}
                for c in (1, 64):
                    series[f"exai_c{c}"] = _measure("mcp", d.url, c, duration_s, warmup_s, **cpu)
                    series[f"exai_http_c{c}"] = _measure(
                        "mcp_http", http_url, c, duration_s, warmup_s, **cpu
                    )
                    series[f"exai_http_sse_c{c}"] = _measure(
                        "mcp_http", http_url, c, duration_s, warmup_s, stream=True, **cpu
                    )
            result["daemon_rss_mb_after"] = process_rss_mb(d)
            result["loop_stall"] = loop_stalls(d, t0)

    floor = {c: _floor(series[f"echo_c{c}"], series[f"httpx_c{c}"]) for c in (1, 64)}
    # each door's floor: its own client↔daemon echo + the same daemon↔mock httpx exchange
    door_floor = {
        (name, c): _floor(series[f"{echo_name}_c{c}"], series[f"httpx_c{c}"])
        for name, echo_name, _ in DOORS
        for c in (1, 64)
    }
    # context, not the floor: the HTTP exchange without httpx's connection pool
    raw_floor = {c: _floor(series[f"echo_c{c}"], series[f"raw_c{c}"]) for c in (1, 64)}
    result["floor"] = {
        f"c{c}": {
            "echo": series[f"echo_c{c}"]["summary"],
            "http_echo": series[f"http_echo_c{c}"]["summary"],
            "http_echo_sse": series[f"http_echo_sse_c{c}"]["summary"],
            "httpx": series[f"httpx_c{c}"]["summary"],
            "combined": floor[c],
            "combined_http": door_floor[("exai_http", c)],
            "combined_http_sse": door_floor[("exai_http_sse", c)],
            "http_raw": series[f"raw_c{c}"]["summary"],
            "combined_with_raw_http": raw_floor[c],
        }
        for c in (1, 64)
    }
    if why is not None:
        result["exai"] = {"measured": False, "reason": why}
        result["targets"] = {"measured": False, "reason": why}
        return result

    result["exai"] = {f"c{c}": series[f"exai_c{c}"]["summary"] for c in (1, 64)}
    doors: dict[str, Any] = {}
    for name, _, label in DOORS:
        per_c: dict[str, Any] = {}
        for c in (1, 64):
            ex, fl = series[f"{name}_c{c}"]["summary"], door_floor[(name, c)]
            per_c[f"c{c}"] = {
                "exai": ex,
                "floor": fl,
                "over_floor": {
                    **{
                        key.replace("_ms", ""): ratio(ex.get(key), fl[key])
                        for key in ("p50_ms", "p95_ms", "p99_ms")
                    },
                    "throughput": ratio(ex.get("calls_per_s"), fl["calls_per_s"]),
                },
            }
        p50 = per_c["c1"]["over_floor"]["p50"]
        tput = per_c["c64"]["over_floor"]["throughput"]
        doors[name] = {
            "door": label,
            **per_c,
            "targets": {
                "p50_c1_at_most_1.5x_floor": {"value": p50, "met": p50 is not None and p50 <= 1.5},
                "throughput_c64_at_least_0.5x_floor": {
                    "value": tput,
                    "met": tput is not None and tput >= 0.5,
                },
            },
        }
    result["doors"] = doors
    ratios: dict[str, Any] = {}
    for c in (1, 64):
        ex = series[f"exai_c{c}"]["summary"]
        ratios[f"c{c}"] = {
            key.replace("_ms", ""): ratio(ex.get(key), floor[c][key])
            for key in ("p50_ms", "p95_ms", "p99_ms")
        }
        ratios[f"c{c}"]["throughput"] = ratio(ex.get("calls_per_s"), floor[c]["calls_per_s"])
    result["exai_over_floor"] = ratios
    result["exai_over_raw_http_floor"] = {
        f"c{c}": {
            "p50": ratio(series[f"exai_c{c}"]["summary"].get("p50_ms"), raw_floor[c]["p50_ms"]),
            "throughput": ratio(
                series[f"exai_c{c}"]["summary"].get("calls_per_s"), raw_floor[c]["calls_per_s"]
            ),
        }
        for c in (1, 64)
    }
    p50_ratio = ratios["c1"]["p50"]
    tput_ratio = ratios["c64"]["throughput"]
    result["targets"] = {
        "p50_c1_at_most_1.5x_floor": {
            "value": p50_ratio,
            "met": p50_ratio is not None and p50_ratio <= 1.5,
        },
        "throughput_c64_at_least_0.5x_floor": {
            "value": tput_ratio,
            "met": tput_ratio is not None and tput_ratio >= 0.5,
        },
    }
    result["plots"] = [_plot(series)]
    return result


def _plot(series: dict[str, dict]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, c in zip(axes, (1, 64), strict=True):
        for key, label in (
            (f"exai_c{c}", "exai tools/call chat (WebSocket)"),
            (f"exai_http_c{c}", "exai over HTTP, JSON"),
            (f"exai_http_sse_c{c}", "exai over HTTP, SSE"),
            (f"echo_c{c}", "floor: ws echo"),
            (f"http_echo_c{c}", "floor: h11 echo"),
            (f"httpx_c{c}", "floor: httpx → mock"),
            (f"raw_c{c}", "context: raw HTTP/1.1 → mock"),
        ):
            xs, ys = cdf_points(series[key]["lat"])
            ax.plot(xs, ys, label=f"{label} (p50 {series[key]['summary'].get('p50_ms')} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(f"concurrency {c}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("overhead: exai vs its floor (mock upstream, zero latency)")
    return save_figure(fig, plot_name(NAME))
