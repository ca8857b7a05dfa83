"""The SQLite conversation store: the default, zero set-up.

``sqlite:///`` + a path (``sqlite:////abs/path.db`` or ``sqlite:///relative.db``); the default
is ``exai.sqlite3`` in the state directory, created on first use.

Every sqlite3 call runs in a worker thread through :func:`anyio.to_thread.run_sync` under the
store's own :class:`anyio.CapacityLimiter` of one: a single connection (``check_same_thread``
off) is used by one thread at a time, so the event loop never touches the file. The database
runs in WAL mode; its schema version is ``PRAGMA user_version`` and older files are migrated on
open.

Resource handling:
    The connection is opened on ``__aenter__`` and closed on ``__aexit__`` (in a thread).

Error handling:
    ``sqlite3.OperationalError`` (locked, busy, disk I/O) becomes
    :class:`~exai.errors.StoreUnavailableError`; other ``sqlite3.Error`` becomes
    :class:`~exai.errors.StoreError`.
"""

from __future__ import annotations

import json
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
from exai.storage.base import AppendResult
from exai.storage.model import Thread, Turn

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "sqlite_path"]

T = TypeVar("T")

#: the schema version this code writes (``PRAGMA user_version``).
SCHEMA_VERSION = 1

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
}


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
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=0
        )
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

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the SQLite database has schema version {version}, newer than this exai "
                f"({SCHEMA_VERSION}); upgrade exai"
            )
        for v in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {v}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        self._calls += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailableError(f"SQLite store {self.path}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

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

    async def append_turns(self, thread_id: str, turns: Sequence[Turn]) -> AppendResult:
        """Append ``turns`` in one transaction; turns whose key exists are skipped."""
        return await self._run(self._append_sync, thread_id, list(turns))

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        """Append one turn; True if written, False if the key was already written."""
        t = attrs.evolve(turn, idempotency_key=idempotency_key)
        result = await self.append_turns(turn.thread_id, [t])
        return result.written == 1

    def _append_sync(self, thread_id: str, turns: list[Turn]) -> AppendResult:
        conn = self._c()
        first = min((t.created_at or 0.0) for t in turns) if turns else 0.0
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO threads (id, created_at, updated_at, expires_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (thread_id, first, first, first + self._ttl_s),
            )
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
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return AppendResult(written=written, turn_count=count)

    async def get_thread(self, thread_id: str) -> Thread | None:
        """The thread and its turns in order, or None."""
        return await self._run(self._get_sync, thread_id)

    def _get_sync(self, thread_id: str) -> Thread | None:
        conn = self._c()
        # One read transaction so the thread row and its turns are one snapshot.
        conn.execute("BEGIN")
        try:
            row = conn.execute(
                "SELECT created_at, updated_at, expires_at FROM threads WHERE id = ?",
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
            id=thread_id, turns=turns, created_at=row[0], updated_at=row[1], expires_at=row[2]
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
            "path": str(self.path),
            "open": self._conn is not None,
            "pool": {
                "size": 1,
                "in_use": stats.borrowed_tokens,
                "waiting": stats.tasks_waiting,
            },
            "calls": self._calls,
        }
