"""The SQLite conversation store: the default, zero set-up.

``sqlite:///`` + a path (``sqlite:////abs/path.db`` or ``sqlite:///relative.db``); the default
is ``exai.sqlite3`` in the state directory, created on first use.

Every sqlite3 call runs in a worker thread through :func:`anyio.to_thread.run_sync` under the
store's own :class:`anyio.CapacityLimiter` of one: a single connection (``check_same_thread``
off) is used by one thread at a time, so the event loop never touches the file. The database
runs in WAL mode; its schema version is ``PRAGMA user_version`` and older files are migrated on
open (``exai migrate`` does the same without serving).

**A deadline can abandon a call.** The thread runs with ``abandon_on_cancel``: when the caller's
bound passes (a hung disk, a lock held elsewhere), the caller gets its answer at once and the
thread is left to finish. ``sqlite3_interrupt`` is called on the connection too, which stops a
statement that is still running (a long scan) at its next step; a thread blocked inside the OS
(``fsync`` on a dead disk) cannot be interrupted, which is why abandoning is the bound, not the
interrupt. An abandoned write is safe: if it commits after all, its turns carry the same
idempotency keys as the copy the caller then spooled, so the replay skips them; if it is
interrupted, its transaction rolls back. The limiter stays held until the thread really ends, so
the next call waits for it (bounded by its own deadline) and never shares the connection.

**Corruption.** On open, ``PRAGMA quick_check`` must say ``ok``; otherwise start-up fails with the
file's name and how to recover. A corrupt page met later (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``)
marks the store corrupt for the rest of the run: every call then fails at once as unavailable (its
breaker opens, turns go to the spool, ``/readyz`` says not ready), and the log says what to do.

Resource handling:
    The connection is opened on ``__aenter__`` and closed on ``__aexit__`` (in a thread, bounded).

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
import sqlite3
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import attrs

from exai.config import Settings
from exai.errors import ConfigError, StoreError, StoreUnavailableError
from exai.logs import log_event
from exai.storage.base import AppendResult, BatchItem
from exai.storage.model import Thread, Turn

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


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


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
        self._limiter = anyio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._calls = 0
        self._close_timeout_s = max(1.0, busy_timeout_s)
        #: set once a corrupt page was met; every later call fails at once
        self.corrupt = False
        #: schema versions this open applied (``exai migrate`` reports them)
        self.migrations_applied: list[int] = []
        self.abandoned = 0

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
        self._conn = await self._run(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # bounded: a thread stuck on a dead disk keeps the limiter; the process exits anyway
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._close_timeout_s):
                await anyio.to_thread.run_sync(
                    conn.close, limiter=self._limiter, abandon_on_cancel=True
                )

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            return await anyio.to_thread.run_sync(
                fn, *args, limiter=self._limiter, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            # the caller's bound passed: the thread is abandoned (see the module docstring);
            # stop the statement it may still be running
            self.abandoned += 1
            conn = self._conn
            if conn is not None:
                conn.interrupt()
            raise
        except sqlite3.Error as exc:
            raise self._map(exc) from exc
        except (UnicodeError, ValueError, TypeError) as exc:
            # a value SQLite cannot bind (text that is not UTF-8): this write, not the store
            raise StoreError(
                f"the SQLite store cannot hold a value ({type(exc).__name__})"
            ) from exc

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
        """Append ``turns`` in one transaction; turns whose key exists are skipped. A missing
        thread is created owned by ``owner`` under ``creation_key``; when that key already
        created another thread, the turns go there (``AppendResult.thread_id``)."""
        return await self._run(self._append_sync, thread_id, list(turns), owner, creation_key)

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        """Append one turn; True if written, False if the key was already written."""
        t = attrs.evolve(turn, idempotency_key=idempotency_key)
        result = await self.append_turns(turn.thread_id, [t])
        return result.written == 1

    def _append_sync(
        self,
        thread_id: str,
        turns: list[Turn],
        owner: str | None = None,
        creation_key: str | None = None,
    ) -> AppendResult:
        return self._batch_sync([(thread_id, turns, owner, creation_key)])[0]

    async def append_batch(self, items: Sequence[BatchItem]) -> list[AppendResult]:
        """Several :meth:`append_turns` in one transaction, in order (the spool's replay):
        all land or none."""
        return await self._run(self._batch_sync, list(items))

    def _batch_sync(self, items: list[BatchItem]) -> list[AppendResult]:
        conn = self._c()
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [self._append_in_tx(conn, *item) for item in items]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

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
        conn.execute(
            "INSERT INTO threads (id, created_at, updated_at, expires_at, owner, "
            "creation_key) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (thread_id, first, first, first + self._ttl_s, owner, creation_key),
        )
        if creation_key is not None:
            row = conn.execute(
                "SELECT id FROM threads WHERE creation_key = ?", (creation_key,)
            ).fetchone()
            if row is not None:
                thread_id = row[0]
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
                    json.dumps(list(t.files)),
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
        stats = self._limiter.statistics()
        return {
            "kind": self.kind,
            "file": self.path.name,  # (no server path: clients read status)
            "open": self._conn is not None,
            "corrupt": self.corrupt,
            "abandoned_calls": self.abandoned,
            "pool": {
                "size": 1,
                "in_use": stats.borrowed_tokens,
                "waiting": stats.tasks_waiting,
            },
            "calls": self._calls,
        }
