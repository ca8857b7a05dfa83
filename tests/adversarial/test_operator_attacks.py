"""What an operator does to a real ``exai serve`` that broke it (each test failed on the code
before its fix): SIGHUP after the config file was overwritten with bytes that are not UTF-8; a
Redis that turned into a read-only replica (a failover) under a running daemon; connections
to the admin port that never send their request.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, LiveDaemon, live_daemon
from tests.httpmcp import mcp_http
from tests.storage.conftest import private_redis  # noqa: F401 (a fixture)

pytestmark = pytest.mark.anyio


async def _wait_event(daemon: LiveDaemon, name: str, count: int) -> None:
    with trio.fail_after(SERVED_WITHIN_S):
        while len(daemon.log_events(name)) < count:
            assert daemon.alive(), "the daemon died:\n" + "\n".join(daemon.stderr_lines[-30:])
            await trio.sleep(0.05)


@pytest.mark.parametrize("broken", ["config", "dotenv"])
async def test_sighup_with_a_config_file_that_is_not_utf8_keeps_the_daemon_and_its_settings(
    tmp_path: Path, broken: str
) -> None:
    """A config file caught half-copied (or overwritten with anything not UTF-8), then SIGHUP:
    the reload is refused and logged, the daemon serves on with its settings — it used to die
    of the UnicodeDecodeError — and the next good file is applied."""
    config = tmp_path / "exai.toml"
    config.write_text("max_inflight = 32\n")
    dotenv = tmp_path / "exai.env"
    dotenv.write_text("EXAI_MAX_INFLIGHT=32\n")
    async with live_daemon(tmp_path, EXAI_CONFIG=str(config), EXAI_ENV_FILE=str(dotenv)) as daemon:
        await daemon.assert_serves()
        target = config if broken == "config" else dotenv
        target.write_bytes(b"max_inflight = 1\n\xff\xfe not text \x00\n")
        os.kill(daemon.pid, signal.SIGHUP)
        await _wait_event(daemon, "config.reload_failed", 1)
        failed = daemon.log_events("config.reload_failed")[0]
        assert "UTF-8" in failed["reason"], failed
        await daemon.assert_serves()
        target.write_text("max_inflight = 16\n" if broken == "config" else "EXAI_MAX_INFLIGHT=16\n")
        os.kill(daemon.pid, signal.SIGHUP)
        await _wait_event(daemon, "config.reloaded", 1)
        await daemon.assert_serves()


async def test_a_redis_that_turns_read_only_degrades_like_a_dead_one(
    tmp_path: Path,
    private_redis: str,  # noqa: F811
) -> None:
    """A failover leaves the daemon on a replica: every write answers READONLY. That is a
    Redis that cannot serve, as if unreachable — the shared limits fall back to their local
    share and calls run — not an error that dropped every new connection unanswered."""
    admin = redis.Redis.from_url(private_redis)
    async with live_daemon(
        tmp_path,
        EXAI_REDIS_URL=private_redis,
        EXAI_IDENTITY_MAX_INFLIGHT="4",
        EXAI_MAX_CONNECTIONS_PER_IP="64",
    ) as daemon:
        await daemon.assert_serves()
        await trio.to_thread.run_sync(admin.replicaof, "127.0.0.1", "1")
        try:
            for _ in range(3):
                await daemon.assert_serves()  # WebSocket (a per-address lease first)
                async with mcp_http(daemon.url, timeout=SERVED_WITHIN_S) as mcp:
                    reply = await mcp.call("version")
                    assert reply["result"]["isError"] is False, reply
        finally:
            await trio.to_thread.run_sync(admin.replicaof, "no", "one")
            await trio.to_thread.run_sync(admin.close)
        await daemon.assert_serves()
        assert not daemon.log_events("session.error"), daemon.log_events("session.error")


async def test_connections_that_never_send_a_request_delay_a_health_check_only_boundedly(
    tmp_path: Path,
) -> None:
    """A balancer's half-open checks (or a slowloris) on the admin port: 1,000 connections
    that send half a request and wait. /readyz is still answered (more than once) — each of
    them used to hold one of the 64 handler slots for 5 s in turn, so a check queued behind
    them all (~80 s)."""
    async with live_daemon(tmp_path) as daemon:
        parts = urlsplit(daemon.admin_url)
        streams: list[trio.SocketStream] = []
        try:
            with trio.fail_after(SERVED_WITHIN_S):
                for _ in range(1000):
                    stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 0)
                    streams.append(stream)
                    await stream.send_all(b"GET /readyz HTTP/1.1\r\n")
            async with httpx.AsyncClient(timeout=SERVED_WITHIN_S) as client:
                for _ in range(3):
                    ready = await client.get(daemon.admin_url + "/readyz")
                    assert ready.status_code == 200
        finally:
            for stream in streams:
                await trio.aclose_forcefully(stream)
        await daemon.assert_serves()
