"""SQLite turn writes: writes/s and CPU per durable write at 1 and 64 concurrent writers (issue 18).

One trio process opens exai's :class:`~exai.storage.sqlite.SQLiteStore` on a fresh file (WAL,
``synchronous=FULL``, in the system's temporary directory — the same disk as the state
directory here) and runs ``writers`` closed loops, each
calling ``append_turns`` with a chat call's two turns (a new thread each time, as a first chat
call does) and waiting for it to be durable. Per series: writes completed per second of the
window, this process's CPU time (all threads: the event loop and SQLite's worker thread) per
write, and — where the store reports it — how many ``COMMIT`` transactions carried them (group
commit puts many writes in one). Series are interleaved over rounds; a fresh file per series.

Run: ``.venv/bin/python -m benchmarks run store_writes [--full]``. The same file runs on an older
commit too (copy it there): it reads the group counters only when the store has them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

NAME = "store_writes"
DESCRIPTION = (
    "SQLite append_turns (two turns, durable) at 1 and 64 concurrent writers: writes/s, CPU per "
    "write (loop + worker thread) and COMMITs per write"
)

WRITERS = (1, 64)


def run(full: bool) -> dict[str, Any]:
    import trio

    from benchmarks.daemon import machine_load

    rounds, duration_s, warmup_s = (3, 6.0, 1.0) if full else (1, 2.0, 0.5)
    load0 = machine_load()
    per: dict[int, list[dict[str, Any]]] = {w: [] for w in WRITERS}
    loads = []
    tmp = Path(tempfile.mkdtemp(prefix="exai-bench-store-"))
    try:
        for r in range(rounds):
            for writers in WRITERS:
                path = tmp / f"r{r}-w{writers}.sqlite3"
                per[writers].append(trio.run(_series, path, writers, duration_s, warmup_s))
            loads.append(machine_load())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    series = {}
    for writers, rs in per.items():
        n = sum(x["writes"] for x in rs)
        cpu = sum(x["cpu_s"] for x in rs)
        commits = None if any(x["commits"] is None for x in rs) else sum(x["commits"] for x in rs)
        series[f"writers_{writers}"] = {
            "writes_per_s": round(n / (duration_s * len(rs)), 1),
            "cpu_ms_per_write": round(1000 * cpu / n, 4) if n else None,
            "writes": n,
            "commits": commits,
            "writes_per_commit": round(n / commits, 2) if commits else None,
            "per_round": [
                {
                    "writes_per_s": round(x["writes"] / duration_s, 1),
                    "cpu_ms_per_write": round(1000 * x["cpu_s"] / x["writes"], 4)
                    if x["writes"]
                    else None,
                }
                for x in rs
            ],
        }
    return {
        "settings": {
            "rounds": rounds,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "writers": list(WRITERS),
            "turns_per_write": 2,
            "pragmas": "journal_mode=WAL, synchronous=FULL",
        },
        "machine_load_at_start": load0,
        "machine_load_after_each_round": loads,
        "series": series,
    }


async def _series(path: Path, writers: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    import trio

    from exai.storage.model import Turn
    from exai.storage.sqlite import SQLiteStore

    state = {"count": False, "n": 0}
    stop = trio.Event()
    async with SQLiteStore(path, ttl_s=3600.0, busy_timeout_s=5.0) as store:

        async def writer() -> None:
            while not stop.is_set():
                tid = uuid.uuid4().hex
                now = time.time()
                turns = [
                    Turn(role="user", content="ping", tool="chat", created_at=now,
                         idempotency_key=f"{tid}#0"),
                    Turn(role="assistant", content="mock:mock-fast: ping", tool="chat",
                         provider="mock", model="mock-fast", created_at=now,
                         idempotency_key=f"{tid}#1"),
                ]  # fmt: skip
                await store.append_turns(tid, turns, owner="bench", creation_key=f"bench:{tid}")
                if state["count"]:
                    state["n"] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(writers):
                nursery.start_soon(writer)
            await trio.sleep(warmup_s)
            commits0 = getattr(store, "group_commits", None)
            cpu0 = time.process_time()
            state["count"] = True
            await trio.sleep(duration_s)
            state["count"] = False
            cpu = time.process_time() - cpu0
            commits1 = getattr(store, "group_commits", None)
            n = state["n"]
            stop.set()
    commits = None if commits0 is None or commits1 is None else commits1 - commits0
    if commits is None:
        commits = n  # before group commit: one transaction per write
    return {"writes": n, "cpu_s": cpu, "commits": commits}
