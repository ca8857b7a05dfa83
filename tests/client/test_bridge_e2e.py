"""Must-show 1 and 5: the official MCP SDK drives ``exai bridge`` against a real ``exai serve``.

(1) ``mcp.ClientSession`` over ``stdio_client`` launches ``exai bridge``, lists the tools and
calls ``version``.
(5) The connection between bridge and daemon is cut (a fault proxy) while a call runs: the bridge
reconnects, re-sends, and the client gets the result of the one execution the daemon kept
running. The daemon is killed and restarted on the same port while a call runs: the bridge
reconnects, re-sends, and the call completes; the MCP client sees no error.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from exai.testing.faultproxy import FaultProxy
from tests.helpers import REPO, free_port, subprocess_env

EXAI = str(Path(sys.executable).parent / "exai")
_LISTEN = re.compile(r'exai: listening on (wss?://[^\s"]+)')


@asynccontextmanager
async def exai_serve(tmp_path: Path, *, port: int = 0) -> AsyncIterator[anyio.abc.Process]:
    """``exai serve --plugin tests.daemon_tools:register``, ready when it says it listens.

    The process gets an attribute ``url``. Leaving the block kills it if it still runs.
    """
    env = subprocess_env(tmp_path, EXAI_PORT=str(port))
    proc = await anyio.open_process(
        [EXAI, "serve", "--plugin", "tests.daemon_tools:register"],
        env=env,
        cwd=str(REPO),
        stdin=None,
        stdout=None,
        stderr=-1,
    )
    ready = anyio.Event()
    lines: list[str] = []
    try:
        async with anyio.create_task_group() as tg:

            async def drain() -> None:
                assert proc.stderr is not None
                buf = b""
                async for chunk in proc.stderr:
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for raw in done:
                        line = raw.decode(errors="replace")
                        lines.append(line)
                        m = _LISTEN.search(line)
                        if m and not ready.is_set():
                            proc.url = m.group(1)  # type: ignore[attr-defined]
                            ready.set()

            tg.start_soon(drain)
            with anyio.fail_after(30):
                await ready.wait()
            yield proc
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()


def bridge_params(url: str, tmp_path: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=EXAI,
        args=["bridge"],
        env={"EXAI_URL": url, "PYTHONPATH": str(REPO), "EXAI_LOG_LEVEL": "info"},
        cwd=str(tmp_path),
    )


async def executions(path: Path) -> list[str]:
    """The lines the ``count`` tool wrote to ``path`` (one per execution)."""
    apath = anyio.Path(path)
    return (await apath.read_text()).splitlines() if await apath.exists() else []


async def wait_for_lines(path: Path, n: int) -> None:
    """Wait until the ``count`` tool (another process) has recorded ``n`` executions."""
    with anyio.fail_after(20):
        while len(await executions(path)) < n:
            await anyio.sleep(0.02)


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.anyio
async def test_official_sdk_lists_tools_and_calls_version_through_the_bridge(
    tmp_path: Path,
) -> None:
    async with (
        exai_serve(tmp_path) as daemon,
        stdio_client(bridge_params(daemon.url, tmp_path)) as (read, write),
        ClientSession(read, write) as session,
    ):
        with anyio.fail_after(30):
            init = await session.initialize()
            tools = await session.list_tools()
            result = await session.call_tool("version", {})
    assert init.server_info.name
    names = {t.name for t in tools.tools}
    assert {"version", "sleep", "count"} <= names
    assert result.is_error is False
    assert text_of(result)


@pytest.mark.anyio
async def test_cut_connection_mid_call_yields_the_one_execution_result(tmp_path: Path) -> None:
    marker = tmp_path / "executions.txt"
    async with exai_serve(tmp_path) as daemon:
        port = int(daemon.url.rsplit(":", 1)[1].split("/")[0])
        async with FaultProxy("127.0.0.1", port) as proxy:
            url = f"ws://127.0.0.1:{proxy.port}/mcp"
            async with (
                stdio_client(bridge_params(url, tmp_path)) as (read, write),
                ClientSession(read, write) as session,
            ):
                with anyio.fail_after(60):
                    await session.initialize()
                    results: list[Any] = []
                    async with anyio.create_task_group() as tg:

                        async def run_call() -> None:
                            results.append(
                                await session.call_tool(
                                    "count", {"path": str(marker), "seconds": 1.5}
                                )
                            )

                        tg.start_soon(run_call)
                        await wait_for_lines(marker, 1)
                        proxy.cut()
                        await anyio.sleep(0.3)  # the bridge fails a few reconnects meanwhile
                        proxy.restore()
    (result,) = results
    assert result.is_error is False
    assert text_of(result) == "1"
    assert await executions(marker) == ["started"]  # exactly one execution
    assert not await anyio.Path(str(marker) + ".cancelled").exists()
    assert proxy.accepted >= 2  # the bridge did reconnect


@pytest.mark.anyio
async def test_daemon_killed_and_restarted_mid_call_completes_without_error(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "executions.txt"
    port = free_port()
    url = f"ws://127.0.0.1:{port}/mcp"
    results: list[Any] = []
    async with (
        exai_serve(tmp_path, port=port) as first,
        stdio_client(bridge_params(url, tmp_path)) as (read, write),
        ClientSession(read, write) as session,
    ):
        with anyio.fail_after(60):
            await session.initialize()
            call_done = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def run_call() -> None:
                    results.append(
                        await session.call_tool("count", {"path": str(marker), "seconds": 1})
                    )
                    call_done.set()

                tg.start_soon(run_call)
                await wait_for_lines(marker, 1)
                first.send_signal(signal.SIGKILL)
                await first.wait()
                async with exai_serve(tmp_path, port=port):
                    await wait_for_lines(marker, 2)  # re-sent and run by the new daemon
                    await call_done.wait()  # while the new daemon runs
    (result,) = results
    assert result.is_error is False
    assert text_of(result) == "2"
