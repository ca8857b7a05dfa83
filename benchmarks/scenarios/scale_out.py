"""Scale-out: calls/s through HAProxy with 1, 2 and 3 daemons sharing Redis and PostgreSQL.

The deployment of docs/deploy.md, on loopback: HAProxy running ``deploy/haproxy.cfg`` (the tested
configuration) in front of three ``exai serve`` slots (``tests/scaleout/cluster.py``), every
daemon on the same PostgreSQL database and the same Redis, one fast mock upstream (latency 0).
The load is ``benchmarks.load.closed`` (mode ``mcp``, ``chat``, each call with an
``exai/idempotencyKey`` as ``exai bridge`` sends it) from its own process.

* **throughput**: the same closed-loop load through the balancer with 1, then 2, then 3 daemons
  running (HAProxy's ``leastconn`` spreads the sessions; the others are DOWN in its table):
  calls/s, latency, how the calls split over the daemons, and CPU per call of each process
  (daemons, HAProxy, Redis, PostgreSQL, the mock, the load generator) from their own CPU time
  in the measured window — the figure that says what limits scaling on a machine whose cores
  are shared by all of them.
* **Redis round trips per call**: a private ``redis-server`` of the run, so ``INFO
  commandstats`` counts exai's commands only; the background rate (provider-health polls, …)
  is measured idle and subtracted. The provider has large RPM and TPM limits so the shared
  buckets are on the path, as they would be in production.
* **the balancer hop**: one connection, one call at a time, alternately straight to a daemon and
  through HAProxy to the same daemon (only it running): the difference of the medians is what
  the hop adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.daemon import (
    LoadProcess,
    free_port,
    latency_summary,
    machine_load,
    mock_upstream,
    plot_name,
    pyplot,
    save_figure,
)

NAME = "scale_out"
DESCRIPTION = (
    "calls/s through HAProxy with 1, 2 and 3 daemons on shared Redis and PostgreSQL, Redis round "
    "trips per call, and the latency the balancer hop adds"
)

PG = {"user": "postgres", "host": "127.0.0.1", "port": 5432}
CONNECTIONS = 48


# ---------------------------------------------------------------------------- services
@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A ``redis-server`` of this run on a free port (its own command statistics)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="exai-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
         "no", "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def redis_commands(url: str) -> dict[str, int]:
    """``INFO commandstats``: calls per command (the INFO calls themselves left out)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {
        k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"
    }


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A database of this run on the loopback PostgreSQL (dropped at the end)."""
    import asyncpg

    name = f"exai_bench_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(database="postgres", **PG)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def postgres_pid() -> int | None:
    """The postmaster (its backends are its children)."""
    import psutil

    for p in psutil.process_iter(["name", "ppid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if p.info.get("name") in ("postgres", "postmaster") and (
            "-D" in cmd or "config_file" in cmd
        ):
            return int(p.pid)
    return None


# ---------------------------------------------------------------------------- measuring
def _load(
    url: str, *, connections: int, duration_s: float, warmup_s: float, pids: dict, tool: str
) -> Any:
    cfg = {
        "tool": tool,
        "arguments": {"prompt": "scale out", "model": "mock-fast"} if tool == "chat" else {},
        "mode": "mcp",
        "url": url,
        "connections": connections,
        "inflight": 1,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "prompt": "scale out",
        "model": "mock-fast",
        "idempotency": True,
        "cpu_pids": ["self", *pids.values()],
    }
    return LoadProcess("closed", cfg).result(duration_s + warmup_s + 120)


def _series(res: dict[str, Any], pids: dict[str, int]) -> dict[str, Any]:
    recs = res["records"]
    lat = [lat for lat, o in zip(recs["lat"], recs["outcome"], strict=True) if o == "ok"]
    meter = res.get("meter") or {}
    window = meter.get("window_s") or 0.0
    completed = meter.get("completed") or 0
    by_pid = {int(k): v for k, v in (meter.get("cpu_s") or {}).items()}
    names = {pid: name for name, pid in pids.items()}
    cpu_per_call: dict[str, float] = {}
    for pid, cpu in by_pid.items():
        label = names.get(pid, "load generator")
        key = "daemons" if label.startswith("exai") else label
        if completed:
            cpu_per_call[key] = cpu_per_call.get(key, 0.0) + cpu / completed * 1000
    outcomes: dict[str, int] = {}
    for o in recs["outcome"]:
        outcomes[o] = outcomes.get(o, 0) + 1
    return {
        "calls_per_s": round(completed / window, 1) if window else None,
        "completed": completed,
        "completed_ok": meter.get("completed_ok"),
        "window_s": window,
        "latency": latency_summary(lat),
        "outcomes": outcomes,
        "cpu_ms_per_call": {k: round(v, 3) for k, v in sorted(cpu_per_call.items())},
        "cpu_ms_per_call_total": round(sum(cpu_per_call.values()), 3),
    }


def run(full: bool) -> dict[str, Any]:
    from tests.scaleout.cluster import find_haproxy

    duration_s = 20.0 if full else 6.0
    warmup_s = 2.0 if full else 1.0
    hop_rounds = 3
    hop_s = 10.0 if full else 3.0
    haproxy = find_haproxy()
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {
            "connections": CONNECTIONS,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "hop_rounds": hop_rounds,
            "hop_series_s": hop_s,
            "haproxy_cfg": "deploy/haproxy.cfg",
            "upstream_latency_s": 0.0,
        },
    }
    if haproxy is None:
        result["measured"] = False
        result["reason"] = "haproxy is not installed (apt-get install -y haproxy)"
        return result
    version = subprocess.run([haproxy, "-v"], capture_output=True, text=True).stdout
    result["settings"]["haproxy"] = version.splitlines()[0] if version else None
    with (
        private_redis() as (redis_url, redis_proc),
        pg_database() as storage_url,
        mock_upstream(latency_s=0.0, models="mock-fast") as mock,
    ):
        import trio

        figures = trio.run(
            _measure,
            mock,
            storage_url,
            redis_url,
            redis_proc.pid,
            duration_s,
            warmup_s,
            hop_rounds,
            hop_s,
            haproxy,
        )
    result.update(figures)
    result["plots"] = [_plot(result)]
    return result


async def _measure(
    mock: Any,
    storage_url: str,
    redis_url: str,
    redis_pid: int,
    duration_s: float,
    warmup_s: float,
    hop_rounds: int,
    hop_s: float,
    haproxy: str,
) -> dict[str, Any]:
    import trio

    from tests.scaleout.cluster import open_cluster

    out: dict[str, Any] = {}
    env = {
        "EXAI_LOG_LEVEL": "warning",
        "EXAI_PROVIDER_MOCK_MODELS": "mock-fast",
        "EXAI_PROVIDER_MOCK_RPM": "10000000",
        "EXAI_PROVIDER_MOCK_TPM": "1000000000",
        "EXAI_MAX_INFLIGHT": "256",
        "EXAI_SESSION_MAX_INFLIGHT": "16",
    }
    directory = Path(tempfile.mkdtemp(prefix="exai-bench-scaleout-"))
    try:
        async with open_cluster(
            directory,
            mock_url=mock.base_url,
            storage_url=storage_url,
            redis_prefix="exai:",
            redis_url=redis_url,
            running=1,
            env=env,
            haproxy=haproxy,
        ) as cluster:
            lb_pid = cluster.lb.proc.pid if cluster.lb.proc else 0
            pg_pid = postgres_pid()

            def pids() -> dict[str, int]:
                p = {d.name: d.pid for d in cluster.daemons if d.alive() and d.pid}
                p["haproxy"] = lb_pid
                p["redis"] = redis_pid
                p["mock upstream"] = mock.pid
                if pg_pid:
                    p["postgres (whole server)"] = pg_pid
                return p

            async def load(
                url: str, connections: int, seconds: float, tool: str = "chat"
            ) -> dict[str, Any]:
                p = pids()
                res = await trio.to_thread.run_sync(
                    lambda: _load(
                        url, connections=connections, duration_s=seconds, warmup_s=warmup_s,
                        pids=p, tool=tool,
                    )
                )  # fmt: skip
                return {"raw": res, "pids": p}

            # -- the balancer hop: one call at a time, direct vs through HAProxy ------------
            # ``version`` (no upstream, no store) shows the hop itself; ``chat`` the whole call
            first = cluster.daemons[0]
            out["balancer_hop"] = {}
            for tool in ("version", "chat"):
                hop: dict[str, list[float]] = {"direct": [], "haproxy": []}
                for _ in range(hop_rounds):
                    for label, url in (("direct", first.url), ("haproxy", cluster.url)):
                        got = await load(url, 1, hop_s, tool=tool)
                        recs = got["raw"]["records"]
                        hop[label] += [
                            lat
                            for lat, o in zip(recs["lat"], recs["outcome"], strict=True)
                            if o == "ok"
                        ]
                direct, via = latency_summary(hop["direct"]), latency_summary(hop["haproxy"])
                out["balancer_hop"][tool] = {
                    "direct": direct,
                    "through_haproxy": via,
                    "added_p50_ms": round(via["p50_ms"] - direct["p50_ms"], 3),
                    "added_p99_ms": round(via["p99_ms"] - direct["p99_ms"], 3),
                }

            # -- throughput with 1, 2, 3 daemons ---------------------------------------------
            series = []
            for n in (1, 2, 3):
                for d in cluster.daemons[:n]:
                    if not d.alive():
                        await d.start()
                await cluster.wait_all_up()
                live = [d for d in cluster.daemons if d.alive()]
                idle0 = redis_commands(redis_url)
                idle_trips0 = sum([await d.redis_round_trips() for d in live])
                await trio.sleep(2.0)
                idle1 = redis_commands(redis_url)
                idle_trips1 = sum([await d.redis_round_trips() for d in live])
                idle_per_s = sum(idle1.values()) - sum(idle0.values())
                # (each reading is one status call: it sends no Redis command)
                idle_trips_per_s = (idle_trips1 - idle_trips0) / 2.0
                calls0 = {d.name: await d.metric("exai_calls_total", outcome="ok") for d in
                          cluster.daemons if d.alive()}  # fmt: skip
                trips0 = sum([await d.redis_round_trips() for d in cluster.daemons if d.alive()])
                before = redis_commands(redis_url)
                t0 = trio.current_time()
                got = await load(cluster.url, CONNECTIONS, duration_s)
                elapsed = trio.current_time() - t0
                after = redis_commands(redis_url)
                calls1 = {d.name: await d.metric("exai_calls_total", outcome="ok") for d in
                          cluster.daemons if d.alive()}  # fmt: skip
                trips1 = sum([await d.redis_round_trips() for d in cluster.daemons if d.alive()])
                s = _series(got["raw"], got["pids"])
                total_calls = sum(calls1.values()) - sum(calls0.values())
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                delta = {k: v for k, v in delta.items() if v}
                background = idle_per_s / 2.0 * elapsed
                s["daemons"] = n
                s["calls_by_daemon"] = {k: calls1[k] - calls0.get(k, 0) for k in calls1}
                s["redis"] = {
                    # the daemons' own count of commands sent (one network round trip each)
                    "round_trips_per_call": (
                        round((trips1 - trips0 - idle_trips_per_s * elapsed) / total_calls, 3)
                        if total_calls
                        else None
                    ),
                    "background_round_trips_per_s": idle_trips_per_s,
                    "calls_counted": total_calls,
                    # the server's count: also every command a Lua script ran inside it
                    "commands": delta,
                    "background_commands_per_s": round(idle_per_s / 2.0, 1),
                    "server_commands_per_call": (
                        round((sum(delta.values()) - background) / total_calls, 3)
                        if total_calls
                        else None
                    ),
                    "server_commands_by_name_per_call": {
                        k: round(v / total_calls, 3) for k, v in delta.items() if total_calls
                    },
                }
                series.append(s)
            out["throughput"] = series
            base = series[0]["calls_per_s"] or 0
            out["scaling"] = {
                f"{s['daemons']}_daemons_vs_1": (
                    round(s["calls_per_s"] / base, 3) if base and s["calls_per_s"] else None
                )
                for s in series
            }
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return out


def _plot(result: dict[str, Any]) -> str:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = result.get("throughput") or []
    ns = [s["daemons"] for s in series]
    ax1.bar([str(n) for n in ns], [s["calls_per_s"] or 0 for s in series], color="#4c72b0")
    for i, s in enumerate(series):
        ax1.text(i, (s["calls_per_s"] or 0), f"{s['calls_per_s']}", ha="center", va="bottom")
    ax1.set_xlabel("daemons behind HAProxy")
    ax1.set_ylabel("calls/s (chat, closed loop, 48 sessions)")
    ax1.set_title("throughput through the balancer")
    keys = sorted({k for s in series for k in s["cpu_ms_per_call"]})
    bottom = [0.0] * len(series)
    for k in keys:
        vals = [s["cpu_ms_per_call"].get(k, 0.0) for s in series]
        ax2.bar([str(n) for n in ns], vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set_xlabel("daemons behind HAProxy")
    ax2.set_ylabel("CPU ms per call")
    ax2.set_title("where each call's CPU goes (2 cores shared by all)")
    ax2.legend(fontsize=7)
    return save_figure(fig, plot_name(NAME))
