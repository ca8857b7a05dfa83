"""Abuse: each attack of issue 11 beside a well-behaved client, one after the other.

Processes: the mock upstream, the daemon with its **default** bounds plus the test tools
(``--plugin tests.daemon_tools:register``: ``blob`` answers as many bytes as asked, ``sleep``
sleeps), a well-behaved client process (4 sessions calling ``chat`` through the mock with a
25 ms pause, the whole time), and one attacker process per attack
(``benchmarks/load/abuse.py``).

Timeline: the idle daemon's RSS is read first; then a baseline with the well-behaved client
alone; then each attack for a while, followed by a settling pause with the attacker gone.
For each attack the JSON gives:

* the daemon's **peak RSS** during the attack and its pause, against the documented ceiling
  of the default settings (:func:`exai.server.budget.memory_ceiling`, with this machine's idle
  RSS as the baseline);
* its **settled RSS** at the end of the pause, against the idle daemon's;
* the well-behaved client's **p99** during the attack, against its baseline p99, and its
  failures;
* the **longest loop stall** the daemon logged (steps over 50 ms) during the attack and pause,
  and the daemon's own gauge at the end;
* the attacker's counters (what it sent, how it was answered or closed).

Targets (reported, not asserted): settled RSS within 20 % of the idle daemon's; peak under the
documented ceiling; well-behaved p99 ≤ 2 × baseline; no loop stall over 50 ms.

Add an attack: write it in ``benchmarks/load/abuse.py`` and add a line to :data:`ATTACKS`.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.daemon import (
    LoadProcess,
    RssSampler,
    StallPoller,
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

NAME = "abuse"
DESCRIPTION = (
    "each attack (slow readers, big answers, hostile JSON, one-connection bursts) beside a "
    "well-behaved client: peak and settled RSS, the client's p99 against its baseline, the "
    "longest loop stall"
)

MiB = 1024 * 1024
SESSIONS = 4
THINK_S = 0.025
PLUGIN = ("--plugin", "tests.daemon_tools:register")

#: the attacks, in order: (name in benchmarks/load/abuse.py, its config for short, for full)
ATTACKS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "slow_readers",
        {"connections": 8, "calls": 64, "answer_bytes": 512 * 1024},
        {"connections": 64, "calls": 64, "answer_bytes": 512 * 1024},
    ),
    ("big_answers", {"answer_bytes": 2 * MiB}, {"answer_bytes": 2 * MiB}),
    ("hostile_json", {}, {}),
    (
        "one_connection_burst",
        {"connections": 2, "parallel": 20, "seconds": 1.0},
        {"connections": 8, "parallel": 20, "seconds": 1.0},
    ),
]
#: the largest answer the attacks ask for
LARGEST_ANSWER = 2 * MiB


def documented_ceiling(daemon_env: dict[str, str], idle_rss: int) -> dict[str, int]:
    from exai.config import Settings
    from exai.server.budget import memory_ceiling

    settings = Settings.from_env(daemon_env, env_file="", config_file="")
    return memory_ceiling(settings, baseline_bytes=idle_rss)


def run(full: bool) -> dict[str, Any]:
    baseline_s = 15.0 if full else 5.0
    attack_s = 15.0 if full else 6.0
    settle_s = 10.0 if full else 4.0
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "well_behaved_sessions": SESSIONS,
            "think_s": THINK_S,
            "baseline_s": baseline_s,
            "attack_s": attack_s,
            "settle_s": settle_s,
            "attacks": {name: (f if full else s) for name, s, f in ATTACKS},
            "daemon_limits": "defaults (EXAI_SESSION_MAX_PENDING*, EXAI_MAX_PENDING_BYTES, …)",
        },
    }
    with (
        mock_upstream(latency_s=0.0) as mock,
        exai_daemon(mock=mock, args=PLUGIN, session_rate_per_s=50) as d,
    ):
        result["settings"]["daemon_env"] = d.env_settings
        why = chat_unavailable(d)
        tool, arguments = "chat", {"prompt": "ping", "model": "mock-fast"}
        if why is not None:
            tool, arguments = "version", {}
            result["tool_note"] = f"chat unavailable ({why}); every call is to version"
        d.call_tool("blob", {"bytes": LARGEST_ANSWER})  # warm up what a large answer allocates
        time.sleep(1.0)
        idle_rss = d.rss_bytes()
        ceiling = documented_ceiling(d.env_settings, idle_rss)
        t_wall0 = time.time()
        with RssSampler(d.pid, 0.05) as rss, StallPoller(d, 0.5) as poller:
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
            t_base_end = time.monotonic()
            phases = []
            for name, short_cfg, full_cfg in ATTACKS:
                cfg = dict(full_cfg if full else short_cfg)
                phase: dict[str, Any] = {"attack": name, "config": cfg}
                phase["t0"], phase["wall0"] = time.monotonic(), time.time()
                attacker = LoadProcess(
                    "abuse", {"attack": name, "url": d.url, "duration_s": attack_s, **cfg}
                )
                try:
                    res = attacker.result(attack_s + 120)
                finally:
                    attacker.kill()
                phase["t1"] = time.monotonic()
                phase["attacker"] = {k: v for k, v in res.items() if k not in ("event",)}
                time.sleep(settle_s)
                phase["t2"], phase["wall2"] = time.monotonic(), time.time()
                phase["settled_rss"] = d.rss_bytes()
                phase["stalls"] = loop_stalls(d, phase["wall0"], phase["wall2"], poller=poller)
                phases.append(phase)
            good.send("stop")
            g = good.result(60)
        status = d.status()
        result["loop_stall_overall"] = loop_stalls(d, t_wall0, poller=poller)
        result["daemon"] = health(d)
        samples = list(rss.samples)

    rows = list(zip(g["records"]["t"], g["records"]["lat"], g["records"]["outcome"], strict=True))
    base = _summary([r for r in rows if t_base <= r[0] < t_base_end])
    result["idle_rss_mb"] = round(idle_rss / MiB, 1)
    result["documented_ceiling_mb"] = {k: round(v / MiB, 1) for k, v in ceiling.items()}
    result["well_behaved_baseline"] = base
    result["daemon_status_at_end"] = {
        k: ((status or {}).get("daemon") or {}).get(k)
        for k in ("rejections", "pending", "stored_results", "stored_results_bytes", "memory")
    }
    result["attacks"] = {}
    for ph in phases:
        during = _summary([r for r in rows if ph["t0"] <= r[0] < ph["t1"]])
        peak = max((b for t, b in samples if ph["t0"] <= t <= ph["t2"]), default=0)
        ratio = (
            round(during["p99_ms"] / base["p99_ms"], 2)
            if during.get("p99_ms") and base.get("p99_ms")
            else None
        )
        failed = sum(v for k, v in during["outcomes"].items() if k != "ok")
        stall = ph["stalls"]
        longest = stall["longest_logged_during_load"]
        result["attacks"][ph["attack"]] = {
            "config": ph["config"],
            "attacker": ph["attacker"],
            "peak_rss_mb": round(peak / MiB, 1),
            "settled_rss_mb": round(ph["settled_rss"] / MiB, 1),
            "well_behaved": during,
            "stalls_over_50ms": stall["stalls_logged_during_load"],
            "longest_stall_s": longest[0]["duration_s"] if longest else None,
            "targets": {
                "settled_rss_within_20pct_of_idle": {
                    "value": round(ph["settled_rss"] / idle_rss, 3),
                    "met": ph["settled_rss"] <= 1.2 * idle_rss,
                },
                "peak_rss_under_documented_ceiling": {
                    "value_mb": round(peak / MiB, 1),
                    "ceiling_mb": round(ceiling["total"] / MiB, 1),
                    "met": peak <= ceiling["total"],
                },
                "well_behaved_p99_at_most_2x_baseline": {
                    "value": ratio,
                    "met": ratio is not None and ratio <= 2.0 and failed == 0,
                    "failed_calls": failed,
                },
                "no_loop_stall_over_50ms": {"met": stall["stalls_logged_during_load"] == 0},
            },
        }
    result["plots"] = [_plot(samples, rows, phases, idle_rss, t_base, ceiling["total"])]
    return result


def _summary(sel: list[tuple[float, float, str]]) -> dict[str, Any]:
    s = latency_summary([r[1] for r in sel if r[2] == "ok"])
    s["outcomes"] = count([r[2] for r in sel])
    return s


def _plot(
    samples: list[tuple[float, int]],
    rows: list[tuple[float, float, str]],
    phases: list[dict[str, Any]],
    idle_rss: int,
    t_base: float,
    ceiling: int,
) -> str:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    t0 = min([t_base, *(t for t, _ in samples[:1])])
    ax1.plot([t - t0 for t, _ in samples], [b / MiB for _, b in samples], lw=1, label="daemon RSS")
    ax1.axhline(idle_rss / MiB, color="green", ls="--", lw=1, label="idle")
    ax1.axhline(1.2 * idle_rss / MiB, color="green", ls=":", lw=1, label="idle + 20 %")
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_title(f"documented ceiling of the default settings: {ceiling / MiB:.0f} MiB")
    ok = [r for r in rows if r[2] == "ok"]
    bad = [r for r in rows if r[2] != "ok"]
    ax2.scatter([r[0] - t0 for r in ok], [r[1] * 1000 for r in ok], s=2, label="ok")
    if bad:
        ax2.scatter([r[0] - t0 for r in bad], [1 for _ in bad], s=8, c="red", label="failed")
    ax2.set_yscale("log")
    ax2.set_ylabel("well-behaved latency (ms, log)")
    ax2.set_xlabel("time (s)")
    for ax in (ax1, ax2):
        for i, ph in enumerate(phases):
            ax.axvspan(ph["t0"] - t0, ph["t1"] - t0, color=f"C{i + 1}", alpha=0.15)
            if ax is ax1:
                ax.text(ph["t0"] - t0, ax.get_ylim()[1] * 0.95, ph["attack"], fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("abuse: attacks (shaded) beside a well-behaved client")
    return save_figure(fig, plot_name(NAME))
