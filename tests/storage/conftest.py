"""Fixtures for the storage tests.

Real servers on loopback: PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and Redis on
127.0.0.1:6379. The session gets its own database ``exai_test_<pid>_<hex>`` (dropped at the end);
each test gets its own schema in it and its own Redis key prefix ``exai-test:<owner>:<hex>:`` (its
keys are deleted afterwards; nothing is ever flushed). A killed run's database and keys are
removed by the next run's start, never a live run's (:mod:`tests.leftovers`).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from exai.config import Secret, Settings
from tests.leftovers import (
    PG_HOST,
    PG_PORT,
    REDIS_HOST,
    REDIS_PORT,
    OwnedDatabase,
    delete_prefix,
    new_redis_prefix,
)


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
    """A fresh database for this test session; its name. Owned by this process for its life
    and dropped at the end; a killed run's is dropped by the next session's start
    (:mod:`tests.leftovers`)."""
    if not _reachable(PG_HOST, PG_PORT):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    database = OwnedDatabase(PG_HOST, PG_PORT)
    name = database.open()
    try:
        yield name
    finally:
        database.close()


def pg_url(database: str, *, schema: str, host: str = PG_HOST, port: int = PG_PORT) -> str:
    return f"postgresql://postgres@{host}:{port}/{database}?schema={schema}"


@pytest.fixture
def pg_schema() -> str:
    """A schema name of this test's own."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own, owned by this process (a killed run's keys are
    deleted by the next run: :mod:`tests.leftovers`); its keys are deleted afterwards."""
    if not _reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    prefix = new_redis_prefix()
    try:
        yield prefix
    finally:
        delete_prefix(prefix)


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
