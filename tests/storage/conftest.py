"""Fixtures for the storage tests.

Real servers on loopback: PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and Redis on
127.0.0.1:6379. The session gets its own database ``exai_test_<hex>`` (dropped at the end); each
test gets its own schema in it and its own Redis key prefix (its keys are deleted afterwards;
nothing is ever flushed).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from exai.config import Secret, Settings

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with a private state directory and no ambient environment."""
    base = Settings.from_env({}, env_file="", config_file="")
    values: dict[str, Any] = {"state_dir": str(tmp_path / "state")}
    values.update(overrides)
    return attrs.evolve(base, **values)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database for this test session; its name."""
    if not _reachable(PG_HOST, PG_PORT):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    import asyncpg

    name = f"exai_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(
            user="postgres", host=PG_HOST, port=PG_PORT, database="postgres"
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        _drop_database_in_the_background(name)


#: what the detached child of :func:`_drop_database_in_the_background` runs
_DROP = """
import asyncio, sys
import asyncpg

async def main(name, host, port):
    conn = await asyncpg.connect(user="postgres", host=host, port=int(port), database="postgres")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()

asyncio.run(main(*sys.argv[1:]))
"""


def _drop_database_in_the_background(name: str) -> None:
    """Drop the session's database from a detached process the session does not wait for.

    DROP DATABASE makes PostgreSQL (15) checkpoint and unlink every file of the hundreds of
    schemas the tests made: 8 s at the end of a suite on a busy machine (1.8 s for an empty
    database), all of it spent after the last test, checking nothing. Any failure goes to
    stderr; a database left behind is named ``exai_test_<hex>``."""
    import os
    import sys

    # (os.posix_spawn, not subprocess.Popen: a Popen still running when the process exits
    # says so in a ResourceWarning, an error under this suite's filterwarnings)
    argv = [sys.executable, "-c", _DROP, name, PG_HOST, str(PG_PORT)]
    os.posix_spawn(sys.executable, argv, os.environ, setsid=True)


def pg_url(database: str, *, schema: str, host: str = PG_HOST, port: int = PG_PORT) -> str:
    return f"postgresql://postgres@{host}:{port}/{database}?schema={schema}"


@pytest.fixture
def pg_schema() -> str:
    """A schema name of this test's own."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    if not _reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    prefix = f"exai-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        for key in client.scan_iter(match=prefix + "*", count=500):
            client.delete(key)
    finally:
        client.close()


def pg_settings(tmp_path: Path, database: str, schema: str, **overrides: Any) -> Settings:
    return make_settings(tmp_path, storage_url=Secret(pg_url(database, schema=schema)), **overrides)


def redis_url(host: str = REDIS_HOST, port: int = REDIS_PORT) -> Secret:
    return Secret(f"redis://{host}:{port}/0")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A fresh ``redis-server`` of this test's own on a free loopback port (empty script
    cache, no data); its URL. Stopped at the end. Skips when ``redis-server`` is not
    installed."""
    import shutil
    import subprocess
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
         "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not _reachable("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"private redis-server on port {port} did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
