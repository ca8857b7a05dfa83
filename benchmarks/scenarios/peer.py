"""Peer: exai and the LiteLLM proxy against one fixed-reply upstream, and the floor, in one run.

Processes (all on loopback): the mock upstream (``exai.testing.mock_upstream``, no injected
latency), the exai daemon, the LiteLLM proxy (``benchmarks/litellm_peer.py``: its own cached
venv, 1 worker, no database, no callbacks), a bare trio-websocket echo server, and one
closed-loop load process per series (``benchmarks/load/closed.py``).

Series (each at concurrency 1 and 64 unless said):

* ``exai_chat`` — ``tools/call chat`` over exai's MCP WebSocket door, durable SQLite turns (the
  daemon's default store); ``exai_chat_stream`` — the same with ``_meta.progressToken``, so the
  client gets the answer's progress while it streams. (exai streams from the upstream in both.)
* ``exai_version`` — ``tools/call version``: the daemon's own path, no provider, no store.
* ``exai_http`` / ``exai_http_stream`` — the same ``chat`` call over exai's Streamable HTTP
  door (``POST /mcp``, 2026-07-28, stateless), sent by the same hand-written HTTP/1.1 load
  client as LiteLLM's requests (``mcp_http`` in ``closed.py``): a JSON answer, or with
  ``progressToken`` an SSE answer (progress notifications, then the response). Their floor's
  client↔daemon part is ``http_echo`` / ``http_echo_sse``: the same POST to a bare h11 echo
  server (``benchmarks/load/http_echo_server.py``).
* ``litellm`` / ``litellm_stream`` — ``POST /v1/chat/completions`` to the proxy, ``stream``
  false / true, over hand-written keep-alive HTTP/1.1 (one connection per worker).
* the floor: ``echo`` — the same MCP request frame to the echo server and back; ``http`` /
  ``http_stream`` — the hand-written HTTP/1.1 exchange with the mock itself, JSON or SSE decoded;
  ``commit`` — one durable SQLite commit of a chat call's two turns (WAL, ``synchronous=FULL``),
  concurrency 1; ``commit_thread`` (context) — the same handed to a worker thread.

One HTTP load generator drives both exai's Streamable HTTP door and LiteLLM (the same
hand-written keep-alive HTTP/1.1 client, one connection per worker); the WebSocket series are
beside them. The load method is otherwise the same (closed loop, same concurrency, same
windows, same prompt and model), and the rounds are interleaved: every round measures every
series once, in the same order, so a change in the machine's load falls on all.

**CPU per call** is each server process's own CPU time (user + system, from ``/proc``) over the
measured window divided by the calls completed in it (see ``meter`` in ``closed.py``): exai's
daemon, LiteLLM's proxy, the echo server; for ``http*`` and ``commit*`` the load process itself
(it is the HTTP client, or the writer). Pooled over rounds: Σ CPU / Σ calls. The floor of a chat
call is ``echo + http + commit`` (``http_stream`` for the streamed call); its latency at
concurrency 1 is the sum of the three p50s. ``calls/s`` are wall-clock and move with the
machine's load; CPU per call does not (much).

Targets of issue 18 (reported, never asserted): CPU per chat call ≤ 3 × the floor and ≤ 1/10 of
LiteLLM's, streamed and not; ``version`` CPU ≤ 3 × the echo's per message; chat p50 at
concurrency 1 ≤ 1.5 × the floor's latency.

``EXAI_BENCH_LITELLM=off`` leaves LiteLLM out; ``EXAI_BENCH_PYSPY=<path to py-spy>`` adds a
py-spy profile of the daemon during one more ``exai_chat`` series at the highest concurrency and
reports each subsystem's share of the loop thread (``benchmarks/profile_shares.py``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks import litellm_peer
from benchmarks.daemon import (
    REPO,
    RESULTS,
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
)

NAME = "peer"
DESCRIPTION = (
    "exai (WebSocket MCP chat, durable turns) vs the LiteLLM proxy (HTTP, 1 worker) on one mock "
    "upstream, interleaved rounds: calls/s, p50/p99 and CPU per call at concurrency 1 and 64, "
    "streamed and not, against a floor (ws echo + raw HTTP/1.1 + one durable commit) and "
    "version vs echo"
)

PROMPT = "ping"
MODEL = "mock-fast"
TOKEN = "exai-bench-token"


@dataclass(frozen=True)
class Plan:
    """How long and how much: the short and full forms, or a tiny one for the test suite."""

    rounds: int
    duration_s: float
    warmup_s: float
    concurrency: tuple[int, ...] = (1, 64)
    litellm: bool = True  # try LiteLLM (still skipped when it cannot be installed)
    install: bool = True  # install LiteLLM into its cache venv when missing
    plot_dir: Path | None = None  # default: benchmarks/results
    pyspy: str | None = None  # path to py-spy: profile exai at the highest concurrency
    pyspy_s: float = 20.0
    form: str = "custom"
    extra_settings: dict[str, Any] = field(default_factory=dict)


SHORT = Plan(rounds=1, duration_s=2.5, warmup_s=1.0, form="short")
FULL = Plan(rounds=3, duration_s=8.0, warmup_s=2.0, form="full")


def run(full: bool) -> dict[str, Any]:
    plan = FULL if full else SHORT
    pyspy = os.environ.get("EXAI_BENCH_PYSPY")
    if pyspy:
        plan = replace(plan, pyspy=pyspy)
    return measure(plan)


# ---------------------------------------------------------------------------- one series
def _series(
    key: str, c: int, cfg: dict[str, Any], plan: Plan, cpu_pid: int | str
) -> dict[str, Any]:
    res = run_load(
        "closed",
        {
            "connections": c,
            "inflight": 1,
            "duration_s": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "prompt": PROMPT,
            "model": MODEL,
            "cpu_pids": [cpu_pid],
            **cfg,
        },
        limit_s=120 + 4 * (plan.duration_s + plan.warmup_s),
    )
    recs = res["records"]
    meter = res.get("meter") or {}
    ok_lat = [lat for lat, o in zip(recs["lat"], recs["outcome"], strict=True) if o == "ok"]
    return {
        "key": key,
        "c": c,
        "lat": ok_lat,
        "not_ok": {k: v for k, v in count(recs["outcome"]).items() if k != "ok"},
        "exceptions": res["exceptions"],
        "window_s": meter.get("window_s"),
        "completed": meter.get("completed", 0),
        "completed_ok": meter.get("completed_ok", 0),
        "cpu_s": meter.get("cpu_total_s"),
    }


def _pool(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Σ CPU / Σ calls and Σ calls / Σ window over rounds; latency over every round's calls."""
    lat = [x for r in rounds for x in r["lat"]]
    done = sum(r["completed"] for r in rounds)
    ok = sum(r["completed_ok"] for r in rounds)
    window = sum(r["window_s"] or 0 for r in rounds)
    cpu = None if any(r["cpu_s"] is None for r in rounds) else sum(r["cpu_s"] for r in rounds)
    not_ok: dict[str, int] = {}
    for r in rounds:
        for k, v in r["not_ok"].items():
            not_ok[k] = not_ok.get(k, 0) + v
    summary = latency_summary(lat)
    summary.pop("n", None)
    return {
        "calls_per_s": round(ok / window, 1) if window else None,
        "cpu_ms_per_call": round(1000 * cpu / done, 4) if done and cpu is not None else None,
        **summary,
        "calls_in_windows": done,
        "not_ok": not_ok,
        "per_round": [
            {
                "calls_per_s": round(r["completed_ok"] / r["window_s"], 1)
                if r["window_s"]
                else None,
                "cpu_ms_per_call": round(1000 * r["cpu_s"] / r["completed"], 4)
                if r["completed"] and r["cpu_s"] is not None
                else None,
                "calls": r["completed"],
            }
            for r in rounds
        ],
    }


# ---------------------------------------------------------------------------- the run
def measure(plan: Plan) -> dict[str, Any]:
    """Run ``plan`` and return the scenario's figures (see the module docstring)."""
    result: dict[str, Any] = {
        "form": plan.form,
        "machine_load_at_start": machine_load(),
        "settings": {
            "rounds": plan.rounds,
            "duration_s_per_series": plan.duration_s,
            "warmup_s": plan.warmup_s,
            "concurrency": list(plan.concurrency),
            "pyspy": plan.pyspy,
            "mock_latency_s": 0.0,
            "prompt": PROMPT,
            "model": MODEL,
            "doors": "exai: WebSocket MCP and Streamable HTTP POST /mcp (tools/call); "
            "LiteLLM: HTTP POST /v1/chat/completions; one HTTP load client for both",
        },
    }
    litellm_python, why_not = (None, "not requested")
    if plan.litellm:
        litellm_python, why_not = litellm_peer.ensure(install=plan.install)
    lite: dict[str, Any] = {"measured": False, "reason": why_not}
    if litellm_python is not None:
        lite = {
            "measured": True,
            "version": litellm_peer.installed_version(litellm_python),
            "venv": str(litellm_python.parent.parent),
            "lock": str(litellm_peer.LOCK.relative_to(litellm_peer.REPO)),
            "command": "litellm --config <file> --host 127.0.0.1 --port <free> --num_workers 1",
            "env": dict(litellm_peer.ENV),
        }

    per: dict[str, list[dict[str, Any]]] = {}
    tmp = tempfile.mkdtemp(prefix="exai-bench-peer-")
    try:
        with (
            mock_upstream(latency_s=0.0) as mock,
            echo_server() as echo,
            http_echo_server() as http_echo,
        ):
            upstream_chat = mock.base_url + "/chat/completions"
            with exai_daemon(
                mock=mock,
                provider={"max_concurrency": 128, "pool_max": 128},
                max_inflight=256,
                session_max_inflight=8,
                session_rate_per_s=1_000_000,
                session_burst=1_000_000,
                max_connections=1024,
                tokens=TOKEN,
                **plan.extra_settings,
            ) as d:
                result["settings"]["daemon_env"] = {
                    k: ("<set>" if k == "EXAI_TOKENS" else v) for k, v in d.env_settings.items()
                }
                why = chat_unavailable_with_token(d)
                if why is not None:
                    result["exai"] = {"measured": False, "reason": why}
                    return result
                with contextlib.ExitStack() as stack:
                    proxy = None
                    if litellm_python is not None:
                        try:
                            proxy = stack.enter_context(
                                litellm_peer.litellm_proxy(litellm_python, mock.base_url)
                            )
                        except RuntimeError as exc:
                            lite = {**lite, "measured": False, "reason": str(exc)[-2000:]}
                    if proxy is not None:
                        lite["config"] = proxy.config
                        lite["warm_up"] = _warm_litellm(proxy)
                    t0 = time.time()
                    result["machine_load_after_each_round"] = _rounds(
                        plan, per, d, (echo, http_echo), upstream_chat, proxy, tmp
                    )
                    # before the profile: py-spy pauses the daemon for each sample
                    result["loop_stall"] = loop_stalls(d, t0)
                    result["exai_rss_mb_after"] = process_rss_mb(d)
                    if plan.pyspy:
                        result["profile"] = _profile(plan, d, tmp)
                    if proxy is not None:
                        result["litellm_rss_mb_after"] = process_rss_mb(proxy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    series = {key: _pool(rounds) for key, rounds in per.items()}
    result["litellm"] = lite
    result["series"] = series
    result["floor"] = _floor(series, plan)
    result["ratios"], result["targets"] = _targets(series, result["floor"], plan)
    result["plots"] = [_plot(series, result["floor"], plan)]
    return result


def chat_unavailable_with_token(d: Any) -> str | None:
    """:func:`chat_unavailable` for a daemon that wants ``TOKEN`` (one call over a session)."""
    res = run_load(
        "closed",
        {
            "mode": "mcp",
            "url": d.url,
            "token": TOKEN,
            "connections": 1,
            "calls_per_worker": 1,
            "duration_s": 30,
            "warmup_s": 0,
            "prompt": "warm-up",
            "model": MODEL,
        },
        limit_s=60,
    )
    outcomes = res["records"]["outcome"]
    if outcomes == ["ok"]:
        return None
    return f"chat over exai did not answer ok: outcomes {outcomes}, {res['exceptions']}"


def _warm_litellm(proxy: Any) -> dict[str, Any]:
    """A few calls of each kind first: LiteLLM imports and builds things on its first calls."""
    out = {}
    for stream in (False, True):
        res = run_load(
            "closed",
            {
                "mode": "http",
                "url": proxy.url,
                "headers": proxy.headers,
                "stream": stream,
                "connections": 4,
                "calls_per_worker": 5,
                "duration_s": 60,
                "warmup_s": 0,
                "prompt": PROMPT,
                "model": MODEL,
            },
            limit_s=120,
        )
        out["stream" if stream else "plain"] = count(res["records"]["outcome"])
    return out


def _rounds(
    plan: Plan,
    per: dict[str, list[dict[str, Any]]],
    d: Any,
    echoes: tuple[Any, Any],
    upstream_chat: str,
    proxy: Any,
    tmp: str,
) -> list[dict[str, Any]]:
    """Every series once per round, in one order (interleaved); the load after each round."""
    echo, http_echo = echoes
    chat_args = {"prompt": PROMPT, "model": MODEL}
    http_url = d.url.replace("ws://", "http://", 1)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    loads = []
    for r in range(plan.rounds):
        for c in plan.concurrency:
            todo: list[tuple[str, dict[str, Any], int | str]] = [
                ("echo", {"mode": "echo", "url": echo.found["url"]}, echo.pid),
                ("http_echo", {"mode": "mcp_http", "url": http_echo.found["url"]}, http_echo.pid),
                (
                    "http_echo_sse",
                    {"mode": "mcp_http", "url": http_echo.found["url"], "stream": True},
                    http_echo.pid,
                ),
                ("http", {"mode": "http", "url": upstream_chat}, "self"),
                ("http_stream", {"mode": "http", "url": upstream_chat, "stream": True}, "self"),
            ]
            if c == 1:
                todo += [
                    ("commit", {"mode": "sqlite", "db_path": f"{tmp}/floor-{r}.db"}, "self"),
                    (
                        "commit_thread",
                        {"mode": "sqlite_thread", "db_path": f"{tmp}/floor-t{r}.db"},
                        "self",
                    ),
                ]
            exai = {"mode": "mcp", "url": d.url, "token": TOKEN, "arguments": chat_args}
            todo.append(("exai_chat", exai, d.pid))
            if proxy is not None:
                lite = {"mode": "http", "url": proxy.url, "headers": proxy.headers}
                todo.append(("litellm", lite, proxy.pid))
            todo.append(("exai_chat_stream", {**exai, "progress": True}, d.pid))
            if proxy is not None:
                todo.append(("litellm_stream", {**lite, "stream": True}, proxy.pid))
            todo.append(
                ("exai_version", {**exai, "tool": "version", "arguments": {}}, d.pid),
            )
            exai_http = {"mode": "mcp_http", "url": http_url, "headers": bearer}
            exai_http["arguments"] = chat_args
            todo.append(("exai_http", exai_http, d.pid))
            todo.append(("exai_http_stream", {**exai_http, "stream": True}, d.pid))
            for key, cfg, pid in todo:
                per.setdefault(f"{key}_c{c}", []).append(_series(key, c, cfg, plan, pid))
        loads.append(machine_load())
    return loads


def _profile(plan: Plan, d: Any, tmp: str) -> dict[str, Any]:
    """py-spy on the daemon during one more ``exai_chat`` series at the highest concurrency."""
    from benchmarks.profile_shares import shares

    c = max(plan.concurrency)
    out = Path(tmp) / "exai-chat.pyspy.txt"
    cmd = [
        plan.pyspy or "py-spy",
        "record",
        "--pid",
        str(d.pid),
        "--rate",
        "200",
        "--duration",
        str(int(plan.pyspy_s)),
        "--format",
        "raw",
        "--threads",
        "--output",
        str(out),
    ]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        cfg = {
            "mode": "mcp",
            "url": d.url,
            "token": TOKEN,
            "arguments": {"prompt": PROMPT, "model": MODEL},
        }
        load = _series(
            "exai_chat_profiled",
            c,
            cfg,
            replace(plan, duration_s=plan.pyspy_s + 1, warmup_s=0.5),
            d.pid,
        )
    finally:
        try:
            _, err = spy.communicate(timeout=plan.pyspy_s + 60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not out.exists():
        return {"measured": False, "reason": f"py-spy wrote nothing: {err.strip()[-500:]}"}
    raw = out.read_text(encoding="utf-8")
    table = shares(raw)
    kept = (plan.plot_dir or RESULTS) / f"{plot_name(NAME)}-pyspy.txt.gz"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(gzip.compress(raw.encode()))
    return {
        "measured": True,
        "command": " ".join([*cmd[:-1], "<file>"]),
        "concurrency": c,
        "raw_profile": str(kept.relative_to(REPO)) if kept.is_relative_to(REPO) else str(kept),
        "calls_per_s_while_profiled": round(load["completed_ok"] / load["window_s"], 1)
        if load["window_s"]
        else None,
        **table,
    }


# ---------------------------------------------------------------------------- figures
def _get(series: dict[str, Any], key: str, field_: str) -> float | None:
    s = series.get(key)
    return None if s is None else s.get(field_)


def _sum(*values: float | None) -> float | None:
    if any(v is None for v in values):
        return None
    return round(sum(v for v in values if v is not None), 4)


def _floor(series: dict[str, Any], plan: Plan) -> dict[str, Any]:
    commit_cpu = _get(series, "commit_c1", "cpu_ms_per_call")
    commit_p50 = _get(series, "commit_c1", "p50_ms")
    out: dict[str, Any] = {
        "definition": "echo + raw HTTP/1.1 exchange (JSON or SSE) + one durable commit of two "
        "turns; CPU per call summed; latency = sum of the p50s at concurrency 1",
        "commit_c1": {
            "cpu_ms_per_call": commit_cpu,
            "p50_ms": commit_p50,
            "thread_handoff_cpu_ms_per_call": _get(series, "commit_thread_c1", "cpu_ms_per_call"),
            "thread_handoff_p50_ms": _get(series, "commit_thread_c1", "p50_ms"),
        },
    }
    for c in plan.concurrency:
        echo_cpu = _get(series, f"echo_c{c}", "cpu_ms_per_call")
        for kind, http_key in (("chat", "http"), ("chat_stream", "http_stream")):
            http_cpu = _get(series, f"{http_key}_c{c}", "cpu_ms_per_call")
            entry: dict[str, Any] = {
                "cpu_ms_per_call": _sum(echo_cpu, http_cpu, commit_cpu),
                "parts_cpu_ms": {"echo": echo_cpu, http_key: http_cpu, "commit": commit_cpu},
            }
            if c == 1:
                entry["p50_ms"] = _sum(
                    _get(series, "echo_c1", "p50_ms"),
                    _get(series, f"{http_key}_c1", "p50_ms"),
                    commit_p50,
                )
            cpu = entry["cpu_ms_per_call"]
            entry["calls_per_s_per_core"] = round(1000 / cpu, 1) if cpu else None
            out[f"{kind}_c{c}"] = entry
        # the HTTP door: its own client↔daemon floor (the h11 echo), the same upstream part
        for kind, echo_key, http_key in (
            ("http", "http_echo", "http"),
            ("http_stream", "http_echo_sse", "http_stream"),
        ):
            door_cpu = _get(series, f"{echo_key}_c{c}", "cpu_ms_per_call")
            http_cpu = _get(series, f"{http_key}_c{c}", "cpu_ms_per_call")
            entry = {
                "cpu_ms_per_call": _sum(door_cpu, http_cpu, commit_cpu),
                "parts_cpu_ms": {echo_key: door_cpu, http_key: http_cpu, "commit": commit_cpu},
            }
            if c == 1:
                entry["p50_ms"] = _sum(
                    _get(series, f"{echo_key}_c1", "p50_ms"),
                    _get(series, f"{http_key}_c1", "p50_ms"),
                    commit_p50,
                )
            cpu = entry["cpu_ms_per_call"]
            entry["calls_per_s_per_core"] = round(1000 / cpu, 1) if cpu else None
            out[f"{kind}_c{c}"] = entry
    return out


def _targets(
    series: dict[str, Any], floor: dict[str, Any], plan: Plan
) -> tuple[dict[str, Any], dict[str, Any]]:
    ratios: dict[str, Any] = {}
    cpu_floor: dict[str, float | None] = {}
    cpu_lite: dict[str, float | None] = {}
    version_echo: dict[str, float | None] = {}
    for c in plan.concurrency:
        for kind, lite_key in (
            ("chat", "litellm"),
            ("chat_stream", "litellm_stream"),
            ("http", "litellm"),
            ("http_stream", "litellm_stream"),
        ):
            ex = _get(series, f"exai_{kind}_c{c}", "cpu_ms_per_call")
            if ex is None and kind.startswith("http"):
                continue
            label = f"{kind}_c{c}"
            cpu_floor[label] = ratio(ex, floor[f"{kind}_c{c}"]["cpu_ms_per_call"])
            cpu_lite[label] = ratio(ex, _get(series, f"{lite_key}_c{c}", "cpu_ms_per_call"))
        version_echo[f"c{c}"] = ratio(
            _get(series, f"exai_version_c{c}", "cpu_ms_per_call"),
            _get(series, f"echo_c{c}", "cpu_ms_per_call"),
        )
    p50: dict[str, float | None] = {}
    if 1 in plan.concurrency:
        for kind in ("chat", "chat_stream", "http", "http_stream"):
            if kind.startswith("http") and _get(series, f"exai_{kind}_c1", "p50_ms") is None:
                continue
            p50[f"{kind}_c1"] = ratio(
                _get(series, f"exai_{kind}_c1", "p50_ms"), floor[f"{kind}_c1"].get("p50_ms")
            )
    ratios = {
        "exai_cpu_per_chat_call_over_floor": cpu_floor,
        "exai_cpu_per_chat_call_over_litellm": cpu_lite,
        "exai_version_cpu_over_echo": version_echo,
        "exai_chat_p50_c1_over_floor_p50": p50,
    }

    def verdict(values: dict[str, float | None], limit: float) -> dict[str, Any]:
        got = {k: v for k, v in values.items() if v is not None}
        return {
            "limit": limit,
            "values": values,
            "met": (all(v <= limit for v in got.values()) if got else None),
            "missed_at": sorted(k for k, v in got.items() if v > limit),
        }

    targets = {
        "cpu_per_chat_call_at_most_3x_floor": verdict(cpu_floor, 3.0),
        "cpu_per_chat_call_at_most_0.1x_litellm": verdict(cpu_lite, 0.1),
        "version_cpu_at_most_3x_echo": verdict(version_echo, 3.0),
        "chat_p50_c1_at_most_1.5x_floor_latency": verdict(p50, 1.5),
    }
    return ratios, targets


def _plot(series: dict[str, Any], floor: dict[str, Any], plan: Plan) -> str:
    plt = pyplot()
    fig, (ax_cpu, ax_rate) = plt.subplots(2, 1, figsize=(15, 10))
    kinds = ["chat", "chat_stream"]
    if any(k.startswith("exai_http_") for k in series):
        kinds += ["http", "http_stream"]
    groups = [(kind, c) for c in plan.concurrency for kind in kinds]
    names = {
        "chat": "WS chat",
        "chat_stream": "WS streamed",
        "http": "HTTP chat",
        "http_stream": "HTTP streamed",
    }
    labels = [f"{names[k]}\nc={c}" for k, c in groups]
    width = 0.27
    colors = {"exai": "#1f77b4", "floor": "#2ca02c", "LiteLLM": "#d62728"}

    def bars(ax: Any, values: dict[str, list[float | None]], unit: str, ticks: list[str]) -> None:
        for i, (name, vals) in enumerate(values.items()):
            xs = [g + (i - 1) * width for g in range(len(vals))]
            ys = [v or 0 for v in vals]
            ax.bar(xs, ys, width, label=name, color=colors[name])
            for x, v in zip(xs, vals, strict=True):
                if v:
                    ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, fontsize=8)
        ax.set_ylabel(unit)
        ax.grid(True, axis="y", which="both", alpha=0.3)

    lite_key = {
        "chat": "litellm",
        "chat_stream": "litellm_stream",
        "http": "litellm",
        "http_stream": "litellm_stream",
    }
    cpu = {
        "exai": [_get(series, f"exai_{k}_c{c}", "cpu_ms_per_call") for k, c in groups],
        "floor": [floor[f"{k}_c{c}"]["cpu_ms_per_call"] for k, c in groups],
        "LiteLLM": [_get(series, f"{lite_key[k]}_c{c}", "cpu_ms_per_call") for k, c in groups],
    }
    rate = {
        "exai": [_get(series, f"exai_{k}_c{c}", "calls_per_s") for k, c in groups],
        "floor": [floor[f"{k}_c{c}"]["calls_per_s_per_core"] for k, c in groups],
        "LiteLLM": [_get(series, f"{lite_key[k]}_c{c}", "calls_per_s") for k, c in groups],
    }
    # the daemon's own path: version vs the echo floor (no LiteLLM equivalent)
    cpu_labels = list(labels)
    for c in plan.concurrency:
        cpu_labels.append(f"version\nvs echo c={c}")
        cpu["exai"].append(_get(series, f"exai_version_c{c}", "cpu_ms_per_call"))
        cpu["floor"].append(_get(series, f"echo_c{c}", "cpu_ms_per_call"))
        cpu["LiteLLM"].append(None)
    bars(ax_cpu, cpu, "CPU ms per call (server process; log)", cpu_labels)
    ax_cpu.set_yscale("log")
    ax_cpu.set_title("CPU per call (lower is better)")
    bars(ax_rate, rate, "calls/s", labels)
    ax_rate.set_yscale("log")
    ax_rate.set_title("calls/s (floor: one core ÷ its CPU per call)")
    handles, names = ax_cpu.get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.04))
    ver = _get(series, f"exai_version_c{max(plan.concurrency)}", "cpu_ms_per_call")
    echo = _get(series, f"echo_c{max(plan.concurrency)}", "cpu_ms_per_call")
    fig.suptitle(
        "peer: exai (WebSocket MCP, Streamable HTTP) vs LiteLLM proxy (HTTP) vs floor, "
        "same mock upstream"
        + (f" — version {ver:.3g} ms vs echo {echo:.3g} ms CPU/msg" if ver and echo else "")
    )
    name = plot_name(NAME)
    if plan.plot_dir is None:
        from benchmarks.daemon import save_figure

        return save_figure(fig, name)
    plan.plot_dir.mkdir(parents=True, exist_ok=True)
    path = plan.plot_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)
