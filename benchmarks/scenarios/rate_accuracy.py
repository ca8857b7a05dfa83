"""Rate accuracy: a provider's requests-per-minute limit, admitted rate against configured.

The mock provider gets ``EXAI_PROVIDER_MOCK_RPM``; load sessions call ``chat`` back to back
(a refused call comes back at once with ``data.reason = "rate_limited"``), well above the limit,
for the whole run.

Method. The provider's RPM bucket holds up to one minute of requests, so the first calls drain a
burst of ``RPM`` requests. The window of measurement starts at the first refusal (the bucket is
empty from then on) and ends when the load stops; the admitted rate is the number of successful
calls *sent* in that window divided by its length. Successes are counted at the client, which is
the same as counting at the mock here: a call succeeds only after the mock answered it, and a
refused call never leaves the daemon.

* ``local``: one daemon.
* ``shared``: two daemons with the same ``EXAI_REDIS_URL`` and key prefix and the same RPM, each
  under its own load; the admitted rate is the sum of both. A limit that is shared admits the
  configured rate in all; one that is per process admits about twice as much. This is measured
  whether or not the provider layer wires its buckets to Redis, and the JSON says which it is.

Target: the admitted rate within 2 % of the configured one, local and shared.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from benchmarks.daemon import (
    LoadProcess,
    chat_unavailable,
    count,
    exai_daemon,
    health,
    loop_stalls,
    machine_load,
    mock_upstream,
    plot_name,
    pyplot,
    save_figure,
)

NAME = "rate_accuracy"
DESCRIPTION = (
    "a provider RPM limit, local and Redis-shared across two daemons: admitted rate against "
    "the configured one"
)

SESSIONS = 4
THINK_S = 0.002
REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_wiring() -> dict[str, Any]:
    """Whether the provider layer builds its RPM bucket on Redis when EXAI_REDIS_URL is set."""
    import inspect

    try:
        import exai.providers.provider as prov
        import exai.server.services as services
    except ImportError as exc:
        return {"wired": False, "why": f"cannot import the provider layer: {exc}"}
    text = inspect.getsource(prov) + inspect.getsource(services)
    wired = "RedisTokenBucket" in text
    return {
        "wired": wired,
        "why": None
        if wired
        else (
            "exai.providers builds its RPM/TPM buckets as local TokenBucket objects; "
            "EXAI_REDIS_URL is not used for provider limits yet"
        ),
    }


def _load(url: str, run_s: float) -> LoadProcess:
    return LoadProcess(
        "closed",
        {
            "mode": "mcp",
            "url": url,
            "connections": SESSIONS,
            "inflight": 1,
            "think_s": THINK_S,
            "warmup_s": 0.0,
            "duration_s": run_s,
        },
    )


def _admitted(
    streams: list[list[tuple[float, float, str]]], rpm: float, t_end: float
) -> dict[str, Any]:
    """Admitted rate after the burst: successes sent from the first refusal to ``t_end``.

    With several daemons the window starts once *every* daemon has refused a call."""
    firsts = [min((r[0] for r in rows if r[2] == "rate_limited"), default=None) for rows in streams]
    if any(t is None for t in firsts):
        return {"measured": False, "reason": "the load never reached the limit"}
    t1 = max(t for t in firsts if t is not None)
    rows = sorted(r for rows in streams for r in rows)
    window = t_end - t1
    ok_after = sum(1 for r in rows if r[0] >= t1 and r[2] == "ok")
    burst = sum(1 for r in rows if r[0] < t1 and r[2] == "ok")
    configured = rpm / 60.0
    rate = ok_after / window if window > 0 else None
    return {
        "measured": True,
        "configured_per_s": round(configured, 4),
        "admitted_per_s": None if rate is None else round(rate, 4),
        "error_pct": None if rate is None else round((rate / configured - 1) * 100, 2),
        # one call more or less in the window moves the rate by this much
        "resolution_pct": round(100 / max(ok_after, 1), 2),
        "window_s": round(window, 3),
        "admitted_in_window": ok_after,
        "admitted_before_window": burst,
        "outcomes": count([r[2] for r in rows]),
        "offered_per_s": round(len(rows) / max(rows[-1][0] - rows[0][0], 1e-9), 1),
    }


def _one(mock: Any, rpm: float, run_s: float, n_daemons: int, extra: dict[str, Any]) -> dict:
    out: dict[str, Any] = {"daemons": n_daemons}
    with contextlib.ExitStack() as stack:
        daemons = [
            stack.enter_context(
                exai_daemon(
                    mock=mock,
                    provider={"rpm": rpm},
                    session_rate_per_s=1_000_000,
                    session_burst=1_000_000,
                    **extra,
                )
            )
            for _ in range(n_daemons)
        ]
        out["daemon_env"] = daemons[0].env_settings
        why = chat_unavailable(daemons[0])
        if why is not None:
            return {"measured": False, "reason": why}
        t_wall0 = time.time()
        loads = [_load(d.url, run_s) for d in daemons]
        results = [lp.result(run_s + 120) for lp in loads]
        t_end = min(r["t_end"] for r in results)
        streams = []
        for r in results:
            recs = r["records"]
            streams.append(
                [
                    row
                    for row in zip(recs["t"], recs["lat"], recs["outcome"], strict=True)
                    if row[0] < t_end
                ]
            )
        # (chat_unavailable's warm-up call took one token of the first burst: it does not
        # matter, the window starts after the burst)
        out.update(_admitted(streams, rpm, t_end))
        out["rows"] = sorted(r for rows in streams for r in rows)
        out["loop_stall"] = [loop_stalls(d, t_wall0) for d in daemons]
        out["daemon_health"] = [health(d) for d in daemons]
    return out


def run(full: bool) -> dict[str, Any]:
    # the bucket holds a minute of requests: a smaller RPM drains its burst sooner
    rpm = 1200.0 if full else 600.0
    run_s = 60.0 if full else 16.0
    wiring = _redis_wiring()
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "rpm": rpm,
            "sessions_per_daemon": SESSIONS,
            "think_s": THINK_S,
            "run_s": run_s,
            "redis_url": REDIS_URL,
        },
        "shared_limit_wiring": wiring,
    }
    with mock_upstream(latency_s=0.0) as mock:
        local = _one(mock, rpm, run_s, 1, {})
        prefix = f"exai-bench-{uuid.uuid4().hex[:8]}:"
        if wiring["wired"] or full:
            shared = _one(mock, rpm, run_s, 2, {"redis_url": REDIS_URL, "redis_key_prefix": prefix})
        else:
            shared = {
                "measured": False,
                "reason": f"not available: {wiring['why']} (the full form measures what two "
                "daemons admit together anyway)",
            }
    local_rows = local.pop("rows", [])
    shared_rows = shared.pop("rows", [])
    result["local"] = local
    result["shared"] = shared
    stalls = [x for part in (local, shared) for x in part.get("loop_stall", [])]
    values = [s["max_loop_stall_s"] for s in stalls if s.get("max_loop_stall_s") is not None]
    result["loop_stall"] = {
        "max_loop_stall_s": max(values) if values else None,
        "per_daemon": stalls,
        "target_s": 0.05,
        "met": None if not values else max(values) <= 0.05,
    }

    def target(part: dict[str, Any], label: str) -> dict[str, Any]:
        err = part.get("error_pct")
        t: dict[str, Any] = {"value_pct": err, "met": err is not None and abs(err) <= 2.0}
        if label == "shared" and not wiring["wired"]:
            t["note"] = f"not available: {wiring['why']}"
        return t

    result["targets"] = {
        "local_within_2pct": target(local, "local"),
        "shared_within_2pct": target(shared, "shared"),
    }
    if local_rows or shared_rows:
        result["plots"] = [_plot(local_rows, shared_rows, rpm)]
    return result


def _plot(
    local: list[tuple[float, float, str]], shared: list[tuple[float, float, str]], rpm: float
) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for rows, label in ((local, "local (1 daemon)"), (shared, "shared (2 daemons, Redis)")):
        ok = sorted(r[0] for r in rows if r[2] == "ok")
        if not ok:
            continue
        t0 = min(r[0] for r in rows)
        ax.plot([t - t0 for t in ok], range(1, len(ok) + 1), label=f"{label}: admitted calls")
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("admitted calls (cumulative)")
    ax.set_title(
        f"rate accuracy: RPM {rpm:g} (burst {rpm:g}, then {rpm / 60:g}/s); slope after the "
        "burst is the admitted rate"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, plot_name(NAME))
