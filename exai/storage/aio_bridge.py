"""The one bridge between exai's trio world and the asyncio libraries asyncpg and redis-py.

The daemon opens one asyncio loop inside its trio run, at start-up, with
:func:`open_asyncio_bridge`; every asyncpg and redis call goes through the
:class:`AsyncioBridge` it yields. Nothing outside this module imports ``trio_asyncio``.

::

    async with open_asyncio_bridge() as bridge:
        pool = await BridgedPgPool.create(bridge, dsn, min_size=1, max_size=10)
        rows = await pool.run(lambda conn: conn.fetch("SELECT 1"))
        redis = BridgedRedis.from_url(bridge, "redis://127.0.0.1:6379/0", max_connections=20)
        await redis.set("k", b"v")

Semantics (trio-asyncio 0.16): :meth:`AsyncioBridge.run` wraps the asyncio coroutine in an
asyncio task on the bridge's loop and waits for it from trio. Cancelling the calling trio task's
scope cancels that asyncio task (one ``CancelledError`` thrown into it) and the trio caller gets
``trio.Cancelled`` once the task has finished unwinding. The loop is passed explicitly, so a trio
task started from a nursery opened *before* the bridge may use it too.

Resource handling:
    Leaving ``open_asyncio_bridge`` cancels and awaits every asyncio task still running on the
    loop. Close pools and clients (``await pool.close()``, ``await redis.aclose()``) before that.

Error handling:
    The adapters map driver errors into :mod:`exai.errors`: a connection that cannot be made or
    is lost, a timeout, a server shutting down → :class:`~exai.errors.StoreUnavailableError`
    (retryable); anything else the server says → :class:`~exai.errors.StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
import trio_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from exai.config import redact_url
from exai.errors import ScriptNotLoadedError, StoreError, StoreUnavailableError

__all__ = ["AsyncioBridge", "BridgedPgPool", "BridgedRedis", "open_asyncio_bridge"]

T = TypeVar("T")


class AsyncioBridge:
    """Runs asyncio coroutine functions from trio on one trio-asyncio loop.

    Made by :func:`open_asyncio_bridge`; valid only inside its ``async with``.
    """

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self.calls = 0

    async def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await async_fn(*args)`` as an asyncio task, waited for from trio.

        ``async_fn`` is called inside the asyncio task (not in the trio task), so anything it
        does synchronously before its first await also runs in asyncio context.

        Raises:
            trio.Cancelled: the caller's scope was cancelled (the asyncio task was cancelled
                and has finished).
            Exception: whatever ``async_fn`` raised.
        """
        self.calls += 1
        return await trio_asyncio.aio_as_trio(async_fn, loop=self._loop)(*args)

    def __repr__(self) -> str:
        return f"<AsyncioBridge calls={self.calls}>"


@asynccontextmanager
async def open_asyncio_bridge() -> AsyncIterator[AsyncioBridge]:
    """Open an asyncio loop inside the current trio run and yield its bridge.

    Must run under trio. Open it once per daemon, before the stores.
    """
    async with trio_asyncio.open_loop() as loop:
        yield AsyncioBridge(loop)


# ---------------------------------------------------------------------------------------
# PostgreSQL (asyncpg)

_PG_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)


def map_pg_error(exc: BaseException, what: str) -> StoreError:
    """The exai error for an asyncpg/OS error (``what`` names the store, never a secret)."""
    if isinstance(exc, _PG_UNAVAILABLE):
        return StoreUnavailableError(f"{what} is unavailable: {type(exc).__name__}: {exc}")
    return StoreError(f"{what} failed: {type(exc).__name__}: {exc}")


class BridgedPgPool:
    """A bounded asyncpg pool used from trio.

    Args:
        bridge: the bridge the pool's connections live on.
        pool: an initialised ``asyncpg.Pool``.
        name: how errors and status name it (a redacted URL).
        release_timeout_s: bound on returning a connection to the pool; a connection that
            cannot be reset in time is terminated instead.
    """

    def __init__(
        self, bridge: AsyncioBridge, pool: asyncpg.Pool, *, name: str, release_timeout_s: float
    ) -> None:
        self._bridge = bridge
        self._pool = pool
        self.name = name
        self._release_timeout_s = release_timeout_s
        self.calls = 0
        self.errors = 0

    @classmethod
    async def create(
        cls,
        bridge: AsyncioBridge,
        dsn: str,
        *,
        min_size: int,
        max_size: int,
        server_settings: dict[str, str] | None = None,
        connect_timeout_s: float = 5.0,
        release_timeout_s: float = 5.0,
    ) -> BridgedPgPool:
        """Create and fill the pool (``min_size`` connections).

        Raises:
            StoreUnavailableError: the server cannot be reached.
            StoreError: the server refused (wrong database, authentication).
        """
        name = "PostgreSQL " + redact_url(dsn)
        try:
            pool = await bridge.run(
                _create_pg_pool, dsn, min_size, max_size, server_settings, connect_timeout_s
            )
        except Exception as exc:
            raise map_pg_error(exc, name) from exc
        return cls(bridge, pool, name=name, release_timeout_s=release_timeout_s)

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(conn, *args)`` on a pooled connection (asyncio-flavoured ``fn``).

        A connection whose call was cancelled or lost is terminated, not reused, so a cancel
        never waits for the server and never leaves a half-read connection in the pool.

        Raises:
            StoreUnavailableError: no connection could be made, or it was lost.
            StoreError: the server reported an error.
        """
        self.calls += 1
        try:
            return await self._bridge.run(self._on_connection, fn, *args)
        except Exception as exc:
            self.errors += 1
            raise map_pg_error(exc, self.name) from exc

    async def _on_connection(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        conn = await self._pool.acquire()
        keep = True
        try:
            return await fn(conn, *args)
        except asyncpg.exceptions.PostgresError as exc:
            keep = not isinstance(exc, _PG_UNAVAILABLE)
            raise
        except BaseException:
            keep = False
            raise
        finally:
            # a connection the server or network dropped was already handed back by asyncpg
            # (its proxy is detached): terminating or releasing it again raises InterfaceError,
            # which must not replace the error that explains the failure
            if not keep:
                with contextlib.suppress(asyncpg.exceptions.InterfaceError):
                    conn.terminate()
            with contextlib.suppress(asyncpg.exceptions.InterfaceError):
                await self._pool.release(conn, timeout=self._release_timeout_s)

    async def close(self) -> None:
        """Close gracefully; terminate whatever has not closed within the release bound."""
        try:
            await self._bridge.run(self._close_bounded)
        except Exception:
            self._pool.terminate()

    async def _close_bounded(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._release_timeout_s)
        except (TimeoutError, OSError, asyncpg.exceptions.InterfaceError):
            self._pool.terminate()

    def status(self) -> dict[str, Any]:
        """Pool use: size, idle, in use, maximum; calls and errors so far."""
        size = self._pool.get_size()
        idle = self._pool.get_idle_size()
        return {
            "size": size,
            "idle": idle,
            "in_use": size - idle,
            "max": self._pool.get_max_size(),
            "calls": self.calls,
            "errors": self.errors,
        }


#: Server settings every pooled connection starts with. ``client_connection_check_interval``
#: (PostgreSQL 14+) makes the server notice within a second that a client went away, so a query
#: whose connection we terminated on cancel stops running on the server too.
PG_SERVER_SETTINGS = {"client_connection_check_interval": "1000"}


async def _create_pg_pool(
    dsn: str,
    min_size: int,
    max_size: int,
    server_settings: dict[str, str] | None,
    connect_timeout_s: float,
) -> asyncpg.Pool:
    settings = {**PG_SERVER_SETTINGS, **(server_settings or {})}
    try:
        return await _pg_pool(dsn, min_size, max_size, settings, connect_timeout_s)
    except asyncpg.exceptions.UndefinedObjectError:
        # a server older than 14 does not know the disconnect check: go without it
        for key in PG_SERVER_SETTINGS:
            settings.pop(key, None)
        return await _pg_pool(dsn, min_size, max_size, settings, connect_timeout_s)


async def _pg_pool(
    dsn: str, min_size: int, max_size: int, settings: dict[str, str], connect_timeout_s: float
) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings=settings,
        timeout=connect_timeout_s,
        # the pool's own idle reaping; our bounds come from trio cancel scopes
        max_inactive_connection_lifetime=300.0,
    )


# ---------------------------------------------------------------------------------------
# Redis (redis-py asyncio)


#: what says "this Redis cannot serve now" — unreachable, or answering but refusing every
#: write: a replica after a failover (READONLY), out of memory (OOM), a cluster slot moving
#: (TRYAGAIN) or without its master (CLUSTERDOWN, MASTERDOWN). Each must degrade as an
#: unreachable Redis does (local limits, a call run here), never fail what asked.
_REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    redis_exc.ConnectionError,
    redis_exc.TimeoutError,
    OSError,
    redis_exc.ReadOnlyError,
    redis_exc.OutOfMemoryError,
    redis_exc.TryAgainError,
    redis_exc.ClusterDownError,
)


def map_redis_error(exc: BaseException, what: str) -> StoreError:
    """The exai error for a redis-py/OS error."""
    if isinstance(exc, _REDIS_UNAVAILABLE):
        return StoreUnavailableError(f"{what} is unavailable: {type(exc).__name__}")
    if isinstance(exc, redis_exc.NoScriptError):
        # a type of its own: script users (RedisTokenBucket) fall back to EVAL on it
        return ScriptNotLoadedError(f"{what}: the server does not know the script ({exc})")
    return StoreError(f"{what} failed: {type(exc).__name__}: {exc}")


class BridgedRedis:
    """A redis-py asyncio client with a bounded blocking pool, awaitable from trio.

    Each method is the redis-py command of the same name; results are raw (bytes). redis-py's
    own retries are off: the breaker and the caller decide about retrying.

    Raises (every command):
        StoreUnavailableError: Redis cannot be reached, or the connection was lost.
        StoreError: Redis answered with an error.
    """

    def __init__(self, bridge: AsyncioBridge, client: aioredis.Redis, *, name: str) -> None:
        self._bridge = bridge
        self._client = client
        self.name = name
        self.calls = 0
        self.errors = 0
        self._scripts: dict[str, str] = {}

    @classmethod
    def from_url(
        cls,
        bridge: AsyncioBridge,
        url: str,
        *,
        max_connections: int,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float | None = None,
    ) -> BridgedRedis:
        """A client for ``url`` whose pool holds at most ``max_connections`` connections; a
        command waits for a free one (bounded by the caller's deadline). A connection attempt
        gives up after ``connect_timeout_s`` (default ``socket_timeout_s``)."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=None,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=(
                socket_timeout_s if connect_timeout_s is None else connect_timeout_s
            ),
            retry=Retry(NoBackoff(), 0),
        )
        client = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
        return cls(bridge, client, name="Redis " + redact_url(url))

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kw: Any) -> Any:
        self.calls += 1

        async def go() -> Any:
            return await fn(*args, **kw)

        try:
            return await self._bridge.run(go)
        except Exception as exc:
            self.errors += 1
            raise map_redis_error(exc, self.name) from exc

    async def ping(self) -> bool:
        return await self._call(self._client.ping)

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._call(self._client.get, key)
        return value

    async def set(
        self, key: str, value: bytes | str, *, ex_s: float | None = None, nx: bool = False
    ) -> bool:
        """SET; ``ex_s`` is a TTL in seconds (millisecond precision); ``nx`` only if absent."""
        px = None if ex_s is None else max(1, int(ex_s * 1000))
        return bool(await self._call(self._client.set, key, value, px=px, nx=nx))

    async def delete(self, *keys: str) -> int:
        return await self._call(self._client.delete, *keys)

    async def incr(self, key: str) -> int:
        return await self._call(self._client.incr, key)

    async def expire(self, key: str, seconds: float) -> bool:
        return bool(await self._call(self._client.pexpire, key, max(1, int(seconds * 1000))))

    async def time(self) -> tuple[int, int]:
        """Redis ``TIME``: (seconds, microseconds)."""
        return await self._call(self._client.time)

    async def mget(self, *keys: str) -> list[bytes | None]:
        values: list[bytes | None] = await self._call(self._client.mget, *keys)
        return values

    async def script_load(self, script: str) -> str:
        return await self._call(self._client.script_load, script)

    # evalsha/eval keep redis-py's signatures, so RedisTokenBucket can use this adapter.
    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._call(self._client.evalsha, sha, numkeys, *keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._call(self._client.eval, script, numkeys, *keys_and_args)

    async def run_script(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA ``script``, loading it first when the server does not know it (a restart or
        SCRIPT FLUSH forgets loaded scripts). Keys should share one hash tag for Cluster."""
        client = self._client
        sha_cache = self._scripts

        async def go() -> Any:
            sha = sha_cache.get(script)
            if sha is not None:
                try:
                    return await client.evalsha(sha, len(keys), *keys, *args)
                except redis_exc.NoScriptError:
                    pass
            sha = await client.script_load(script)
            sha_cache[script] = sha
            return await client.evalsha(sha, len(keys), *keys, *args)

        return await self._call(go)

    async def scan_delete(self, pattern: str) -> int:
        """Delete the keys matching ``pattern`` (SCAN + DEL; for tests and ``exai`` admin)."""
        client = self._client

        async def go() -> int:
            n = 0
            async for key in client.scan_iter(match=pattern, count=500):
                n += await client.delete(key)
            return n

        return await self._call(go)

    async def aclose(self) -> None:
        """Close the client and its pool."""
        try:
            await self._bridge.run(self._client.aclose, True)
        except Exception:
            pass

    def status(self) -> dict[str, Any]:
        """Pool use and call counts."""
        pool = self._client.connection_pool
        in_use = len(getattr(pool, "_in_use_connections", ()))
        return {
            "in_use": in_use,
            "max": getattr(pool, "max_connections", None),
            "calls": self.calls,
            "errors": self.errors,
        }
