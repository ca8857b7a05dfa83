"""The SQLite store: schema, WAL, idempotent appends, order, expiry, and no blocking calls."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from exai.errors import ConfigError, StoreError, StoreUnavailableError
from exai.storage.base import AppendResult
from exai.storage.model import Turn
from exai.storage.spool import open_spool
from exai.storage.sqlite import SCHEMA_VERSION, SQLiteStore, sqlite_path

pytestmark = pytest.mark.anyio


def _turn(content: str, key: str, at: float = 1000.0, role: str = "user") -> Turn:
    return Turn(
        role=role,
        content=content,
        tool="chat",
        created_at=at,
        idempotency_key=key,
        thread_id="t1",
    )


def _count_turns(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM turns").fetchone()[0]
    finally:
        conn.close()


def test_sqlite_urls_follow_the_three_and_four_slash_convention() -> None:
    assert sqlite_path("sqlite:////var/lib/exai.db") == Path("/var/lib/exai.db")
    assert sqlite_path("sqlite:///state/exai.db") == Path("state/exai.db")
    with pytest.raises(ConfigError):
        sqlite_path("sqlite:///")


async def test_new_database_is_in_wal_mode_with_the_current_schema_version(
    tmp_path: Path, stall_detector: object
) -> None:
    path = tmp_path / "sub" / "exai.db"
    async with SQLiteStore(path, ttl_s=60.0):
        pass

    def inspect() -> tuple[str, int]:
        conn = sqlite3.connect(path)
        try:
            return (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA user_version").fetchone()[0],
            )
        finally:
            conn.close()

    mode, version = await anyio.to_thread.run_sync(inspect)
    assert (mode, version) == ("wal", SCHEMA_VERSION)


async def test_a_new_store_and_its_directories_are_private_to_the_daemon_user(
    tmp_path: Path,
) -> None:
    """Conversations (prompts, answers, the files sent with them) were created under the
    process umask — with the usual 022, the state directory 0755 and ``exai.sqlite3`` (and its
    ``-wal``/``-shm``) 0644, so any local account could read them. A new store's directory is
    0700 and its files 0600 whatever the umask; so is the spool's directory."""
    state = tmp_path / "home" / "state"
    old = os.umask(0o022)
    try:
        async with SQLiteStore(state / "exai.sqlite3", ttl_s=60.0) as store:
            await store.append_turns("t1", [_turn("secret prompt", "k#0")])
            modes = {
                p.name: stat.S_IMODE(p.stat().st_mode)
                for p in (state, *sorted(state.iterdir()))
            }
        async with open_spool(state / "spool", "exai", max_bytes=1 << 20):
            modes["spool"] = stat.S_IMODE((state / "spool").stat().st_mode)
    finally:
        os.umask(old)
    assert modes == {
        "state": 0o700,
        "exai.sqlite3": 0o600,
        "exai.sqlite3-shm": 0o600,
        "exai.sqlite3-wal": 0o600,
        "spool": 0o700,
    }, {k: oct(v) for k, v in modes.items()}


async def test_appends_create_the_thread_and_number_turns_in_order(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        r1 = await store.append_turns("t1", [_turn("a", "k#0"), _turn("b", "k#1", 1001.0)])
        r2 = await store.append_turns("t1", [_turn("c", "k2#0", 1002.0, role="assistant")])
        thread = await store.get_thread("t1")
    assert r1 == AppendResult(written=2, turn_count=2, thread_id="t1")
    assert r2 == AppendResult(written=1, turn_count=3, thread_id="t1")
    assert thread is not None
    assert [(t.seq, t.content) for t in thread.turns] == [(1, "a"), (2, "b"), (3, "c")]
    assert thread.created_at == 1000.0
    assert thread.expires_at == 1002.0 + 60.0


async def test_writing_the_same_turn_twice_leaves_one_row(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        first = await store.append_turn(_turn("a", "x"), "k#0")
        second = await store.append_turn(_turn("a", "x"), "k#0")
        thread = await store.get_thread("t1")
        rows = await anyio.to_thread.run_sync(_count_turns, tmp_path / "db")
    assert (first, second) == (True, False)
    assert rows == 1
    assert thread is not None and len(thread.turns) == 1


async def test_a_missing_thread_reads_as_none(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        assert await store.get_thread("nope") is None


async def test_delete_expired_removes_threads_and_their_turns(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=10.0) as store:
        await store.append_turns("old", [_turn("a", "o#0", at=100.0)])
        await store.append_turns("new", [_turn("b", "n#0", at=200.0)])
        deleted = await store.delete_expired(now=150.0)
        assert deleted == 1
        assert await store.get_thread("old") is None
        assert await store.get_thread("new") is not None


async def test_threads_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        await store.append_turns("t1", [_turn("a", "k#0")])
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        thread = await store.get_thread("t1")
    assert thread is not None and [t.content for t in thread.turns] == ["a"]


async def test_concurrent_appends_to_one_thread_get_distinct_gap_free_seqs(
    tmp_path: Path, stall_detector: object
) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(store.append_turns, "t1", [_turn(f"m{i}", f"k{i}#0")])
        thread = await store.get_thread("t1")
    assert thread is not None
    assert [t.seq for t in thread.turns] == list(range(1, 41))
    assert sorted(t.content for t in thread.turns) == sorted(f"m{i}" for i in range(40))


async def test_status_reports_the_worker_thread_pool(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        status = store.status()
    assert status["kind"] == "sqlite"
    assert status["pool"] == {"size": 1, "in_use": 0, "waiting": 0}


async def test_a_write_under_a_taken_creation_key_goes_to_the_thread_it_created(
    tmp_path: Path,
) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        first = await store.append_turns("t1", [_turn("a", "k#0")], creation_key="ck")
        # a re-run of the call that created t1, under another new id: its turns go to t1
        rerun = await store.append_turns("t2", [_turn("b", "k2#0")], creation_key="ck")
        # continuing t1 with a call that would have created another thread (another key)
        more = await store.append_turns("t1", [_turn("c", "k3#0")], creation_key="other")
        t1 = await store.get_thread("t1")
        t2 = await store.get_thread("t2")
    assert first == AppendResult(written=1, turn_count=1, thread_id="t1")
    assert rerun == AppendResult(written=1, turn_count=2, thread_id="t1")
    assert more == AppendResult(written=1, turn_count=3, thread_id="t1")
    assert t1 is not None and [(t.seq, t.content) for t in t1.turns] == [
        (1, "a"),
        (2, "b"),
        (3, "c"),
    ]
    assert t2 is None


async def test_a_lone_write_the_store_cannot_hold_leaves_nothing_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        with pytest.raises(StoreError) as caught:
            await store.append_turns("bad", [_turn("ok", "b#0"), _turn("\ud800", "b#1")])
        assert not isinstance(caught.value, StoreUnavailableError)  # this write, not the store
        assert await store.get_thread("bad") is None  # not even its thread row or first turn
        assert await store.append_turns("good", [_turn("a", "g#0")]) == AppendResult(
            written=1, turn_count=1, thread_id="good"
        )
    assert _count_turns(tmp_path / "db") == 1


async def test_a_write_whose_caller_is_already_cancelled_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SQLiteStore(path, ttl_s=60.0) as store:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await store.append_turns("t1", [_turn("hi", "k1")])
        assert scope.cancelled_caught
        assert (await store.append_turns("t1", [_turn("next", "k2")])).written == 1
    assert _count_turns(path) == 1


async def test_a_read_cancelled_while_waiting_does_not_interrupt_the_statement_running(
    tmp_path: Path,
) -> None:
    """A call whose bound passes while it waits for the store's thread must not interrupt the
    connection: the statement running there is another caller's (a group commit, a read), and
    it failed with 'interrupted'."""
    path = tmp_path / "s.db"
    started = threading.Event()
    release = threading.Event()

    def block() -> int:
        started.set()
        release.wait(10)
        return 1

    async with SQLiteStore(path, ttl_s=60.0) as store:
        assert store._conn is not None
        conn = store._conn
        conn.create_function("block", 0, block)

        def victim() -> list[Any]:
            sql = (
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) "
                "SELECT block() FROM c"
            )
            return conn.execute(sql).fetchall()

        results: list[Any] = []
        async with anyio.create_task_group() as tg:

            async def run_victim() -> None:
                try:
                    results.append(await store._run(victim))
                except StoreError as exc:
                    results.append(exc)

            tg.start_soon(run_victim)
            with anyio.fail_after(10):
                await anyio.to_thread.run_sync(started.wait)
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_when_waiting, scope, store)
                await store.get_thread("t1")
            assert scope.cancelled_caught
            release.set()
        assert results == [[(1,), (1,), (1,)]]


async def _cancel_when_waiting(scope: anyio.CancelScope, store: SQLiteStore) -> None:
    with anyio.fail_after(10):
        while store._thread.waiting == 0:
            await anyio.sleep(0.001)
    scope.cancel()
