"""Store outages: CPU while Redis is dead and Postgres blips; spool replay after two cuts.

Needs PostgreSQL on 127.0.0.1:5432 (trust, user ``postgres``) and Redis on 127.0.0.1:6379; the
scenario creates a database of its own (dropped at the end) and uses a key prefix of its own. Both
stores are reached through :class:`exai.testing.FaultProxy`, so the scenario can cut them.

Three phases, each against a fresh ``exai serve`` process with the mock provider:

1. **Redis dead + Postgres blip**: a few chat calls, then Redis is cut for good (its breaker
   opens, cache invalidations pile up), then Postgres is cut for a second while calls go on (they
   spool), then restored. Figures: the daemon's CPU share over the next ``idle_s`` seconds (from
   ``/proc`` via psutil), a well-behaved client's ``version`` latency meanwhile, the longest loop
   stall, and how long SIGTERM takes to end the process.
2. **Replay after two cuts under a burst**: ``workers`` clients continue their own threads in a
   closed loop; Postgres is cut (reset) for ``cut_s``, restored, cut again (black hole) for
   ``cut_s``, restored; the burst goes on for ``after_s``. The ``status`` tool is polled: spool
   depth and ``replayed`` over time. Figures: peak depth, the time from the last restore until
   the spool is empty, the replay rate, and how many records were replayed at the first poll
   that saw the breaker closed.
3. **SIGTERM flush**: Postgres cut, ``n`` calls spool, Postgres restored, SIGTERM at once.
   Figures: records left in the spool file after the process ended, turns in Postgres.
4. **Drain rate**: Postgres cut while ``drain_calls`` calls (8 clients) fill the spool; Postgres
   restored with no client running. Figures: how long from the restore until the replay applied
   its first record, and the records per second from then until the spool was empty.

Run: ``.venv/bin/python -m benchmarks run spool``. Against another tree's daemon (to compare a
fix with the code before it): ``cd OTHER_TREE && /path/to/.venv/bin/python -m benchmarks run
spool`` (the daemon runs ``python -m exai.cli`` from the working directory).
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

NAME = "spool"
DESCRIPTION = (
    "store outages: daemon CPU while Redis is dead and Postgres blips, spool replay rate after "
    "two Postgres cuts under a burst, spool flushed by a graceful SIGTERM"
)

PG = ("127.0.0.1", 5432)
REDIS = ("127.0.0.1", 6379)


def run(full: bool) -> dict[str, Any]:
    import trio

    result: dict[str, Any] = trio.run(_run, full)
    return result


async def _run(full: bool) -> dict[str, Any]:
    import trio

    from benchmarks.daemon import machine_load

    settings = {
        "idle_s": 10.0 if full else 5.0,
        "workers": 16,
        "cut_s": 1.0,
        "burst_before_s": 2.0,
        "between_cuts_s": 2.0,
        "after_s": 4.0 if full else 3.0,
        "flush_calls": 20,
        "drain_calls": 480,
        "store_timeout_s": 0.5,
    }
    db = f"exai_bench_{uuid.uuid4().hex[:10]}"
    await trio.to_thread.run_sync(_admin_sql, f'CREATE DATABASE "{db}"')
    out: dict[str, Any] = {"settings": settings, "machine_load_at_start": machine_load()}
    try:
        out["redis_dead_postgres_blip"] = await _phase_redis_dead(db, settings)
        out["replay_after_two_cuts"] = await _phase_replay(db, settings)
        out["sigterm_flush"] = await _phase_flush(db, settings)
        out["drain_rate"] = await _phase_drain(db, settings)
    finally:
        await trio.to_thread.run_sync(_admin_sql, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return out


# -------------------------------------------------------------------------- helpers
def _admin_sql(sql: str) -> None:
    import asyncio

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(user="postgres", host=PG[0], port=PG[1], database="postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


def _count_turns(db: str, schema: str) -> int:
    import asyncio

    import asyncpg

    async def go() -> int:
        conn = await asyncpg.connect(user="postgres", host=PG[0], port=PG[1], database=db)
        try:
            return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".exai_turns'))
        finally:
            await conn.close()

    return asyncio.run(go())


class _Daemon:
    """``exai serve`` started from a worker thread (start-up blocks), stopped the same way."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.cm: Any = None
        self.d: Any = None

    async def __aenter__(self) -> Any:
        import trio

        from benchmarks.daemon import exai_daemon

        self.cm = exai_daemon(mock=self.env.pop("mock"), **self.env)
        self.d = await trio.to_thread.run_sync(self.cm.__enter__)
        return self.d

    async def __aexit__(self, *exc: object) -> None:
        import trio

        await trio.to_thread.run_sync(self.cm.__exit__, None, None, None)


async def _chat(url: str, prompt: str, cid: str | None) -> tuple[str, str | None, float]:
    import trio

    import exai
    from exai.errors import ExaiError

    args: dict[str, Any] = {"prompt": prompt, "model": "mock-fast"}
    if cid:
        args["continuation_id"] = cid
    t0 = time.monotonic()
    try:
        with trio.fail_after(30):
            async with exai.Client(url=url) as c:
                res = await c.call_tool("chat", args)
    except ExaiError as exc:
        return exc.reason, cid, time.monotonic() - t0
    except (OSError, trio.TooSlowError) as exc:
        return type(exc).__name__, cid, time.monotonic() - t0
    sc = res.get("structuredContent") or {}
    return "ok", sc.get("continuation_id", cid), time.monotonic() - t0


async def _status(url: str) -> dict[str, Any]:
    import trio

    import exai

    with trio.fail_after(30):
        async with exai.Client(url=url) as c:
            res = await c.call_tool("status", {})
    sc: dict[str, Any] = res.get("structuredContent") or {}
    return sc


async def _version_latencies(url: str, n: int) -> tuple[list[float], int]:
    import trio

    import exai

    out: list[float] = []
    failed = 0
    for _ in range(n):
        t0 = time.monotonic()
        try:
            with trio.fail_after(30):
                async with exai.Client(url=url) as c:
                    await c.call_tool("version", {})
        except Exception:
            failed += 1
        else:
            out.append(time.monotonic() - t0)
        await trio.sleep(0.2)
    return out, failed


def _env(db: str, schema: str, pg_port: int, **extra: Any) -> dict[str, Any]:
    env = {
        "storage_url": f"postgresql://postgres@{PG[0]}:{pg_port}/{db}?schema={schema}",
        "session_rate_per_s": 100000,
        "session_burst": 100000,
        "call_timeout_s": 30,
        "conversation_max_turns": 1000,
    }
    env.update(extra)
    return env


# -------------------------------------------------------------------------- phase 1
async def _phase_redis_dead(db: str, s: dict[str, Any]) -> dict[str, Any]:
    import psutil
    import trio

    from benchmarks.daemon import latency_summary, mock_upstream
    from exai.testing.faultproxy import FaultProxy

    prefix = f"exai-bench:{uuid.uuid4().hex[:10]}:"
    with mock_upstream() as mock:
        async with FaultProxy(*PG) as pg, FaultProxy(*REDIS) as redis:
            env = _env(
                db,
                "p1",
                pg.port,
                mock=mock,
                redis_url=f"redis://{REDIS[0]}:{redis.port}/0",
                redis_key_prefix=prefix,
                store_timeout_s=s["store_timeout_s"],
            )
            async with _Daemon(env) as d:
                cids: list[str | None] = [None] * 4
                for i in range(4):
                    _, cids[i], _ = await _chat(d.url, f"warm {i}", None)
                redis.cut()  # for good
                outcomes = []
                for r in range(3):
                    for i in range(4):
                        o, cids[i], _ = await _chat(d.url, f"redis dead {r}.{i}", cids[i])
                        outcomes.append(o)
                pg.cut()
                for i in range(4):
                    o, cids[i], _ = await _chat(d.url, f"pg cut {i}", cids[i])
                    outcomes.append(o)
                await trio.sleep(s["cut_s"])
                pg.restore()
                await trio.sleep(1.0)
                proc = psutil.Process(d.proc.pid)
                c0 = proc.cpu_times()
                t0 = time.monotonic()
                lat, failed = await _version_latencies(d.url, int(s["idle_s"] / 0.25))
                c1 = proc.cpu_times()
                dt = time.monotonic() - t0
                cpu = (c1.user + c1.system - c0.user - c0.system) / dt
                stall = d.max_loop_stall_s()
                t_term = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                try:
                    await trio.to_thread.run_sync(d.proc.wait, 120)
                    exit_s: float | None = time.monotonic() - t_term
                except Exception:
                    exit_s = None
    return {
        "call_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "daemon_cpu_share": round(cpu, 3),
        "window_s": round(dt, 2),
        "version_latency": latency_summary(lat),
        "version_calls_failed": failed,
        "max_loop_stall": stall,
        "sigterm_to_exit_s": None if exit_s is None else round(exit_s, 2),
    }


# -------------------------------------------------------------------------- phase 2
async def _phase_replay(db: str, s: dict[str, Any]) -> dict[str, Any]:
    import trio

    from benchmarks.daemon import mock_upstream
    from exai.testing.faultproxy import FaultProxy

    samples: list[dict[str, Any]] = []
    outcomes: list[str] = []
    marks: dict[str, float] = {}
    with mock_upstream() as mock:
        async with FaultProxy(*PG) as pg:
            env = _env(db, "p2", pg.port, mock=mock, store_timeout_s=s["store_timeout_s"])
            async with _Daemon(env) as d:
                stop = trio.Event()

                async def worker(w: int) -> None:
                    cid = None
                    n = 0
                    while not stop.is_set():
                        o, new, _ = await _chat(d.url, f"w{w} call {n}", cid)
                        outcomes.append(o)
                        if o == "ok":
                            cid = new
                        n += 1

                async def poll() -> None:
                    t0 = time.monotonic()
                    while True:
                        try:
                            st = await _status(d.url)
                        except Exception:
                            await trio.sleep(0.2)
                            continue
                        conv = st.get("conversations") or {}
                        spool = conv.get("spool") or {}
                        br = (conv.get("primary") or {}).get("breaker") or {}
                        samples.append(
                            {
                                "t": round(time.monotonic() - t0, 3),
                                "depth": spool.get("depth"),
                                "replayed": spool.get("replayed"),
                                "appended": spool.get("appended"),
                                "breaker": br.get("state"),
                            }
                        )
                        await trio.sleep(0.2)

                async with trio.open_nursery() as n:
                    n.start_soon(poll)
                    t_start = time.monotonic()
                    for w in range(s["workers"]):
                        n.start_soon(worker, w)
                    await trio.sleep(s["burst_before_s"])
                    marks["cut1"] = time.monotonic() - t_start
                    pg.cut()
                    await trio.sleep(s["cut_s"])
                    pg.restore()
                    marks["restore1"] = time.monotonic() - t_start
                    await trio.sleep(s["between_cuts_s"])
                    marks["cut2"] = time.monotonic() - t_start
                    pg.cut(mode="blackhole")
                    await trio.sleep(s["cut_s"])
                    pg.restore()
                    marks["restore2"] = time.monotonic() - t_start
                    await trio.sleep(s["after_s"])
                    stop.set()
                    marks["burst_end"] = time.monotonic() - t_start
                    # give the spool up to 60 s to drain after the burst
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        await trio.sleep(0.2)
                        if samples and samples[-1]["depth"] == 0 and len(samples) > 3:
                            last = samples[-3:]
                            if all(x["depth"] == 0 for x in last):
                                break
                    n.cancel_scope.cancel()
    t_offset = samples[0]["t"] if samples else 0.0
    for x in samples:
        x["t"] = round(x["t"] - t_offset, 3)
    r2 = marks["restore2"]
    after = [x for x in samples if x["t"] >= r2]
    empty_at = next((x["t"] for x in after if x["depth"] == 0), None)
    peak = max((x["depth"] or 0 for x in samples), default=0)
    first_closed = next((x for x in after if x["breaker"] == "closed"), None)
    depth_at_r2 = next((x["depth"] for x in after), None)
    rate = None
    if empty_at is not None and depth_at_r2 and empty_at > r2:
        rate = round(depth_at_r2 / (empty_at - r2), 1)
    return {
        "marks_s": {k: round(v, 2) for k, v in marks.items()},
        "calls": len(outcomes),
        "call_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "peak_spool_depth": peak,
        "depth_at_last_restore": depth_at_r2,
        "spool_empty_after_last_restore_s": None if empty_at is None else round(empty_at - r2, 2),
        "replay_rate_records_per_s": rate,
        "first_poll_with_breaker_closed_after_last_restore": first_closed,
        "final": samples[-1] if samples else None,
        "samples": samples,
    }


# -------------------------------------------------------------------------- phase 3
async def _phase_flush(db: str, s: dict[str, Any]) -> dict[str, Any]:
    import trio

    from benchmarks.daemon import mock_upstream
    from exai.testing.faultproxy import FaultProxy

    with mock_upstream() as mock:
        async with FaultProxy(*PG) as pg:
            env = _env(db, "p3", pg.port, mock=mock, store_timeout_s=s["store_timeout_s"])
            async with _Daemon(env) as d:
                state = Path(d.state_dir)
                _, cid, _ = await _chat(d.url, "before the cut", None)
                pg.cut()
                outcomes = []
                for i in range(s["flush_calls"]):
                    o, cid, _ = await _chat(d.url, f"spooled {i}", cid)
                    outcomes.append(o)
                spool_files = list((state / "spool").glob("*.spool"))
                before = sum(_lines(p) for p in spool_files)
                pg.restore()
                t_term = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                await trio.to_thread.run_sync(d.proc.wait, 120)
                exit_s = time.monotonic() - t_term
                left = sum(_lines(p) for p in spool_files)
    stored = await trio.to_thread.run_sync(_count_turns, db, "p3")
    return {
        "call_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "spool_records_before_sigterm": before,
        "spool_records_left_after_exit": left,
        "turns_in_postgres": stored,
        "turns_expected": 2 * (1 + s["flush_calls"]),
        "sigterm_to_exit_s": round(exit_s, 2),
    }


# -------------------------------------------------------------------------- phase 4
async def _phase_drain(db: str, s: dict[str, Any]) -> dict[str, Any]:
    import trio

    from benchmarks.daemon import mock_upstream
    from exai.testing.faultproxy import FaultProxy

    samples: list[tuple[float, int, int]] = []
    with mock_upstream() as mock:
        async with FaultProxy(*PG) as pg:
            env = _env(db, "p4", pg.port, mock=mock, store_timeout_s=s["store_timeout_s"])
            async with _Daemon(env) as d:
                pg.cut()
                per = s["drain_calls"] // 8
                outcomes: list[str] = []

                async def worker(w: int) -> None:
                    cid = None
                    for i in range(per):
                        o, cid, _ = await _chat(d.url, f"w{w} {i}", cid)
                        outcomes.append(o)

                async with trio.open_nursery() as n:
                    for w in range(8):
                        n.start_soon(worker, w)
                st = (await _status(d.url))["conversations"]["spool"]
                spooled = st["depth"]
                pg.restore()
                t0 = time.monotonic()
                deadline = t0 + 120
                while time.monotonic() < deadline:
                    st = (await _status(d.url))["conversations"]["spool"]
                    samples.append((time.monotonic() - t0, st["depth"], st["replayed"]))
                    if st["depth"] == 0:
                        break
                    await trio.sleep(0.05)
    first = next((t for t, _, r in samples if r > 0), None)
    empty = next((t for t, depth, _ in samples if depth == 0), None)
    rate = None
    if first is not None and empty is not None and empty > first:
        rate = round(spooled / (empty - first), 1)
    return {
        "call_outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "spooled_records": spooled,
        "first_record_replayed_after_restore_s": None if first is None else round(first, 2),
        "spool_empty_after_restore_s": None if empty is None else round(empty, 2),
        "records_per_s_once_replaying": rate,
    }


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


__all__ = ["DESCRIPTION", "NAME", "run"]
