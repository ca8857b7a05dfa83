"""The SQLite conversation store: the default, zero set-up.

``sqlite:///`` + a path (``sqlite:////abs/path.db`` or ``sqlite:///relative.db``); the default
is ``exai.sqlite3`` in the state directory, created on first use.

Every sqlite3 call runs in the store's own worker thread
(:class:`~exai.storage.storethread.StoreThread`: one long-lived thread, one job at a time, first
come first served, answering through a file descriptor the waiting task polls — a third to a
half of the CPU of a ``to_thread`` hand-off): the single connection (``check_same_thread``
off) is used by one job at a time, and the event loop never touches the file. The database
runs in WAL mode; its schema version is ``PRAGMA user_version`` and older files are migrated on
open (``exai migrate`` does the same without serving).

**Group commit.** Turn writes (:meth:`SQLiteStore.append_turns`, :meth:`SQLiteStore.append_batch`)
are not handed to the worker thread one by one: each caller queues its write and waits; one
writer task takes every write queued so far (up to :data:`MAX_GROUP_WRITES` writes and
:data:`MAX_GROUP_BYTES`) into **one** thread hand-off and **one** transaction — one ``COMMIT``,
one ``fsync`` — and then wakes each caller with its own result. A caller still hears back only
after its turns are durable. Each write runs inside its own ``SAVEPOINT``: a write that fails
(a value SQLite cannot bind, a constraint) is rolled back alone and its caller gets the error,
while the others' writes commit; a failure of the store itself (``BEGIN`` or ``COMMIT``
failing: busy, I/O error, full disk, corruption) fails the whole group, every caller with the
mapped error (and the service spools them). Idempotency keys make a write exactly-once however
it was grouped. With 64 concurrent writers a transaction carried 38 writes on average, and a
durable write cost 0.13 ms of CPU instead of 0.47 (``benchmarks/README.md``, *store_writes*).
A write that finds the store idle (nothing queued, the connection free) is committed by its
caller directly, a group of one, so a lone writer pays no extra hop. The queue is bounded
(:data:`MAX_QUEUED_WRITES` writes, :data:`MAX_QUEUED_BYTES`); past it a write is refused at once
as unavailable, which the service answers by spooling it.

**A deadline can abandon a call.** The caller does not wait for the thread past its bound:
when it passes (a hung disk, a lock held elsewhere), the caller gets its answer at once and the
thread is left to finish. ``sqlite3_interrupt`` is called on the connection too, which stops a
statement that is still running (a long scan) at its next step; a thread blocked inside the OS
(``fsync`` on a dead disk) cannot be interrupted, which is why abandoning is the bound, not the
interrupt. An abandoned write is safe: if it commits after all, its turns carry the same
idempotency keys as the copy the caller then spooled, so the replay skips them; if it is
interrupted, its transaction rolls back. The thread stays busy until the job really ends, so
the next call waits for it (bounded by its own deadline) and never shares the connection. For a
grouped write: a caller whose bound passes while its write is still queued takes it out of the
queue (nothing is written); one whose write is already in the running transaction leaves it to
commit or fail without it, and ``sqlite3_interrupt`` is called only once *every* caller of that
transaction has left — a caller never aborts the writes of others who are still waiting.

**Corruption.** On open, ``PRAGMA quick_check`` must say ``ok``; otherwise start-up fails with the
file's name and how to recover. A corrupt page met later (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``)
marks the store corrupt for the rest of the run: every call then fails at once as unavailable (its
breaker opens, turns go to the spool, ``/readyz`` says not ready), and the log says what to do.

Resource handling:
    The connection is opened on ``__aenter__`` and closed on ``__aexit__`` (in a thread, bounded);
    the writer task lives in the store's own task group between the two. Writes still queued at
    ``__aexit__`` fail as unavailable (their callers spool them).

Error handling:
    By SQLite result code (never by message text): busy, locked, I/O, full, can't open,
    read-only, interrupted, corrupt and not-a-database become
    :class:`~exai.errors.StoreUnavailableError`; other ``sqlite3.Error`` becomes
    :class:`~exai.errors.StoreError`. Messages never hold the file's path (clients may see
    them); the log does.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs

from exai.config import Settings
from exai.config.dirs import make_dirs
from exai.errors import ConfigError, StoreError, StoreUnavailableError
from exai.logs import log_event
from exai.storage.base import AppendResult, BatchItem
from exai.storage.model import Thread, Turn
from exai.storage.storethread import StoreThread

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "sqlite_path"]

T = TypeVar("T")

#: the schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION = 2

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE IF NOT EXISTS threads (
        id          TEXT PRIMARY KEY,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        turn_count  INTEGER NOT NULL DEFAULT 0,
        bytes       INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS threads_expires_at ON threads (expires_at);
    CREATE TABLE IF NOT EXISTS turns (
        thread_id        TEXT NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
        seq              INTEGER NOT NULL,
        role             TEXT NOT NULL,
        content          TEXT NOT NULL,
        tool             TEXT NOT NULL DEFAULT '',
        provider         TEXT NOT NULL DEFAULT '',
        model            TEXT NOT NULL DEFAULT '',
        files            TEXT NOT NULL DEFAULT '[]',
        created_at       REAL NOT NULL,
        idempotency_key  TEXT NOT NULL UNIQUE,
        PRIMARY KEY (thread_id, seq)
    );
    """,
    # thread ownership: the identity that created a thread (NULL: written before this
    # migration, nobody's), and the key it was created under (unique: a re-run of the call
    # finds the thread instead of making another)
    2: """
    ALTER TABLE threads ADD COLUMN owner TEXT;
    ALTER TABLE threads ADD COLUMN creation_key TEXT;
    CREATE UNIQUE INDEX IF NOT EXISTS threads_creation_key ON threads (creation_key);
    """,
}

#: SQLite primary result codes that mean "the store is unavailable" (retrying later may work)
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOLFS,
    }
)
#: ... and those that mean the file is damaged
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

#: the most writes (``append_turns`` calls or replay batches) committed in one transaction
MAX_GROUP_WRITES = 128
#: ... and the most bytes of turn text in one (an upper bound; a larger write goes alone)
MAX_GROUP_BYTES = 8 * 1024 * 1024
#: writes waiting for the writer at most; past it a write is refused as unavailable (spooled)
MAX_QUEUED_WRITES = 4096
#: ... and bytes of turn text waiting at most
MAX_QUEUED_BYTES = 64 * 1024 * 1024


class _Write:
    """One caller's write: its items, then (set in the worker thread) its results or error."""

    __slots__ = ("abandoned", "done", "error", "finished", "items", "results", "size")

    def __init__(self, items: list[BatchItem]) -> None:
        self.items = items
        # an upper bound of its bytes without encoding anything (a character is at most 4
        # bytes of UTF-8; a lone surrogate, which cannot be encoded, is refused later, per write)
        self.size = 4 * sum(len(t.content) for item in items for t in item[1]) + 256 * len(items)
        self.results: list[AppendResult] | None = None
        self.error: BaseException | None = None
        #: results or error are final
        self.finished = False
        #: set when finished; only for a write that waits in the queue for the writer
        self.done: anyio.Event | None = None
        self.abandoned = False


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


#: what one write can fail with on its own (its group's other writes still commit), unless
#: :func:`_store_wide` says the store itself failed — one list for a group and a lone write
_WRITE_ERRORS = (sqlite3.Error, StoreError, UnicodeError, ValueError, TypeError)


def _store_wide(exc: sqlite3.Error) -> bool:
    """Whether an error is the store's (unavailable, corrupt, interrupted), not one write's."""
    code = _primary_code(exc)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError)
    return code in _UNAVAILABLE_CODES or code in _CORRUPT_CODES


def recovery_hint(path: Path) -> str:
    """What an operator does about a corrupt SQLite store at ``path``."""
    return (
        f"stop exai, move {path} (and its -wal and -shm files) aside, then either start exai "
        f"to begin with an empty store, or first try to recover the threads with "
        f"`sqlite3 {path}.corrupt .recover | sqlite3 {path}`; turns waiting in the spool are "
        "replayed into the new file"
    )


def sqlite_path(url: str) -> Path:
    """The file a SQLite URL names: ``sqlite:////abs/path`` (four slashes) is absolute,
    ``sqlite:///rel/path`` is relative to the working directory (the SQLAlchemy convention)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc:
        raise ConfigError("EXAI_STORAGE_URL: a sqlite URL has no host: sqlite:///path")
    path = urllib.parse.unquote(parts.path)
    if not path.strip("/"):
        raise ConfigError("EXAI_STORAGE_URL: the sqlite URL names no file")
    return Path(path[1:]) if path.startswith("/") else Path(path)


class SQLiteStore:
    """A :class:`~exai.storage.base.ConversationStore` on one SQLite file.

    Args:
        path: the database file (its directory is created).
        ttl_s: thread lifetime after its last turn.
        busy_timeout_s: how long one statement waits for another process's lock.
    """

    kind = "sqlite"

    def __init__(self, path: Path, *, ttl_s: float, busy_timeout_s: float = 2.0) -> None:
        self.path = path
        self._ttl_s = ttl_s
        self._busy_ms = max(1, int(busy_timeout_s * 1000))
        self._close_timeout_s = max(1.0, busy_timeout_s)
        self._thread = StoreThread(close_timeout_s=self._close_timeout_s)
        self._conn: sqlite3.Connection | None = None
        self._calls = 0
        #: set once a corrupt page was met; every later call fails at once
        self.corrupt = False
        #: schema versions this open applied (``exai migrate`` reports them)
        self.migrations_applied: list[int] = []
        self.abandoned = 0
        self._queue: deque[_Write] = deque()
        self._queued_bytes = 0
        self._work = anyio.Event()
        #: the writer task holds a group (waiting for the connection or committing it)
        self._writing = False
        #: the group whose transaction the worker thread is running (set and cleared there)
        self._current: list[_Write] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        #: group transactions committed, writes they held, the largest group
        self.group_commits = 0
        self.grouped_writes = 0
        self.largest_group = 0

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> SQLiteStore:
        """The store a ``sqlite:///…`` URL names, with limits from ``settings``."""
        return cls(
            sqlite_path(url),
            ttl_s=settings.conversation_ttl_s,
            busy_timeout_s=min(settings.store_timeout_s, 5.0),
        )

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> SQLiteStore:
        await self._thread.__aenter__()
        try:
            self._conn = await self._run(self._open)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._thread.__aexit__(None, None, None)
            raise
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await tg.start(self._writer)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        self._fail_queued(StoreUnavailableError("the SQLite store is closing"))
        conn, self._conn = self._conn, None
        with anyio.CancelScope(shield=True):
            if conn is not None:
                # bounded: a thread stuck on a dead disk keeps the connection; the process
                # exits anyway
                with anyio.move_on_after(self._close_timeout_s):
                    await self._thread.run(conn.close)
            await self._thread.__aexit__(None, None, None)

    def _open(self) -> sqlite3.Connection:
        # the store holds every conversation — prompts, answers, the files sent with them — so
        # a new one is the daemon user's alone: its directory 0700, the file 0600 (SQLite
        # gives the -wal and -shm files the database file's mode). With the usual umask 022
        # they were created 0755/0644: every local account could read every conversation.
        make_dirs(self.path.parent)
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # (an existing file is SQLite's to open, or refuse, as it is)
        except OSError as exc:
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from exc
        try:
            # the check runs on a connection of its own, so the serving connection starts with
            # an empty page cache and meets damage done later instead of a cached good copy
            check = sqlite3.connect(str(self.path), isolation_level=None, timeout=0)
            try:
                check.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                self._check_integrity(check)
            finally:
                check.close()
            conn = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=0
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the SQLite store {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """Refuse a damaged file at start, naming it and how to recover."""
        try:
            rows = conn.execute("PRAGMA quick_check(8)").fetchall()
            problems = [str(r[0]) for r in rows if r and r[0] != "ok"]
        except sqlite3.DatabaseError as exc:
            if _primary_code(exc) not in _CORRUPT_CODES:
                raise
            problems = [str(exc)]
        if problems:
            raise StoreError(
                f"the SQLite store {self.path} is damaged ({'; '.join(problems)[:300]}). "
                f"To recover: {recovery_hint(self.path)}"
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the SQLite database has schema version {version}, newer than this exai "
                f"({SCHEMA_VERSION}); upgrade exai"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # another process may have migrated while we waited for the write lock
                if conn.execute("PRAGMA user_version").fetchone()[0] >= v:
                    conn.execute("COMMIT")
                    continue
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {v}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.migrations_applied.append(v)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.corrupt:
            raise StoreUnavailableError("the SQLite store is corrupt")
        self._calls += 1
        try:
            return await self._thread.run(fn, *args, on_abandon=self._interrupt)
        except anyio.get_cancelled_exc_class():
            # the caller's bound passed: the thread is abandoned (see the module docstring)
            self.abandoned += 1
            raise
        except sqlite3.Error as exc:
            raise self._map(exc) from exc
        except (UnicodeError, ValueError, TypeError) as exc:
            # a value SQLite cannot bind (text that is not UTF-8): this write, not the store
            raise StoreError(
                f"the SQLite store cannot hold a value ({type(exc).__name__})"
            ) from exc

    def _interrupt(self) -> None:
        """Stop the statement an abandoned job may still be running — only ever called for the
        caller's own job: one cancelled while it waited for the thread must not interrupt the
        job running there (another caller's: a group commit, a read)."""
        conn = self._conn
        if conn is not None:
            conn.interrupt()

    def _map(self, exc: sqlite3.Error) -> StoreError:
        code = _primary_code(exc)
        what = type(exc).__name__
        if code in _CORRUPT_CODES:
            if not self.corrupt:
                self.corrupt = True
                log_event(
                    "store.corrupt",
                    logging.ERROR,
                    path=str(self.path),
                    error=str(exc),
                    recovery=recovery_hint(self.path),
                )
            return StoreUnavailableError(f"the SQLite store is corrupt ({exc})")
        if code in _UNAVAILABLE_CODES or isinstance(exc, sqlite3.OperationalError):
            return StoreUnavailableError(f"the SQLite store is unavailable ({what}: {exc})")
        return StoreError(f"the SQLite store failed ({what}: {exc})")

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the SQLite store is not open")
        return self._conn

    # -- operations ---------------------------------------------------------------------
    async def create_thread(self, thread_id: str, *, created_at: float) -> None:
        """Create an empty thread; a no-op when it exists."""
        await self._run(self._create_thread_sync, thread_id, created_at)

    def _create_thread_sync(self, thread_id: str, created_at: float) -> None:
        self._c().execute(
            "INSERT INTO threads (id, created_at, updated_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (thread_id, created_at, created_at, created_at + self._ttl_s),
        )

    async def append_turns(
        self,
        thread_id: str,
        turns: Sequence[Turn],
        *,
        owner: str | None = None,
        creation_key: str | None = None,
    ) -> AppendResult:
        """Append ``turns`` in one transaction (shared with other callers' writes, see the
        module docstring); turns whose key exists are skipped. A missing thread is created
        owned by ``owner`` under ``creation_key``; when that key already created another
        thread, the turns go there (``AppendResult.thread_id``)."""
        results = await self._write([(thread_id, list(turns), owner, creation_key)])
        return results[0]

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        """Append one turn; True if written, False if the key was already written."""
        t = attrs.evolve(turn, idempotency_key=idempotency_key)
        result = await self.append_turns(turn.thread_id, [t])
        return result.written == 1

    async def append_batch(self, items: Sequence[BatchItem]) -> list[AppendResult]:
        """Several :meth:`append_turns` in one transaction, in order (the spool's replay):
        all land or none."""
        return await self._write(list(items))

    # -- group commit ---------------------------------------------------------------------
    async def _write(self, items: list[BatchItem]) -> list[AppendResult]:
        """Commit one write, grouped with the writes of other callers; its results once
        durable. When nothing is queued, the writer is idle and the connection free, the write
        is committed by its caller directly (a group of one, without the writer's hop)."""
        if self.corrupt:
            raise StoreUnavailableError("the SQLite store is corrupt")
        if self._tg is None or self._conn is None:
            raise StoreError("the SQLite store is not open")
        w = _Write(items)
        self._calls += 1
        if not self._queue and not self._writing and not self._thread.busy:
            try:
                await self._commit_group([w])
            except BaseException:
                self._leave(w)
                raise
            w.finished = True
        else:
            if len(self._queue) >= MAX_QUEUED_WRITES or (
                self._queue and self._queued_bytes + w.size > MAX_QUEUED_BYTES
            ):
                raise StoreUnavailableError(
                    f"the SQLite store has {len(self._queue)} writes waiting "
                    f"({self._queued_bytes} bytes); it is not keeping up"
                )
            w.done = done = anyio.Event()
            self._queue.append(w)
            self._queued_bytes += w.size
            self._work.set()
            try:
                await done.wait()
            except BaseException:
                self._leave(w)
                raise
        if w.error is not None:
            raise w.error
        assert w.results is not None
        return w.results

    def _leave(self, w: _Write) -> None:
        """A caller's bound passed (or it was cancelled) before its write was done."""
        if w.finished:
            return
        try:
            self._queue.remove(w)
        except ValueError:
            pass
        else:
            self._queued_bytes -= w.size
            return  # never reached a transaction: nothing of it is written
        # in a transaction (or waiting for the connection to run one): it commits or fails
        # without this caller
        w.abandoned = True
        self.abandoned += 1
        current = self._current
        if current is not None and w in current and all(x.abandoned for x in current):
            conn = self._conn
            if conn is not None:
                conn.interrupt()  # nobody waits for this transaction any more

    def _take_group(self) -> list[_Write]:
        group: list[_Write] = []
        size = 0
        queue = self._queue
        while queue and len(group) < MAX_GROUP_WRITES:
            w = queue[0]
            if group and size + w.size > MAX_GROUP_BYTES:
                break
            queue.popleft()
            self._queued_bytes -= w.size
            size += w.size
            group.append(w)
        return group

    async def _writer(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Commit queued writes, a group per transaction, until cancelled (``__aexit__``)."""
        task_status.started()
        while True:
            await self._work.wait()
            self._writing = True
            try:
                # Wait until the connection is free (a read, a direct write or an abandoned
                # one may hold it), so the group takes every write queued meanwhile.
                async with self._thread.hold():
                    pass
                group = self._take_group()
                if not self._queue:
                    self._work = anyio.Event()
                if not group:
                    continue
                try:
                    await self._commit_group(group)
                except anyio.get_cancelled_exc_class():
                    self._fail(group, StoreUnavailableError("the SQLite store is closing"))
                    raise
                finally:
                    for w in group:
                        w.finished = True
                        if w.done is not None:
                            w.done.set()
            finally:
                self._writing = False

    async def _commit_group(self, group: list[_Write]) -> None:
        """One thread hand-off and one transaction for ``group``; results and errors land in
        each write (mapped here, on the event loop). Only cancellation propagates."""
        try:
            if self.corrupt:
                raise StoreUnavailableError("the SQLite store is corrupt")
            await self._thread.run(self._append_sync, group)
        except sqlite3.Error as exc:
            self._fail(group, self._map(exc))
            return
        except StoreError as exc:
            self._fail(group, exc)
            return
        except Exception as exc:  # a bug of ours: fail these writes, keep the store serving
            log_event("store.write_failed", logging.ERROR, error=repr(exc))
            self._fail(group, StoreError(f"the SQLite store failed ({type(exc).__name__})"))
            return
        self.group_commits += 1
        self.grouped_writes += len(group)
        self.largest_group = max(self.largest_group, len(group))
        for w in group:
            if w.error is not None:
                w.error = self._map_one(w.error)

    def _fail(self, group: list[_Write], error: StoreError) -> None:
        for w in group:
            w.results = None
            w.error = error

    def _fail_queued(self, error: StoreError) -> None:
        queue, self._queue = self._queue, deque()
        self._queued_bytes = 0
        for w in queue:
            w.error = error
            w.finished = True
            if w.done is not None:
                w.done.set()

    def _map_one(self, exc: BaseException) -> BaseException:
        """The error of one write of a committed group."""
        if isinstance(exc, sqlite3.Error):
            return self._map(exc)
        if isinstance(exc, UnicodeError | ValueError | TypeError):
            # a value SQLite cannot bind (text that is not UTF-8): this write, not the store
            return StoreError(f"the SQLite store cannot hold a value ({type(exc).__name__})")
        return exc

    def _append_sync(self, group: list[_Write]) -> None:
        """(Worker thread.) One transaction for the group, a savepoint per write: a write that
        fails is rolled back alone; a failure of the transaction itself fails them all."""
        self._current = group
        try:
            self._group_tx(self._c(), group)
        finally:
            self._current = None

    def _group_tx(self, conn: sqlite3.Connection, group: list[_Write]) -> None:
        if len(group) == 1:
            self._lone_tx(conn, group[0])
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for w in group:
                conn.execute("SAVEPOINT w")
                try:
                    w.results = [self._append_in_tx(conn, *item) for item in w.items]
                except _WRITE_ERRORS as exc:
                    if isinstance(exc, sqlite3.Error) and _store_wide(exc):
                        raise
                    conn.execute("ROLLBACK TO w")
                    w.results = None
                    w.error = exc
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException:
            for w in group:
                w.results = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _lone_tx(self, conn: sqlite3.Connection, w: _Write) -> None:
        """A group of one (every write at concurrency 1): no savepoint, since rolling the
        transaction back undoes exactly this write."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            try:
                results = [self._append_in_tx(conn, *item) for item in w.items]
            except _WRITE_ERRORS as exc:
                if isinstance(exc, sqlite3.Error) and _store_wide(exc):
                    raise
                conn.execute("ROLLBACK")
                w.results = None
                w.error = exc
                return
            conn.execute("COMMIT")
            w.results = results
        except BaseException:
            w.results = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _append_in_tx(
        self,
        conn: sqlite3.Connection,
        thread_id: str,
        turns: Sequence[Turn],
        owner: str | None,
        creation_key: str | None,
    ) -> AppendResult:
        first = min((t.created_at or 0.0) for t in turns) if turns else 0.0
        # ON CONFLICT without a target: a taken id or a taken creation key both do nothing
        created = conn.execute(
            "INSERT INTO threads (id, created_at, updated_at, expires_at, owner, "
            "creation_key) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (thread_id, first, first, first + self._ttl_s, owner, creation_key),
        ).rowcount
        if created == 1:
            count = size = 0  # a new thread (a chat call's first turns): nothing to read
        else:
            row = None
            if creation_key is not None:
                row = conn.execute(
                    "SELECT id, turn_count, bytes FROM threads WHERE creation_key = ?",
                    (creation_key,),
                ).fetchone()
            if row is not None:
                thread_id, count, size = row
            else:
                count, size = conn.execute(
                    "SELECT turn_count, bytes FROM threads WHERE id = ?", (thread_id,)
                ).fetchone()
        written = 0
        last = None
        for t in turns:
            if not t.idempotency_key or t.created_at is None:
                raise StoreError("a stored turn needs an idempotency_key and created_at")
            cur = conn.execute(
                "INSERT INTO turns (thread_id, seq, role, content, tool, provider, model, "
                "files, created_at, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    thread_id,
                    count + 1,
                    t.role,
                    t.content,
                    t.tool,
                    t.provider,
                    t.model,
                    json.dumps(list(t.files)) if t.files else "[]",
                    t.created_at,
                    t.idempotency_key,
                ),
            )
            if cur.rowcount == 1:
                written += 1
                count += 1
                size += t.size_bytes
                last = t.created_at if last is None else max(last, t.created_at)
        if last is not None:
            conn.execute(
                "UPDATE threads SET turn_count = ?, bytes = ?, "
                "updated_at = MAX(updated_at, ?), expires_at = MAX(expires_at, ?) "
                "WHERE id = ?",
                (count, size, last, last + self._ttl_s, thread_id),
            )
        return AppendResult(written=written, turn_count=count, thread_id=thread_id)

    async def get_thread(self, thread_id: str) -> Thread | None:
        """The thread and its turns in order, or None."""
        return await self._run(self._get_sync, thread_id)

    def _get_sync(self, thread_id: str) -> Thread | None:
        conn = self._c()
        # One read transaction so the thread row and its turns are one snapshot.
        conn.execute("BEGIN")
        try:
            row = conn.execute(
                "SELECT created_at, updated_at, expires_at, owner FROM threads WHERE id = ?",
                (thread_id,),
            ).fetchone()
            if row is None:
                return None
            rows = conn.execute(
                "SELECT seq, role, content, tool, provider, model, files, created_at, "
                "idempotency_key FROM turns WHERE thread_id = ? ORDER BY seq",
                (thread_id,),
            ).fetchall()
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        turns = tuple(
            Turn(
                thread_id=thread_id,
                seq=r[0],
                role=r[1],
                content=r[2],
                tool=r[3],
                provider=r[4],
                model=r[5],
                files=tuple(json.loads(r[6])),
                created_at=r[7],
                idempotency_key=r[8],
            )
            for r in rows
        )
        return Thread(
            id=thread_id,
            turns=turns,
            created_at=row[0],
            updated_at=row[1],
            expires_at=row[2],
            owner=row[3],
        )

    async def delete_expired(self, now: float) -> int:
        """Delete threads (and their turns) that expired before ``now``."""
        return await self._run(self._delete_expired_sync, now)

    def _delete_expired_sync(self, now: float) -> int:
        cur = self._c().execute("DELETE FROM threads WHERE expires_at <= ?", (now,))
        return cur.rowcount

    def status(self) -> dict[str, Any]:
        """Kind, file and worker-thread use."""
        thread = self._thread
        return {
            "kind": self.kind,
            "file": self.path.name,  # (no server path: clients read status)
            "open": self._conn is not None,
            "corrupt": self.corrupt,
            "abandoned_calls": self.abandoned,
            "pool": {
                "size": 1,
                "in_use": int(thread.in_use),
                "waiting": thread.waiting,
            },
            "calls": self._calls,
            "writes": {
                "queued": len(self._queue),
                "queued_bytes": self._queued_bytes,
                "group_commits": self.group_commits,
                "grouped_writes": self.grouped_writes,
                "largest_group": self.largest_group,
            },
        }
