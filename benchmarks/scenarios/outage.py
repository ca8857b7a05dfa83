"""Outage: the upstream goes away and comes back; the provider's breaker in action.

A few sessions make ``tools/call chat`` calls in a closed loop (a short pause after each) the
whole time. After a baseline the mock upstream process is killed (SIGKILL: connections reset,
new ones refused); after ``down_s`` a new mock is started on the same port.

Figures, all from the client's records against the orchestrator's clock (CLOCK_MONOTONIC is
shared by the processes):

* time until the breaker opens: from the kill to the first call answered ``circuit_open``
  (by the time that call was sent), and how many calls failed otherwise before that;
* fast-fail latency (p50/p99) of the calls answered ``circuit_open``;
* time to recover: from the moment the new mock listens to the first successful answer, and
  until every call succeeds again.

Breaker settings are explicit (``EXAI_PROVIDER_MOCK_BREAKER_*``) and written to the JSON.

Target: fast-fail p99 ≤ 5 ms while the breaker is open.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.daemon import (
    LoadProcess,
    chat_unavailable,
    count,
    exai_daemon,
    latency_summary,
    loop_stalls,
    machine_load,
    mock_upstream,
    plot_name,
    pyplot,
    save_figure,
)

NAME = "outage"
DESCRIPTION = (
    "the upstream goes down and comes back: time until the breaker opens, fast-fail p50/p99 "
    "while open, time to recover"
)

SESSIONS = 4
THINK_S = 0.005
BREAKER = {
    "breaker_minimum_calls": 5,
    "breaker_window": 20,
    "breaker_failure_rate": 0.5,
    "breaker_open_s": 1.0,
    "breaker_max_open_s": 4.0,
}


def run(full: bool) -> dict[str, Any]:
    baseline_s = 3.0 if full else 2.0
    down_s = 10.0 if full else 5.0
    after_s = 10.0 if full else 6.0
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "sessions": SESSIONS,
            "think_s": THINK_S,
            "baseline_s": baseline_s,
            "down_s": down_s,
            "after_s": after_s,
            "breaker": BREAKER,
            "outage": "mock upstream process SIGKILLed, restarted on the same port",
        },
    }
    with mock_upstream(latency_s=0.0) as mock:
        current = mock
        with exai_daemon(
            mock=mock,
            provider=dict(BREAKER),
            session_rate_per_s=1_000_000,
            session_burst=1_000_000,
            call_timeout_s=30,
        ) as d:
            result["settings"]["daemon_env"] = d.env_settings
            why = chat_unavailable(d)
            if why is not None:
                result.update(
                    measured=False, reason=why, targets={"measured": False, "reason": why}
                )
                return result
            t_wall0 = time.time()
            lp = LoadProcess(
                "closed",
                {
                    "mode": "mcp",
                    "url": d.url,
                    "connections": SESSIONS,
                    "inflight": 1,
                    "think_s": THINK_S,
                    "warmup_s": 0.0,
                    "until_stop": True,
                },
            )
            lp.wait_event("ready", 60)
            time.sleep(baseline_s)
            t_down = time.monotonic()
            mock.kill()
            time.sleep(down_s)
            t_restart = time.monotonic()
            current = mock.restart()
            t_up = time.monotonic()
            try:
                time.sleep(after_s)
                lp.send("stop")
                res = lp.result(60)
                breaker_status = _breakers(d.status())
                result["loop_stall"] = loop_stalls(d, t_wall0)
            finally:
                current.stop()

    recs = res["records"]
    rows = sorted(zip(recs["t"], recs["lat"], recs["outcome"], strict=True))
    opened = [r for r in rows if r[2] == "circuit_open" and r[0] >= t_down]
    t_open = opened[0][0] if opened else None
    failed_before_open = [
        r for r in rows if r[0] >= t_down and (t_open is None or r[0] < t_open) and r[2] != "ok"
    ]
    ok_after = [r for r in rows if r[2] == "ok" and r[0] + r[1] >= t_up]
    first_ok_end = (ok_after[0][0] + ok_after[0][1]) if ok_after else None
    # every call answered after this time succeeded
    bad_after_up = [r[0] + r[1] for r in rows if r[0] >= t_up and r[2] != "ok"]
    last_bad_after_up = max(bad_after_up, default=None)
    fast_fail = [r[1] for r in rows if r[2] == "circuit_open"]
    p99_ff = latency_summary(fast_fail).get("p99_ms")
    down_rows = [r for r in rows if t_down <= r[0] < t_up]
    result.update(
        {
            "calls": len(rows),
            "outcomes": {
                "baseline": count([r[2] for r in rows if r[0] < t_down]),
                "down": count([r[2] for r in down_rows]),
                "after_restart": count([r[2] for r in rows if r[0] >= t_up]),
            },
            "restart_took_s": round(t_up - t_restart, 3),
            "time_to_open_s": None if t_open is None else round(t_open - t_down, 4),
            "failed_calls_before_open": len(failed_before_open),
            "failed_before_open_outcomes": count([r[2] for r in failed_before_open]),
            "failed_before_open_latency": latency_summary([r[1] for r in failed_before_open]),
            "fast_fail_latency": latency_summary(fast_fail),
            "all_calls_while_down_latency": latency_summary([r[1] for r in down_rows]),
            "baseline_ok_latency": latency_summary(
                [r[1] for r in rows if r[0] < t_down and r[2] == "ok"]
            ),
            "time_to_first_success_s": (
                None if first_ok_end is None else round(first_ok_end - t_up, 4)
            ),
            "time_to_full_recovery_s": (
                0.0 if last_bad_after_up is None else round(last_bad_after_up - t_up, 4)
            ),
            "breakers_at_end": breaker_status,
        }
    )
    result["targets"] = {
        "fast_fail_p99_at_most_5ms": {
            "value_ms": p99_ff,
            "met": p99_ff is not None and p99_ff <= 5.0,
        }
    }
    result["plots"] = [_plot(rows, t_down, t_up)]
    return result


def _breakers(status: dict[str, Any] | None) -> Any:
    providers = (status or {}).get("providers")
    if not isinstance(providers, dict):
        return None
    out = {}
    for name, info in (providers.get("providers") or providers).items():
        breaker = info.get("breaker") if isinstance(info, dict) else None
        if isinstance(breaker, dict) and breaker.get("calls"):
            keep = ("state", "calls", "failures", "rejections", "transitions", "trips")
            out[name] = {k: breaker.get(k) for k in keep}
    return out


def _plot(rows: list[tuple[float, float, str]], t_down: float, t_up: float) -> str:
    plt = pyplot()
    t0 = rows[0][0] if rows else 0.0
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colors = {"ok": "tab:green", "circuit_open": "tab:orange"}
    for outcome in sorted({r[2] for r in rows}):
        sel = [r for r in rows if r[2] == outcome]
        ax1.scatter(
            [r[0] - t0 for r in sel],
            [max(r[1], 1e-5) * 1000 for r in sel],
            s=3,
            c=colors.get(outcome, "tab:red"),
            label=f"{outcome} ({len(sel)})",
        )
    ax1.set_yscale("log")
    ax1.set_ylabel("call latency (ms, log)")
    ax1.legend(fontsize=8, markerscale=3)
    ax1.grid(True, alpha=0.3)
    bin_s = 0.1
    end = rows[-1][0] - t0 if rows else 0.0
    nb = int(end / bin_s) + 1
    for outcome in sorted({r[2] for r in rows}):
        bins = [0] * nb
        for r in rows:
            if r[2] == outcome:
                bins[min(nb - 1, int((r[0] - t0) / bin_s))] += 1
        ax2.plot(
            [i * bin_s for i in range(nb)],
            [b / bin_s for b in bins],
            color=colors.get(outcome, "tab:red"),
            label=outcome,
        )
    ax2.set_ylabel("calls/s by outcome")
    ax2.set_xlabel("time (s)")
    ax2.legend(fontsize=8)
    ax2.grid(True, alpha=0.3)
    for ax in (ax1, ax2):
        ax.axvspan(t_down - t0, t_up - t0, color="grey", alpha=0.2)
    ax1.set_title("outage: upstream killed (grey) and restarted; breaker fast-fails meanwhile")
    return save_figure(fig, plot_name(NAME))
