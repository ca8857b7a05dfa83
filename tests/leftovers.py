"""Test data in the machine's shared PostgreSQL and Redis that no killed run can leave behind.

The storage tests use the shared servers on loopback (a database per test process, a Redis key
prefix per test). A run that ends normally removes them; a run that is killed (``kill -9``, a
CI timeout) used to leave them forever — databases ``exai_test_<hex>`` piled up. Two suites
may run at once on one machine (a person's and CI's, each with its xdist workers), so a
leftover cannot be told by its age or by a guess: it is told by the server itself.

**Ownership.** Each test process holds, for its whole life, one connection to each server that
names what it owns:

* PostgreSQL: a session advisory lock (in the ``postgres`` database) on a key derived from the
  name of its database ``exai_test_<pid>_<hex>`` (:func:`lock_key`), taken *before* the
  database is created;
* Redis: a connection whose client name is ``exai-test-owner:<owner>``, made before any key
  under ``exai-test:<owner>:<hex>:`` is written (``<owner>`` is ``<pid>-<hex>``).

A process that ends in any way closes its connections, and the server forgets the lock and the
client name. So a database whose lock can be taken, and keys whose owner's client name is gone,
are a dead run's.

**Sweeping.** A test process's first database (:class:`OwnedDatabase`) and first key prefix
(:func:`new_redis_prefix`) first remove the dead runs' ones: a database is dropped while the
sweeper holds its lock (so two sweepers, or a sweeper and the owner's own end-of-run drop,
never drop one at once); a prefix's keys are deleted after its owner was looked for *after* its
keys were seen (a live owner names its connection before it writes a key, so it cannot be
missed). Only names of exactly these forms are touched; nothing is flushed, no server stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import os
import re
import sys
import threading
import uuid
from typing import Any

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

#: a test process's database: its pid (for a person reading the list) and a random part
DATABASE_NAME = re.compile(r"exai_test_(\d{1,10})_([0-9a-f]{12})")
#: a test's Redis key prefix: ``exai-test:<owner>:<hex>:``
PREFIX_NAME = re.compile(rb"exai-test:(\d{1,10}-[0-9a-f]{12}):")
OWNER_CLIENT = "exai-test-owner:"


def lock_key(database: str) -> int:
    """The advisory lock key (a signed 64-bit integer) its owner holds for ``database``."""
    digest = hashlib.blake2b(b"exai-test-db:" + database.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def _admin_connection(host: str, port: int) -> Any:
    import asyncpg

    return await asyncpg.connect(user="postgres", host=host, port=port, database="postgres")


async def sweep_databases(host: str = PG_HOST, port: int = PG_PORT) -> list[str]:
    """Drop every ``exai_test_<pid>_<hex>`` database whose owner is gone; their names.

    A database whose lock is held (its owner is alive, or another sweeper is dropping it) is
    left alone; so is every database of another form."""
    conn = await _admin_connection(host, port)
    dropped = []
    try:
        names = await conn.fetch(
            r"SELECT datname FROM pg_database WHERE datname LIKE 'exai\_test\_%'"
        )
        for (name,) in names:
            if DATABASE_NAME.fullmatch(name) is None:
                continue
            key = lock_key(name)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                continue
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                dropped.append(name)
            finally:
                await conn.fetchval("SELECT pg_advisory_unlock($1)", key)
    finally:
        await conn.close()
    return dropped


class OwnedDatabase:
    """A database of this process's own, its lock held until :meth:`close` or the process's end.

    :meth:`open` sweeps the dead runs' databases (:func:`sweep_databases`), takes the lock of
    a new name, then creates the database. The lock is held by a connection of a thread of its
    own (asyncpg needs an event loop, and the tests' loops come and go). :meth:`close` lets the
    lock go and drops the database from a detached process the caller does not wait for
    (DROP DATABASE of a database hundreds of tests wrote to takes seconds); that process takes
    the lock first, so it never drops at the same time as a sweeper. A database it fails to
    drop is swept by the next run.
    """

    def __init__(self, host: str = PG_HOST, port: int = PG_PORT) -> None:
        self.host, self.port = host, port
        self.name = f"exai_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> str:
        """Sweep, lock, create; the database's name.

        Raises:
            RuntimeError: the lock of the new name is held by someone else (never expected).
        """
        asyncio.run(sweep_databases(self.host, self.port))
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._hold(),), name="exai-test-db-owner", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

        async def create() -> None:
            conn = await _admin_connection(self.host, self.port)
            try:
                await conn.execute(f'CREATE DATABASE "{self.name}"')
            finally:
                await conn.close()

        try:
            asyncio.run(create())
        except BaseException:
            self._let_go()
            raise
        return self.name

    async def _hold(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            conn = await _admin_connection(self.host, self.port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key(self.name)):
                self._error = RuntimeError(f"the lock of {self.name} is held by another")
                return
            self._ready.set()
            await self._stop.wait()
        finally:
            self._ready.set()
            await conn.close()

    def _let_go(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Let the lock go and drop the database in the background (see the class)."""
        self._let_go()
        # (os.posix_spawn, not subprocess.Popen: a Popen still running when the process exits
        # says so in a ResourceWarning, an error under this suite's filterwarnings)
        argv = [sys.executable, "-c", _DROP, self.name, self.host, str(self.port)]
        os.posix_spawn(sys.executable, argv, os.environ, setsid=True)


#: what the detached child of :meth:`OwnedDatabase.close` runs: the lock, then the drop
_DROP = """
import asyncio, hashlib, sys
import asyncpg

async def main(name, host, port):
    key = int.from_bytes(
        hashlib.blake2b(b"exai-test-db:" + name.encode(), digest_size=8).digest(), "big",
        signed=True,
    )
    conn = await asyncpg.connect(user="postgres", host=host, port=int(port), database="postgres")
    try:
        await conn.execute("SET lock_timeout = '60s'")
        await conn.fetchval("SELECT pg_advisory_lock($1)", key)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()

asyncio.run(main(*sys.argv[1:]))
"""


# ------------------------------------------------------------------------------ Redis
_owner_lock = threading.Lock()
_owner: tuple[str, Any] | None = None


def _redis_owner() -> str:
    """This process's owner id; its named connection is made (and the dead owners' keys swept)
    on the first call and kept until the process ends."""
    global _owner
    with _owner_lock:
        if _owner is not None:
            owner, client = _owner
            # (a connection the server dropped is made again without its name: name it again)
            if client.client_getname() != (OWNER_CLIENT + owner).encode():
                client.client_setname(OWNER_CLIENT + owner)
        else:
            import redis

            owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, single_connection_client=True)
            client.client_setname(OWNER_CLIENT + owner)
            _owner = (owner, client)
            atexit.register(client.close)
            sweep_redis(REDIS_HOST, REDIS_PORT)
        return _owner[0]


def sweep_redis(host: str = REDIS_HOST, port: int = REDIS_PORT) -> int:
    """Delete every key under ``exai-test:<owner>:`` whose owner's connection is gone; how many.

    The keys are looked at first and the owners after: an owner names its connection before
    it writes a key, so one alive when its keys were seen is still listed then."""
    import redis

    client = redis.Redis(host=host, port=port)
    deleted = 0
    try:
        owners = set()
        for key in client.scan_iter(match="exai-test:*", count=1000):
            found = PREFIX_NAME.match(key)
            if found is not None:
                owners.add(found[1].decode())
        alive = {
            str(c.get("name", "")).removeprefix(OWNER_CLIENT)
            for c in client.client_list()
            if str(c.get("name", "")).startswith(OWNER_CLIENT)
        }
        for owner in sorted(owners - alive):
            keys = list(client.scan_iter(match=f"exai-test:{owner}:*", count=1000))
            for start in range(0, len(keys), 500):
                deleted += int(client.delete(*keys[start : start + 500]))
    finally:
        client.close()
    return deleted


def new_redis_prefix() -> str:
    """A Redis key prefix of a test's own, ``exai-test:<owner>:<hex>:``, owned by this process
    (the first one sweeps the dead owners' keys)."""
    return f"exai-test:{_redis_owner()}:{uuid.uuid4().hex[:12]}:"


def delete_prefix(prefix: str) -> None:
    """Delete a test's keys (the test is over)."""
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()
