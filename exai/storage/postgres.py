"""The PostgreSQL conversation store (asyncpg through the trio-asyncio bridge).

URL: ``postgresql://user:password@host:port/database`` (``postgres://`` too). exai's tables are
``exai_threads``, ``exai_turns`` and ``exai_migrations``. To keep them in their own schema add
``?schema=NAME`` to the URL: exai strips that parameter, creates the schema if needed and sets
``search_path`` to it on every pooled connection. Other query parameters go to asyncpg
unchanged (``sslmode``, ``options`` …).

Migrations are numbered SQL scripts applied in order at start (and by ``exai migrate``, which
calls :func:`migrate`), each in its own transaction, under a transaction-scoped advisory lock so
two daemons starting together apply each script once.

A turn is written in one transaction: the thread row is upserted (with its owner and creation
key; a taken creation key sends the turns to the thread that holds it) and locked
(``SELECT … FOR UPDATE``), each turn is inserted with the next sequence number
``ON CONFLICT (idempotency_key) DO NOTHING``, and the thread's counters move only for turns
actually inserted. The row lock serialises appends to one thread across every daemon, so
sequence numbers are gap-free and never collide; a repeated write (same key) is a no-op.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

import asyncpg
import attrs

from exai.config import Settings, redact_url
from exai.errors import ConfigError, StoreError
from exai.storage.aio_bridge import AsyncioBridge, BridgedPgPool
from exai.storage.base import AppendResult, BatchItem
from exai.storage.model import Thread, Turn

__all__ = ["MIGRATIONS", "PostgresStore", "migrate", "parse_postgres_url"]

#: (version, SQL) in order. Never edit a released entry; append a new one.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE exai_threads (
            id          text PRIMARY KEY,
            created_at  double precision NOT NULL,
            updated_at  double precision NOT NULL,
            expires_at  double precision NOT NULL,
            turn_count  integer NOT NULL DEFAULT 0,
            bytes       bigint NOT NULL DEFAULT 0
        );
        CREATE INDEX exai_threads_expires_at ON exai_threads (expires_at);
        CREATE TABLE exai_turns (
            thread_id        text NOT NULL REFERENCES exai_threads (id) ON DELETE CASCADE,
            seq              integer NOT NULL,
            role             text NOT NULL,
            content          text NOT NULL,
            tool             text NOT NULL DEFAULT '',
            provider         text NOT NULL DEFAULT '',
            model            text NOT NULL DEFAULT '',
            files            jsonb NOT NULL DEFAULT '[]',
            created_at       double precision NOT NULL,
            idempotency_key  text NOT NULL UNIQUE,
            PRIMARY KEY (thread_id, seq)
        );
        """,
    ),
    (
        2,
        # thread ownership: the identity that created a thread (NULL: written before this
        # migration, nobody's), and the key it was created under (unique: a re-run of the
        # call finds the thread instead of making another)
        """
        ALTER TABLE exai_threads ADD COLUMN owner text;
        ALTER TABLE exai_threads ADD COLUMN creation_key text;
        CREATE UNIQUE INDEX exai_threads_creation_key ON exai_threads (creation_key);
        """,
    ),
)

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# an arbitrary constant: the advisory lock that serialises migrations between daemons
_MIGRATION_LOCK = 0x6578_6169_6D67


def parse_postgres_url(url: str) -> tuple[str, str | None]:
    """Split exai's ``?schema=NAME`` off a PostgreSQL URL: (dsn for asyncpg, schema or None).

    Raises:
        ConfigError: the schema name is not a plain SQL identifier.
    """
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if schema is not None and not _SCHEMA_RE.match(schema):
        raise ConfigError(
            "EXAI_STORAGE_URL: schema must be letters, digits and underscores, "
            "not starting with a digit"
        )
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    dsn = urllib.parse.urlunsplit(
        (scheme, parts.netloc, parts.path, urllib.parse.urlencode(rest), parts.fragment)
    )
    return dsn, schema


async def migrate(pool: BridgedPgPool, schema: str | None = None) -> list[int]:
    """Apply the pending :data:`MIGRATIONS`; the versions applied now (empty when current).

    Raises:
        StoreUnavailableError: the server cannot be reached.
        StoreError: a migration failed (its transaction is rolled back).
    """
    return await pool.run(_migrate, schema)


async def _migrate(conn: asyncpg.Connection, schema: str | None) -> list[int]:
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        if schema is not None:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS exai_migrations ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM exai_migrations")}
        newest = max((v for v, _ in MIGRATIONS), default=0)
        if done and max(done) > newest:
            raise StoreError(
                f"the database has schema version {max(done)}, newer than this exai ({newest}); "
                "upgrade exai"
            )
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO exai_migrations (version) VALUES ($1)", version)
            applied.append(version)
    return applied


class PostgresStore:
    """A :class:`~exai.storage.base.ConversationStore` on PostgreSQL.

    Args:
        dsn: the asyncpg DSN (without exai's ``schema`` parameter).
        bridge: the asyncio bridge the pool runs on.
        schema: keep exai's tables in this schema (created if missing).
        ttl_s: thread lifetime after its last turn.
        pool_min, pool_max: pool bounds.
        timeout_s: connect and release bound of one connection.
    """

    kind = "postgres"

    def __init__(
        self,
        dsn: str,
        bridge: AsyncioBridge,
        *,
        schema: str | None = None,
        ttl_s: float,
        pool_min: int = 1,
        pool_max: int = 10,
        timeout_s: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._bridge = bridge
        self.schema = schema
        self._ttl_s = ttl_s
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._timeout_s = timeout_s
        self._pool: BridgedPgPool | None = None
        self.migrations_applied: list[int] = []

    @classmethod
    def from_url(cls, url: str, settings: Settings, bridge: AsyncioBridge) -> PostgresStore:
        """The store a ``postgresql://…[?schema=NAME]`` URL names, sized from ``settings``."""
        dsn, schema = parse_postgres_url(url)
        return cls(
            dsn,
            bridge,
            schema=schema,
            ttl_s=settings.conversation_ttl_s,
            pool_min=settings.pg_pool_min,
            pool_max=settings.pg_pool_max,
            timeout_s=settings.store_timeout_s,
        )

    @property
    def pool(self) -> BridgedPgPool:
        """The bridged pool (open stores only)."""
        if self._pool is None:
            raise StoreError("the PostgreSQL store is not open")
        return self._pool

    async def __aenter__(self) -> PostgresStore:
        settings = {"search_path": f'"{self.schema}"'} if self.schema else None
        if self.schema:
            # the schema must exist before a connection can use it as its search_path
            boot = await BridgedPgPool.create(
                self._bridge,
                self._dsn,
                min_size=0,
                max_size=1,
                connect_timeout_s=self._timeout_s,
                release_timeout_s=self._timeout_s,
            )
            try:
                await boot.run(_create_schema, self.schema)
            finally:
                await boot.close()
        self._pool = await BridgedPgPool.create(
            self._bridge,
            self._dsn,
            min_size=min(self._pool_min, self._pool_max),
            max_size=self._pool_max,
            server_settings=settings,
            connect_timeout_s=self._timeout_s,
            release_timeout_s=self._timeout_s,
        )
        try:
            self.migrations_applied = await migrate(self._pool, self.schema)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            import anyio

            with anyio.CancelScope(shield=True):
                await pool.close()

    async def create_thread(self, thread_id: str, *, created_at: float) -> None:
        """Create an empty thread; a no-op when it exists."""
        await self.pool.run(_create_thread, thread_id, created_at, self._ttl_s)

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
        for t in turns:
            if not t.idempotency_key or t.created_at is None:
                raise StoreError("a stored turn needs an idempotency_key and created_at")
        written, count, landed = await self.pool.run(
            _append, thread_id, list(turns), self._ttl_s, owner, creation_key
        )
        return AppendResult(written=written, turn_count=count, thread_id=landed)

    async def append_batch(self, items: Sequence[BatchItem]) -> list[AppendResult]:
        """Several :meth:`append_turns` in one transaction (the spool's replay): all land or
        none."""
        for _, turns, _, _ in items:
            for t in turns:
                if not t.idempotency_key or t.created_at is None:
                    raise StoreError("a stored turn needs an idempotency_key and created_at")
        rows = await self.pool.run(_append_batch, list(items), self._ttl_s)
        return [AppendResult(written=w, turn_count=c, thread_id=t) for w, c, t in rows]

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        """Append one turn; True if written, False if the key was already written."""
        t = attrs.evolve(turn, idempotency_key=idempotency_key)
        return (await self.append_turns(turn.thread_id, [t])).written == 1

    async def get_thread(self, thread_id: str) -> Thread | None:
        """The thread and its turns in order, or None."""
        return await self.pool.run(_get, thread_id)

    async def delete_expired(self, now: float) -> int:
        """Delete threads (and their turns) that expired before ``now``."""
        return await self.pool.run(_delete_expired, now)

    def status(self) -> dict[str, Any]:
        """Kind, redacted URL, schema and pool use."""
        return {
            "kind": self.kind,
            "url": redact_url(self._dsn),
            "schema": self.schema,
            "open": self._pool is not None,
            "pool": self._pool.status() if self._pool is not None else None,
        }


# -- asyncio-flavoured statements (run on a pooled connection through the bridge) -------


async def _create_schema(conn: asyncpg.Connection, schema: str) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


async def _create_thread(
    conn: asyncpg.Connection, thread_id: str, created_at: float, ttl_s: float
) -> None:
    await conn.execute(
        "INSERT INTO exai_threads (id, created_at, updated_at, expires_at) "
        "VALUES ($1, $2, $2, $3) ON CONFLICT (id) DO NOTHING",
        thread_id,
        created_at,
        created_at + ttl_s,
    )


async def _append(
    conn: asyncpg.Connection,
    thread_id: str,
    turns: list[Turn],
    ttl_s: float,
    owner: str | None,
    creation_key: str | None,
) -> tuple[int, int, str]:
    async with conn.transaction():
        return await _append_in_tx(conn, thread_id, turns, ttl_s, owner, creation_key)


async def _append_batch(
    conn: asyncpg.Connection, items: list[BatchItem], ttl_s: float
) -> list[tuple[int, int, str]]:
    # row locks taken in thread-id order (stable: a thread's own writes keep their order), so
    # two daemons replaying batches at once do not lock in opposite orders
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    results: list[tuple[int, int, str] | None] = [None] * len(items)
    async with conn.transaction():
        for i in order:
            thread_id, turns, owner, creation_key = items[i]
            results[i] = await _append_in_tx(conn, thread_id, turns, ttl_s, owner, creation_key)
    return [r for r in results if r is not None]


async def _append_in_tx(
    conn: asyncpg.Connection,
    thread_id: str,
    turns: Sequence[Turn],
    ttl_s: float,
    owner: str | None,
    creation_key: str | None,
) -> tuple[int, int, str]:
    first = min((t.created_at or 0.0) for t in turns) if turns else 0.0
    # no conflict target: a taken id and a taken creation key both do nothing
    await conn.execute(
        "INSERT INTO exai_threads (id, created_at, updated_at, expires_at, owner, "
        "creation_key) VALUES ($1, $2, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        thread_id,
        first,
        first + ttl_s,
        owner,
        creation_key,
    )
    if creation_key is not None:
        holder = await conn.fetchval(
            "SELECT id FROM exai_threads WHERE creation_key = $1", creation_key
        )
        if holder is not None:
            thread_id = holder
    row = await conn.fetchrow(
        "SELECT turn_count, bytes FROM exai_threads WHERE id = $1 FOR UPDATE", thread_id
    )
    count, size = row["turn_count"], row["bytes"]
    written = 0
    last: float | None = None
    for t in turns:
        inserted = await conn.fetchval(
            "INSERT INTO exai_turns (thread_id, seq, role, content, tool, provider, model, "
            "files, created_at, idempotency_key) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10) "
            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING seq",
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
        )
        if inserted is not None:
            written += 1
            count += 1
            size += t.size_bytes
            assert t.created_at is not None
            last = t.created_at if last is None else max(last, t.created_at)
    if last is not None:
        await conn.execute(
            "UPDATE exai_threads SET turn_count = $2, bytes = $3, "
            "updated_at = GREATEST(updated_at, $4), expires_at = GREATEST(expires_at, $5) "
            "WHERE id = $1",
            thread_id,
            count,
            size,
            last,
            last + ttl_s,
        )
    return written, count, thread_id


async def _get(conn: asyncpg.Connection, thread_id: str) -> Thread | None:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            "SELECT created_at, updated_at, expires_at, owner FROM exai_threads WHERE id = $1",
            thread_id,
        )
        if row is None:
            return None
        rows = await conn.fetch(
            "SELECT seq, role, content, tool, provider, model, files::text AS files, "
            "created_at, idempotency_key FROM exai_turns WHERE thread_id = $1 ORDER BY seq",
            thread_id,
        )
    return Thread(
        id=thread_id,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        owner=row["owner"],
        turns=tuple(
            Turn(
                thread_id=thread_id,
                seq=r["seq"],
                role=r["role"],
                content=r["content"],
                tool=r["tool"],
                provider=r["provider"],
                model=r["model"],
                files=tuple(json.loads(r["files"])),
                created_at=r["created_at"],
                idempotency_key=r["idempotency_key"],
            )
            for r in rows
        ),
    )


async def _delete_expired(conn: asyncpg.Connection, now: float) -> int:
    result = await conn.execute("DELETE FROM exai_threads WHERE expires_at <= $1", now)
    return int(result.split()[-1])
