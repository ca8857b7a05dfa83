"""The PostgreSQL store: migrations, its own schema, idempotent and race-free appends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from exai.errors import ConfigError, StoreUnavailableError
from exai.storage.aio_bridge import AsyncioBridge, BridgedPgPool, open_asyncio_bridge
from exai.storage.migrate import migrate_storage
from exai.storage.model import Turn
from exai.storage.postgres import MIGRATIONS, PostgresStore, parse_postgres_url
from exai.storage.stores import open_store
from tests.storage.conftest import PG_HOST, PG_PORT, pg_settings

pytestmark = pytest.mark.anyio


def _turn(content: str, key: str, at: float = 1000.0, thread: str = "t1") -> Turn:
    return Turn(role="user", content=content, created_at=at, idempotency_key=key, thread_id=thread)


@asynccontextmanager
async def pg_store(
    tmp_path: Path, database: str, schema: str, bridge: AsyncioBridge
) -> AsyncIterator[PostgresStore]:
    async with open_store(pg_settings(tmp_path, database, schema), bridge) as store:
        assert isinstance(store, PostgresStore)
        yield store


async def _count(store: PostgresStore, sql: str, *args: object) -> int:
    return await store.pool.run(lambda c: c.fetchval(sql, *args))


def test_the_schema_parameter_is_exais_and_the_rest_goes_to_asyncpg() -> None:
    dsn, schema = parse_postgres_url("postgres://u:p@h:5432/db?schema=exai_1&sslmode=disable")
    assert (dsn, schema) == ("postgresql://u:p@h:5432/db?sslmode=disable", "exai_1")
    assert parse_postgres_url("postgresql://h/db") == ("postgresql://h/db", None)
    with pytest.raises(ConfigError):
        parse_postgres_url("postgresql://h/db?schema=bad;name")


async def test_migrations_run_once_and_tables_live_in_the_own_schema(
    tmp_path: Path, pg_database: str, pg_schema: str, stall_detector: object
) -> None:
    async with open_asyncio_bridge() as bridge:
        async with pg_store(tmp_path, pg_database, pg_schema, bridge) as store:
            assert store.migrations_applied == [v for v, _ in MIGRATIONS]
            tables = await store.pool.run(
                lambda c: c.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
                    "ORDER BY table_name",
                    pg_schema,
                )
            )
        assert [r[0] for r in tables] == ["exai_migrations", "exai_threads", "exai_turns"]
        async with pg_store(tmp_path, pg_database, pg_schema, bridge) as store:
            assert store.migrations_applied == []


async def test_two_daemons_migrating_at_once_apply_each_migration_once(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    applied: list[list[int]] = []
    async with open_asyncio_bridge() as bridge:

        async def start() -> None:
            async with pg_store(tmp_path, pg_database, pg_schema, bridge) as store:
                applied.append(store.migrations_applied)

        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            tg.start_soon(start)
    assert sorted(applied) == [[], [v for v, _ in MIGRATIONS]]


async def test_exai_migrate_reports_what_it_applied(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    first = await migrate_storage(pg_settings(tmp_path, pg_database, pg_schema))
    second = await migrate_storage(pg_settings(tmp_path, pg_database, pg_schema))
    assert first["applied"] == [v for v, _ in MIGRATIONS] and second["applied"] == []
    assert "password" not in str(first)


async def test_writing_the_same_turn_twice_leaves_one_row(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    async with (
        open_asyncio_bridge() as bridge,
        pg_store(tmp_path, pg_database, pg_schema, bridge) as store,
    ):
        first = await store.append_turn(_turn("hello", "x"), "call-1#0")
        second = await store.append_turn(_turn("hello", "x"), "call-1#0")
        rows = await _count(
            store, "SELECT count(*) FROM exai_turns WHERE idempotency_key = $1", "call-1#0"
        )
        thread = await store.get_thread("t1")
    assert (first, second) == (True, False)
    assert rows == 1
    assert thread is not None and [t.seq for t in thread.turns] == [1]


async def test_concurrent_appends_from_two_pools_get_gap_free_seqs(
    tmp_path: Path, pg_database: str, pg_schema: str, stall_detector: object
) -> None:
    async with (
        open_asyncio_bridge() as bridge,
        pg_store(tmp_path, pg_database, pg_schema, bridge) as a,
        pg_store(tmp_path, pg_database, pg_schema, bridge) as b,
    ):
        async with anyio.create_task_group() as tg:
            for i in range(30):
                store = a if i % 2 else b
                tg.start_soon(store.append_turns, "t1", [_turn(f"m{i}", f"k{i}#0")])
                # the same writes again, racing: each must land once
                tg.start_soon(store.append_turns, "t1", [_turn(f"m{i}", f"k{i}#0")])
        thread = await a.get_thread("t1")
    assert thread is not None
    assert [t.seq for t in thread.turns] == list(range(1, 31))
    assert sorted(t.content for t in thread.turns) == sorted(f"m{i}" for i in range(30))


async def test_a_thread_reads_back_with_every_field(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    turn = Turn(
        role="assistant",
        content="é ✓",
        tool="consensus",
        provider="glm",
        model="glm-4.6",
        files=("/a", "/b c"),
        created_at=1234.5,
        thread_id="t1",
        idempotency_key="k#0",
    )
    async with (
        open_asyncio_bridge() as bridge,
        pg_store(tmp_path, pg_database, pg_schema, bridge) as store,
    ):
        await store.append_turns("t1", [turn])
        thread = await store.get_thread("t1")
        assert await store.get_thread("missing") is None
    assert thread is not None
    got = thread.turns[0]
    assert (got.role, got.content, got.tool, got.provider, got.model, got.files) == (
        "assistant",
        "é ✓",
        "consensus",
        "glm",
        "glm-4.6",
        ("/a", "/b c"),
    )
    assert (got.created_at, got.seq, got.idempotency_key) == (1234.5, 1, "k#0")
    assert thread.expires_at == 1234.5 + pg_settings(tmp_path, "x", "y").conversation_ttl_s


async def test_delete_expired_removes_old_threads_and_their_turns(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    async with (
        open_asyncio_bridge() as bridge,
        pg_store(tmp_path, pg_database, pg_schema, bridge) as store,
    ):
        ttl = pg_settings(tmp_path, "x", "y").conversation_ttl_s
        await store.append_turns("old", [_turn("a", "o#0", at=100.0, thread="old")])
        await store.append_turns("new", [_turn("b", "n#0", at=100.0 + ttl, thread="new")])
        assert await store.delete_expired(now=100.0 + ttl + 1) == 1
        assert await _count(store, "SELECT count(*) FROM exai_turns") == 1


async def test_status_shows_pool_use_and_no_password(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    async with open_asyncio_bridge() as bridge:
        store = PostgresStore(
            f"postgresql://postgres:s3cret@{PG_HOST}:{PG_PORT}/{pg_database}",
            bridge,
            schema=pg_schema,
            ttl_s=60.0,
            pool_min=1,
            pool_max=3,
        )
        async with store:
            status = store.status()
    assert status["pool"]["max"] == 3 and status["pool"]["in_use"] == 0
    assert "s3cret" not in str(status)


async def test_an_unreachable_server_fails_to_open_as_store_unavailable(tmp_path: Path) -> None:
    async with open_asyncio_bridge() as bridge:
        store = PostgresStore("postgresql://postgres@127.0.0.1:1/x", bridge, ttl_s=60.0)
        with pytest.raises(StoreUnavailableError):
            async with store:
                pass


async def test_the_pool_is_bounded_by_settings(
    tmp_path: Path, pg_database: str, pg_schema: str
) -> None:
    settings = pg_settings(tmp_path, pg_database, pg_schema, pg_pool_max=2)
    async with open_asyncio_bridge() as bridge, open_store(settings, bridge) as store:
        assert isinstance(store, PostgresStore)
        peak = 0
        pool: BridgedPgPool = store.pool

        async def hold() -> None:
            nonlocal peak
            await pool.run(lambda c: c.execute("SELECT pg_sleep(0.05)"))
            peak = max(peak, pool.status()["size"])

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(hold)
    assert peak <= 2
