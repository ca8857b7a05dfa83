"""Must-shows 4 and 6: PostgreSQL and Redis cut and restored under load (fault proxy)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import attrs
import pytest

from exai.config import Secret
from exai.errors import ExaiError
from exai.resilience import CircuitBreaker
from exai.storage.aio_bridge import BridgedPgPool, open_asyncio_bridge
from exai.storage.model import Turn
from exai.storage.service import ConversationService
from exai.testing.faultproxy import FaultProxy
from tests.storage.conftest import (
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    make_settings,
    pg_settings,
    pg_url,
    redis_url,
)

pytestmark = pytest.mark.anyio

#: the reasons a call may fail with during an outage (anything else fails the test)
EXPLICIT_REASONS = {"storage_unavailable", "store_unavailable", "circuit_open"}


def quick_breaker(name: str) -> CircuitBreaker:
    return CircuitBreaker(
        name,
        minimum_calls=2,
        window_size=4,
        open_duration_s=0.1,
        max_open_duration_s=0.4,
        slow_call_duration_s=10.0,
    )


async def _run_calls_through_cuts(
    tmp_path: Path, pg_database: str, pg_schema: str, calls: int, workers: int
) -> None:
    """``calls`` tool calls (read the thread, write a user and an assistant turn) from
    ``workers`` concurrent clients while Postgres is cut (reset) and restored, then cut
    (black hole) and restored; then every succeeded call's turns must be in Postgres exactly
    once and in call order."""
    outcomes: dict[str, str] = {}  # call key -> "ok" or the failure reason
    threads: dict[int, str] = {}
    done = 0
    progress = anyio.Condition()
    async with FaultProxy(PG_HOST, PG_PORT) as proxy, open_asyncio_bridge() as bridge:
        settings = attrs.evolve(
            make_settings(tmp_path),
            storage_url=Secret(pg_url(pg_database, schema=pg_schema, port=proxy.port)),
            store_timeout_s=0.5,
            conversation_max_turns=1000,
        )
        async with ConversationService.open(
            settings,
            bridge=bridge,
            breaker=quick_breaker("store:postgres"),
            replay_min_delay_s=0.02,
        ) as svc:

            async def client(worker: int) -> None:
                nonlocal done
                thread_id = None
                for i in range(calls // workers):
                    key = f"w{worker}-c{i:03d}"
                    try:
                        with anyio.fail_after(3):
                            thread = await svc.start_or_continue(thread_id, "chat")
                            thread_id = thread.id
                            threads[worker] = thread.id
                            await svc.add_turns(
                                thread,
                                [
                                    Turn(role="user", content=f"{key}:q"),
                                    Turn(role="assistant", content=f"{key}:a"),
                                ],
                                key,
                            )
                        outcomes[key] = "ok"
                    except ExaiError as exc:
                        outcomes[key] = exc.to_error_data()["reason"]
                    async with progress:
                        done += 1
                        progress.notify_all()

            async def until(n: int) -> None:
                async with progress:
                    while done < n:
                        await progress.wait()

            async with anyio.create_task_group() as tg:
                for w in range(workers):
                    tg.start_soon(client, w)
                await until(calls * 2 // 10)
                proxy.cut()
                await until(calls * 4 // 10)
                proxy.restore()
                await until(calls * 6 // 10)
                proxy.cut(mode="blackhole")
                await until(calls * 8 // 10)
                proxy.restore()
            spooled = svc.spooled_writes
            with anyio.fail_after(30):
                await svc.wait_replayed()

    failures = {k: r for k, r in outcomes.items() if r != "ok"}
    assert len(outcomes) == calls
    assert set(failures.values()) <= EXPLICIT_REASONS, failures
    assert spooled > 0, "the cuts never made a write go to the spool"

    # straight to Postgres, not through the proxy
    async with open_asyncio_bridge() as bridge:
        pool = await BridgedPgPool.create(
            bridge,
            f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{pg_database}",
            min_size=1,
            max_size=1,
            server_settings={"search_path": pg_schema},
        )
        try:
            rows = await pool.run(
                lambda c: c.fetch(
                    "SELECT thread_id, seq, content, idempotency_key FROM exai_turns "
                    "ORDER BY thread_id, seq"
                )
            )
        finally:
            await pool.close()
    rows = [dict(r) for r in rows]
    contents = [r["content"] for r in rows]
    assert len(contents) == len(set(contents)), "a turn was stored twice"
    stored = set(contents)
    for key, outcome in outcomes.items():
        if outcome == "ok":
            assert {f"{key}:q", f"{key}:a"} <= stored, f"call {key} succeeded but was lost"
    for worker, thread_id in threads.items():
        mine = [r for r in rows if r["thread_id"] == thread_id]
        assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
        order = [r["content"] for r in mine]
        assert order == sorted(order, key=lambda c: (c[:-2], c.endswith(":a"))), (
            f"worker {worker}'s turns are out of call order"
        )


async def test_200_calls_through_two_postgres_cuts_lose_and_duplicate_nothing(
    tmp_path: Path, pg_database: str, pg_schema: str, stall_detector: object
) -> None:
    await _run_calls_through_cuts(tmp_path, pg_database, pg_schema, calls=200, workers=8)


@pytest.mark.slow
async def test_2000_calls_through_two_postgres_cuts_lose_and_duplicate_nothing(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    await _run_calls_through_cuts(tmp_path, pg_database, pg_schema, calls=2000, workers=25)


async def test_calls_keep_working_while_redis_is_cut_and_its_breaker_recovers(
    tmp_path: Path, pg_database: str, pg_schema: str, redis_prefix: str, stall_detector: object
) -> None:
    async with FaultProxy(REDIS_HOST, REDIS_PORT) as proxy, open_asyncio_bridge() as bridge:
        settings = pg_settings(
            tmp_path,
            pg_database,
            pg_schema,
            redis_url=redis_url(port=proxy.port),
            redis_key_prefix=redis_prefix,
            store_timeout_s=0.5,
        )
        async with ConversationService.open(
            settings, bridge=bridge, redis_breaker=quick_breaker("redis")
        ) as svc:
            assert svc.cache is not None
            breaker = svc.cache.guard.breaker
            thread = await svc.start_or_continue(None, "chat")
            thread = await svc.add_turns(thread, [Turn(role="user", content="before")], "c0")
            await svc.start_or_continue(thread.id, "chat")  # fills the cache

            for mode in ("refuse", "blackhole"):
                trips_before = breaker.statistics().trips
                proxy.cut(mode=mode)  # type: ignore[arg-type]
                for i in range(6):
                    with anyio.fail_after(3):
                        thread = await svc.start_or_continue(thread.id, "chat")
                        thread = await svc.add_turns(
                            thread, [Turn(role="user", content=f"{mode}-{i}")], f"{mode}-{i}"
                        )
                # (a count, not the state: on a busy machine the open time may be over by now)
                assert breaker.statistics().trips >= trips_before + 1
                assert svc.spool.depth == 0  # Redis down never touches durability
                proxy.restore()
                with anyio.fail_after(5):
                    while breaker.state != "closed":
                        await anyio.sleep(0.05)
                        await svc.start_or_continue(thread.id, "chat")

            with anyio.fail_after(5):
                await svc.wait_replayed()  # pending invalidations delivered
            fresh = await svc.start_or_continue(thread.id, "chat")
            status = svc.status()
    assert [t.content for t in fresh.turns] == ["before"] + [
        f"{m}-{i}" for m in ("refuse", "blackhole") for i in range(6)
    ]
    assert status["redis"]["errors"] + status["redis"]["rejected"] > 0
    assert status["redis"]["breaker"]["trips"] >= 2


def test_no_blocking_io_in_the_storage_package() -> None:
    """Must-show 7 (static half): ruff's ASYNC rules pass on exai/storage."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run(
        [str(ruff), "check", "--select", "ASYNC", "exai/storage", "tests/storage"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
