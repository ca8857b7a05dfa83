"""Conversations through the daemon process: restarts, and kill -9 with turns in the spool."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from exai.testing.faultproxy import FaultProxy
from tests.helpers import Rpc, async_daemon_process, subprocess_env, wait_exit, ws
from tests.storage.conftest import PG_HOST, PG_PORT, pg_url

pytestmark = pytest.mark.anyio


def provider_env(mock: MockUpstream) -> dict[str, str]:
    return {
        "EXAI_PROVIDER_MOCK_BASE_URL": mock.base_url,
        "EXAI_PROVIDER_MOCK_MODELS": "mock-fast",
        "EXAI_FAST_MODELS": "mock-fast",
        "EXAI_QUALITY_MODELS": "mock-fast",
    }


async def chat(url: str, prompt: str, continuation_id: str | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"prompt": prompt, "model": "mock-fast"}
    if continuation_id:
        args["continuation_id"] = continuation_id
    async with ws(url) as conn:
        res = await Rpc(conn).call("chat", args)
    assert "result" in res, res
    assert res["result"]["isError"] is False, res
    return res["result"]["structuredContent"]


async def test_thread_continues_across_a_daemon_restart_on_the_default_sqlite_store(tmp_path):
    async with MockUpstream(models=("mock-fast",)) as mock:
        env = subprocess_env(tmp_path, **provider_env(mock))
        async with async_daemon_process(tmp_path, env=env) as (proc, url):
            first = await chat(url, "remember the word PELICAN")
            cid = first["continuation_id"]
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0
        assert (tmp_path / "state" / "exai.sqlite3").exists()
        async with async_daemon_process(tmp_path, env=env) as (proc, url):
            second = await chat(url, "what was the word?", cid)
            assert second["continuation_id"] == cid
            proc.send_signal(signal.SIGTERM)
            await wait_exit(proc)
        sent = mock.chat_requests[-1].json["messages"]
        contents = [m["content"] for m in sent]
        assert any("PELICAN" in c for c in contents)  # the earlier turn came back from SQLite
        assert contents[-1].endswith("what was the word?")
        # and the second daemon's turns were stored too, not taken for the first one's
        rows = await trio.to_thread.run_sync(sqlite_turns, tmp_path / "state" / "exai.sqlite3")
        assert rows == [(cid, 4)]


def sqlite_turns(path: Path) -> list[tuple[str, int]]:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return list(conn.execute("SELECT thread_id, count(*) FROM turns GROUP BY thread_id"))


def count_turns(database: str, schema: str) -> tuple[int, int]:
    import asyncpg

    async def run() -> tuple[int, int]:
        conn = await asyncpg.connect(user="postgres", host=PG_HOST, port=PG_PORT, database=database)
        try:
            row = await conn.fetchrow(
                f'SELECT count(*), count(DISTINCT idempotency_key) FROM "{schema}".exai_turns'
            )
            return int(row[0]), int(row[1])
        finally:
            await conn.close()

    return asyncio.run(run())


async def test_kill_9_with_turns_in_the_spool_replays_them_exactly_once(
    tmp_path: Path, pg_database: str, pg_schema: str
):
    async with (
        MockUpstream(models=("mock-fast",)) as mock,
        FaultProxy(PG_HOST, PG_PORT) as proxy,
    ):
        env = subprocess_env(
            tmp_path,
            **provider_env(mock),
            EXAI_STORAGE_URL=pg_url(pg_database, schema=pg_schema, port=proxy.port),
            EXAI_STORE_TIMEOUT_S="0.5",
        )
        async with async_daemon_process(tmp_path, env=env) as (proc, url):
            await chat(url, "written while the database is up")
            proxy.cut()  # Postgres unreachable: turns must go to the spool
            for i in range(5):
                await chat(url, f"spooled turn {i}")
            spool_files = list((tmp_path / "state" / "spool").glob("*"))
            assert spool_files and any(f.stat().st_size > 0 for f in spool_files)
            proc.send_signal(signal.SIGKILL)
            await wait_exit(proc)
        proxy.restore()
        before = await trio.to_thread.run_sync(count_turns, pg_database, pg_schema)
        assert before == (2, 2)  # only the first call reached Postgres
        async with async_daemon_process(tmp_path, env=env) as (proc, url):
            with trio.fail_after(20):
                while (await trio.to_thread.run_sync(count_turns, pg_database, pg_schema))[0] < 12:
                    await trio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            await wait_exit(proc)
        total, distinct = await trio.to_thread.run_sync(count_turns, pg_database, pg_schema)
        assert (total, distinct) == (12, 12)  # 6 calls × 2 turns, none lost, none twice


async def test_two_daemons_sharing_postgres_and_redis_continue_each_others_threads(
    tmp_path: Path, pg_database: str, pg_schema: str, redis_prefix: str
):
    async with MockUpstream(models=("mock-fast",)) as mock:
        common = {
            **provider_env(mock),
            "EXAI_STORAGE_URL": pg_url(pg_database, schema=pg_schema),
            "EXAI_REDIS_URL": "redis://127.0.0.1:6379/0",
            "EXAI_REDIS_KEY_PREFIX": redis_prefix,
        }
        env_a = subprocess_env(tmp_path / "a", **common)
        env_b = subprocess_env(tmp_path / "b", **common)
        async with (
            async_daemon_process(tmp_path / "a", env=env_a) as (proc_a, url_a),
            async_daemon_process(tmp_path / "b", env=env_b) as (proc_b, url_b),
        ):
            first = await chat(url_a, "the colour is TEAL")
            cid = first["continuation_id"]
            second = await chat(url_b, "which colour?", cid)
            third = await chat(url_a, "and again?", cid)
            assert second["continuation_id"] == third["continuation_id"] == cid
            for proc in (proc_a, proc_b):
                proc.send_signal(signal.SIGTERM)
                await wait_exit(proc)
        on_b = [m["content"] for m in mock.chat_requests[1].json["messages"]]
        assert any("TEAL" in c for c in on_b)  # B read A's turns from Postgres
        on_a = [m["content"] for m in mock.chat_requests[2].json["messages"]]
        assert any("which colour?" in c for c in on_a)  # A saw B's turn: no stale cache
        total, distinct = await trio.to_thread.run_sync(count_turns, pg_database, pg_schema)
        assert (total, distinct) == (6, 6)
