"""What a killed test run leaves in the shared PostgreSQL and Redis is removed by the next run's
start, and a live run's never is (:mod:`tests.leftovers`).

Each run is a child process driving the suite's own fixtures (``pg_database``,
``redis_prefix``) as a test session does: one is killed with SIGKILL while it owns a database
or a prefix with a key that has no TTL (as a daemon's keys), one stays alive meanwhile, and a
third starts a new session. Nothing of the servers is flushed or stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.storage.conftest import PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT, _reachable

REPO = Path(__file__).resolve().parents[2]
#: a bound on waits for the servers to see a killed process's connections go (never a figure
#: under test)
HANG_GUARD_S = 30.0

#: a test run: takes a database or a Redis prefix with the suite's fixture, writes a key with no
#: TTL under a prefix, prints the name, and lives until its stdin closes — then ends its
#: session as pytest would (the fixture's teardown) — unless it is killed first
RUN = """
import sys
import tests.storage.conftest as c

what = sys.argv[1]
fixture = c.pg_database if what == "db" else c.redis_prefix
session = fixture.__wrapped__()
name = next(session)
if what == "redis":
    import redis
    client = redis.Redis(host=c.REDIS_HOST, port=c.REDIS_PORT)
    client.set(name + "k", b"no TTL")
    client.close()
print(name, flush=True)
sys.stdin.read()
next(session, None)  # (its teardown, as pytest runs it)
"""


@contextlib.contextmanager
def run(what: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A test run in a child process and the name it owns (it ends when the block does)."""
    child = subprocess.Popen(
        [sys.executable, "-c", RUN, what],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        name = child.stdout.readline().strip()
        assert name, f"the {what} run printed no name (exit {child.poll()})"
        yield child, name
    finally:
        if child.poll() is None:
            child.stdin.close()
            try:
                child.wait(HANG_GUARD_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        child.stdout.close()
        if not child.stdin.closed:
            child.stdin.close()


def kill(child: subprocess.Popen[str], server_port: int) -> None:
    """SIGKILL ``child`` and wait until the server on ``server_port`` has seen each of its
    connections go (a server reads a peer's end a moment after the kernel sent it)."""
    ports = {
        c.laddr.port
        for c in psutil.Process(child.pid).net_connections("tcp")
        if c.raddr and c.raddr.port == server_port
    }
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + HANG_GUARD_S
    while ports & server_client_ports(server_port):
        assert time.monotonic() < deadline, "the server still shows the killed run's connections"
        time.sleep(0.05)


def server_client_ports(server_port: int) -> set[int]:
    """The client ports of the connections the server on loopback ``server_port`` serves."""
    if server_port == PG_PORT:
        rows = admin("SELECT client_port FROM pg_stat_activity")
        return {r[0] for r in rows if r[0] is not None}
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        return {int(c["addr"].rsplit(":", 1)[1]) for c in client.client_list()}
    finally:
        client.close()


async def _admin(sql: str, *args: object) -> list[tuple[object, ...]]:
    import asyncpg

    conn = await asyncpg.connect(user="postgres", host=PG_HOST, port=PG_PORT, database="postgres")
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def admin(sql: str, *args: object) -> list[tuple[object, ...]]:
    return asyncio.run(_admin(sql, *args))


def databases() -> set[str]:
    return {str(r[0]) for r in admin("SELECT datname FROM pg_database")}


def test_a_killed_runs_database_is_dropped_by_the_next_run_and_a_live_runs_is_kept() -> None:
    if not _reachable(PG_HOST, PG_PORT):
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    dead = ""
    try:
        with run("db") as (killed, dead), run("db") as (_live, alive):
            assert {dead, alive} <= databases()
            kill(killed, PG_PORT)
            others = {d for d in databases() if not d.startswith("exai_test_")}
            with run("db") as (_next, new):
                after = databases()
                assert new in after
                assert alive in after, "a live run's database was dropped"
                assert dead not in after, "a killed run's database was left behind"
                assert others <= after
            assert alive in databases()
    finally:
        if dead:  # (the old code left it: the test leaves nothing behind either way)
            admin(f'DROP DATABASE IF EXISTS "{dead}" WITH (FORCE)')


def test_a_killed_runs_redis_keys_are_deleted_by_the_next_run_and_a_live_runs_kept() -> None:
    if not _reachable(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    dead = ""
    try:
        with run("redis") as (killed, dead), run("redis") as (_live, alive):
            assert client.ttl(dead + "k") == -1  # (kept until deleted)
            kill(killed, REDIS_PORT)
            assert client.exists(dead + "k", alive + "k") == 2
            with run("redis") as (_next, _new):
                assert client.exists(alive + "k") == 1, "a live run's keys were deleted"
                assert client.exists(dead + "k") == 0, "a killed run's keys were left behind"
            assert client.exists(alive + "k") == 1
        assert client.exists(alive + "k") == 0  # (its session's end deleted them)
    finally:
        if dead:
            client.delete(dead + "k")
        client.close()
