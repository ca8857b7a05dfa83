"""Group commit in the SQLite store: many callers' turn writes in one transaction, each caller
answered with its own result once its turns are durable, a failing write alone in failing.

To put chosen writes in one group, a test holds the store's worker thread (which the writer
needs to reach the connection) while the writes queue, then lets go: the writer takes every
queued write into the next transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from exai.errors import StoreError, StoreUnavailableError
from exai.storage import sqlite as sqlite_module
from exai.storage.base import AppendResult
from exai.storage.model import Turn
from exai.storage.sqlite import SQLiteStore

pytestmark = pytest.mark.anyio


def _turns(key: str, *, content: str | None = None) -> list[Turn]:
    return [
        Turn(
            role="user", content=content or f"{key}:q", created_at=1.0, idempotency_key=f"{key}#0"
        ),
        Turn(role="assistant", content=f"{key}:a", created_at=1.0, idempotency_key=f"{key}#1"),
    ]


def _stored(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT thread_id, content FROM turns ORDER BY rowid").fetchall()
    finally:
        conn.close()


@asynccontextmanager
async def held(store: SQLiteStore) -> AsyncIterator[None]:
    """Hold the store's connection: writes queue until the block ends."""
    async with store._thread.hold():
        yield


async def _queued(store: SQLiteStore, n: int) -> None:
    with anyio.fail_after(10):
        while store.status()["writes"]["queued"] < n:
            await anyio.sleep(0.01)


async def test_concurrent_writers_share_commits_and_each_gets_its_own_result(tmp_path: Path):
    results: dict[int, AppendResult] = {}
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:

        async def write(i: int) -> None:
            results[i] = await store.append_turns(f"t{i}", _turns(f"k{i}"), owner="me")

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(write, i)
        status = store.status()["writes"]
    assert results == {
        i: AppendResult(written=2, turn_count=2, thread_id=f"t{i}") for i in range(64)
    }
    assert status["grouped_writes"] == 64
    assert status["group_commits"] < 64 and status["largest_group"] > 1
    assert sorted(_stored(tmp_path / "db")) == sorted(
        (f"t{i}", f"k{i}:{r}") for i in range(64) for r in "qa"
    )


async def test_writes_queued_together_commit_in_one_transaction(tmp_path: Path):
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        before = store.group_commits
        async with anyio.create_task_group() as tg, held(store):
            for i in range(10):
                tg.start_soon(store.append_turns, f"t{i}", _turns(f"k{i}"))
            await _queued(store, 10)
        assert store.group_commits - before == 1 and store.largest_group == 10
    assert len(_stored(tmp_path / "db")) == 20


async def test_a_write_that_fails_is_rolled_back_alone_and_the_others_commit(tmp_path: Path):
    outcomes: dict[str, Any] = {}
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:

        async def write(key: str, turns: list[Turn]) -> None:
            try:
                outcomes[key] = await store.append_turns(f"t-{key}", turns)
            except StoreError as exc:
                outcomes[key] = exc

        bad = _turns("bad", content="\ud800 a lone surrogate SQLite cannot store")
        async with anyio.create_task_group() as tg, held(store):
            tg.start_soon(write, "first", _turns("first"))
            await _queued(store, 1)
            tg.start_soon(write, "bad", bad)
            await _queued(store, 2)
            tg.start_soon(write, "last", _turns("last"))
            await _queued(store, 3)
        assert store.largest_group == 3  # one transaction for the three
    assert isinstance(outcomes["bad"], StoreError)
    assert not isinstance(outcomes["bad"], StoreUnavailableError)  # this write, not the store
    assert outcomes["first"] == AppendResult(written=2, turn_count=2, thread_id="t-first")
    assert outcomes["last"] == AppendResult(written=2, turn_count=2, thread_id="t-last")
    stored = _stored(tmp_path / "db")
    assert sorted(c for _, c in stored) == ["first:a", "first:q", "last:a", "last:q"]
    assert not [t for t, _ in stored if t == "t-bad"]  # nothing of the bad write, not even half


async def test_a_failing_transaction_fails_every_write_of_its_group_and_the_next_group_works(
    tmp_path: Path,
):
    path = tmp_path / "db"
    async with SQLiteStore(path, ttl_s=60.0, busy_timeout_s=0.05) as store:
        blocker = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        await anyio.to_thread.run_sync(blocker.execute, "BEGIN IMMEDIATE")  # the write lock
        errors: list[BaseException] = []

        async def write(i: int) -> None:
            try:
                await store.append_turns(f"t{i}", _turns(f"k{i}"))
            except StoreError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg, held(store):
            for i in range(5):
                tg.start_soon(write, i)
            await _queued(store, 5)
        assert len(errors) == 5 and all(isinstance(e, StoreUnavailableError) for e in errors)
        await anyio.to_thread.run_sync(blocker.execute, "ROLLBACK")
        blocker.close()
        assert await store.append_turns("t9", _turns("k9")) == AppendResult(
            written=2, turn_count=2, thread_id="t9"
        )
    assert [c for _, c in _stored(path)] == ["k9:q", "k9:a"]


async def test_a_caller_that_leaves_while_its_write_is_queued_writes_nothing(tmp_path: Path):
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        leaving = anyio.CancelScope()

        async def leaves() -> None:
            with leaving:
                await store.append_turns("left", _turns("left"))

        async with anyio.create_task_group() as tg, held(store):
            tg.start_soon(store.append_turns, "kept", _turns("kept"))
            await _queued(store, 1)
            tg.start_soon(leaves)
            await _queued(store, 2)
            leaving.cancel()
            with anyio.fail_after(5):
                while store.status()["writes"]["queued"] != 1:
                    await anyio.sleep(0.01)
        assert store.status()["writes"]["queued_bytes"] == 0
        assert store.abandoned == 0  # taken out of the queue, not abandoned in a transaction
    assert sorted(c for _, c in _stored(tmp_path / "db")) == ["kept:a", "kept:q"]


class InterruptRecorder:
    """The store's connection, counting ``interrupt()`` calls (everything else passes through)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.interrupts = 0

    def interrupt(self) -> None:
        self.interrupts += 1
        self._conn.interrupt()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def _two_writers_in_a_slow_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, both_leave: bool
) -> tuple[SQLiteStore, InterruptRecorder, list[Any]]:
    """Two callers' writes in one transaction that waits in the worker thread (a slow disk);
    the first caller leaves (its deadline), the second too when ``both_leave``."""
    gate, entered = threading.Event(), threading.Event()
    original = SQLiteStore._group_tx

    def slow_disk(self: SQLiteStore, conn: Any, group: Any) -> None:
        entered.set()
        gate.wait(30)  # inside the transaction's span, where a slow fsync would be
        original(self, conn, group)

    monkeypatch.setattr(SQLiteStore, "_group_tx", slow_disk)
    outcomes: list[Any] = []
    scopes = [anyio.CancelScope(), anyio.CancelScope()]
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:
        recorder = InterruptRecorder(store._conn)  # type: ignore[arg-type]
        store._conn = recorder  # type: ignore[assignment]

        async def write(i: int) -> None:
            with scopes[i]:
                outcomes.append(await store.append_turns(f"t{i}", _turns(f"k{i}")))

        async with anyio.create_task_group() as tg:
            async with held(store):
                tg.start_soon(write, 0)
                await _queued(store, 1)
                tg.start_soon(write, 1)
                await _queued(store, 2)
            await anyio.to_thread.run_sync(entered.wait, 10)
            scopes[0].cancel()  # its write is in the running transaction
            if both_leave:
                scopes[1].cancel()
            await anyio.sleep(0.05)
            interrupts = recorder.interrupts
            gate.set()
        store._conn = recorder._conn
    recorder.interrupts = interrupts
    return store, recorder, outcomes


async def test_a_caller_that_leaves_mid_transaction_never_aborts_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store, recorder, outcomes = await _two_writers_in_a_slow_transaction(
        tmp_path, monkeypatch, both_leave=False
    )
    assert recorder.interrupts == 0 and store.abandoned == 1
    assert outcomes == [AppendResult(written=2, turn_count=2, thread_id="t1")]
    # the leaver's write committed with the group: harmless, its keys make a replay a no-op
    assert sorted(c for _, c in _stored(tmp_path / "db")) == ["k0:a", "k0:q", "k1:a", "k1:q"]


async def test_a_transaction_every_caller_left_is_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    store, recorder, outcomes = await _two_writers_in_a_slow_transaction(
        tmp_path, monkeypatch, both_leave=True
    )
    assert recorder.interrupts == 1 and store.abandoned == 2 and outcomes == []


async def test_the_write_queue_is_bounded_and_refuses_at_once_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(sqlite_module, "MAX_QUEUED_WRITES", 3)
    results: list[AppendResult] = []
    async with SQLiteStore(tmp_path / "db", ttl_s=60.0) as store:

        async def write(i: int) -> None:
            results.append(await store.append_turns(f"t{i}", _turns(f"k{i}")))

        async with anyio.create_task_group() as tg, held(store):
            for i in range(3):
                tg.start_soon(write, i)
            await _queued(store, 3)
            with pytest.raises(StoreUnavailableError):
                await store.append_turns("t3", _turns("k3"))
    assert len(results) == 3


async def test_writes_still_queued_when_the_store_closes_fail_as_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    gate, entered = threading.Event(), threading.Event()
    original = SQLiteStore._append_sync

    def hung_disk(self: SQLiteStore, group: Any) -> None:
        entered.set()
        gate.wait(30)
        original(self, group)

    monkeypatch.setattr(SQLiteStore, "_append_sync", hung_disk)
    errors: list[BaseException] = []
    bounded = anyio.CancelScope()

    async def running(store: SQLiteStore) -> None:
        with bounded:  # (the service bounds every store call; here the test does)
            await store.append_turns("running", _turns("running"))

    async def queued(store: SQLiteStore) -> None:
        try:
            await store.append_turns("queued", _turns("queued"))
        except StoreUnavailableError as exc:
            errors.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            store = SQLiteStore(tmp_path / "db", ttl_s=60.0, busy_timeout_s=0.05)
            await store.__aenter__()
            tg.start_soon(running, store)
            await anyio.to_thread.run_sync(entered.wait, 10)  # its transaction hangs
            tg.start_soon(queued, store)
            await _queued(store, 1)
            bounded.cancel()  # the running write's caller gives up (its deadline)
            await store.__aexit__(None, None, None)
    finally:
        gate.set()
    assert len(errors) == 1  # the queued write is told "unavailable" (the service spools it)
    assert store.abandoned == 1
