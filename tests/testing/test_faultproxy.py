"""FaultProxy forwards TCP both ways and cuts, blackholes and restores on cue.

Every test runs on trio and on asyncio.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
from anyio import open_process  # imported early: a lazy import inside a test trips CPython 3.11.7
from anyio.abc import SocketAttribute

from exai.testing import FaultProxy

BROKEN = (anyio.EndOfStream, anyio.BrokenResourceError, OSError)


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class EchoServer:
    """Greets each connection with b"hi:" and then echoes what it receives, upper-cased."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.port = 0

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            async with stream:
                await stream.send(b"hi:")
                while True:
                    try:
                        data = await stream.receive()
                    except anyio.EndOfStream:
                        return
                    await stream.send(data.upper())
        except (anyio.BrokenResourceError, OSError):
            pass
        finally:
            self.closed += 1


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    server.port = listener.extra(SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server.handle, tg)
        yield server
        tg.cancel_scope.cancel()
    await listener.aclose()


async def recv_exactly(stream: anyio.abc.ByteStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += await stream.receive()
    return data


async def settle(echo: EchoServer) -> None:
    """Wait until the echo server's connection tasks have all ended."""
    with anyio.fail_after(5):
        while echo.closed < echo.connections:
            await anyio.sleep(0.01)


async def expect_broken(stream: anyio.abc.ByteStream) -> None:
    """The connection must end (reset or EOF) rather than deliver data or hang."""
    with anyio.fail_after(5):
        with pytest.raises(BROKEN):
            while True:
                await stream.send(b"x")
                await stream.receive()


@pytest.mark.anyio
async def test_data_flows_both_ways(echo: EchoServer) -> None:
    async with (
        FaultProxy("127.0.0.1", echo.port) as proxy,
        await anyio.connect_tcp(proxy.host, proxy.port) as conn,
    ):
        with anyio.fail_after(5):
            assert await recv_exactly(conn, 3) == b"hi:"
            await conn.send(b"ping")
            assert await recv_exactly(conn, 4) == b"PING"
        assert proxy.active == 1
        assert proxy.accepted == 1
        assert proxy.mode == "pass"


@pytest.mark.anyio
async def test_large_payload_is_forwarded_intact(echo: EchoServer) -> None:
    payload = os.urandom(1024 * 1024).hex().lower().encode()  # 2 MiB, > many 64 KiB chunks
    async with (
        FaultProxy("127.0.0.1", echo.port) as proxy,
        await anyio.connect_tcp(proxy.host, proxy.port) as conn,
    ):
        with anyio.fail_after(10):
            await recv_exactly(conn, 3)
            async with anyio.create_task_group() as tg:
                tg.start_soon(conn.send, payload)
                got = await recv_exactly(conn, len(payload))
        assert got == payload.upper()


@pytest.mark.anyio
async def test_half_close_is_forwarded_to_the_target(echo: EchoServer) -> None:
    async with (
        FaultProxy("127.0.0.1", echo.port) as proxy,
        await anyio.connect_tcp(proxy.host, proxy.port) as conn,
    ):
        with anyio.fail_after(5):
            await recv_exactly(conn, 3)
            await conn.send(b"last")
            await conn.send_eof()
            assert await recv_exactly(conn, 4) == b"LAST"
            with pytest.raises(anyio.EndOfStream):
                await conn.receive()


@pytest.mark.anyio
async def test_cut_breaks_live_connections(echo: EchoServer) -> None:
    async with (
        FaultProxy("127.0.0.1", echo.port) as proxy,
        await anyio.connect_tcp(proxy.host, proxy.port) as conn,
    ):
        with anyio.fail_after(5):
            await recv_exactly(conn, 3)
        proxy.cut()
        assert proxy.mode == "refuse"
        await expect_broken(conn)
        with anyio.fail_after(5):
            while echo.closed < 1:  # the target side is torn down too
                await anyio.sleep(0.01)
        assert proxy.active == 0


@pytest.mark.anyio
async def test_cut_refuses_new_connections(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.cut()
        try:
            conn = await anyio.connect_tcp(proxy.host, proxy.port)
        except OSError:
            pass  # refused outright is fine too
        else:
            async with conn:
                await expect_broken(conn)
        assert echo.connections == 0


@pytest.mark.anyio
async def test_blackhole_accepts_but_forwards_nothing(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.cut(mode="blackhole")
        async with await anyio.connect_tcp(proxy.host, proxy.port) as conn:
            await conn.send(b"anyone?")
            with anyio.move_on_after(0.3) as scope:
                await conn.receive()
            assert scope.cancelled_caught
            assert proxy.held == 1
            assert echo.connections == 0


@pytest.mark.anyio
async def test_blackhole_aborts_live_connections(echo: EchoServer) -> None:
    async with (
        FaultProxy("127.0.0.1", echo.port) as proxy,
        await anyio.connect_tcp(proxy.host, proxy.port) as conn,
    ):
        with anyio.fail_after(5):
            await recv_exactly(conn, 3)
        proxy.cut(mode="blackhole")
        await expect_broken(conn)


@pytest.mark.anyio
async def test_restore_forwards_connections_held_by_a_blackhole(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.cut(mode="blackhole")
        async with await anyio.connect_tcp(proxy.host, proxy.port) as conn:
            await conn.send(b"queued")
            with anyio.move_on_after(0.1):
                await conn.receive()
            proxy.restore()
            with anyio.fail_after(5):
                assert await recv_exactly(conn, 9) == b"hi:QUEUED"


@pytest.mark.anyio
async def test_restore_serves_new_connections_again(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.cut()
        proxy.restore()
        assert proxy.mode == "pass"
        async with await anyio.connect_tcp(proxy.host, proxy.port) as conn:
            with anyio.fail_after(5):
                assert await recv_exactly(conn, 3) == b"hi:"
                await conn.send(b"back")
                assert await recv_exactly(conn, 4) == b"BACK"


@pytest.mark.anyio
async def test_latency_delays_each_forwarded_chunk(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        proxy.latency_s = 0.5
        async with await anyio.connect_tcp(proxy.host, proxy.port) as conn:
            with anyio.move_on_after(0.1) as early:
                await conn.receive()
            assert early.cancelled_caught
            with anyio.fail_after(5):
                assert await recv_exactly(conn, 3) == b"hi:"


@pytest.mark.anyio
async def test_unreachable_target_closes_the_client_and_counts_it() -> None:
    spare = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    dead_port = spare.extra(SocketAttribute.local_port)
    await spare.aclose()
    async with FaultProxy("127.0.0.1", dead_port) as proxy:
        async with await anyio.connect_tcp(proxy.host, proxy.port) as conn:
            await expect_broken(conn)
        assert proxy.upstream_failures == 1


@pytest.mark.anyio
async def test_cut_rejects_an_unknown_mode(echo: EchoServer) -> None:
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        with pytest.raises(ValueError, match="cut mode"):
            proxy.cut(mode="drop")  # type: ignore[arg-type]
        assert proxy.mode == "pass"


@pytest.mark.anyio
async def test_exit_leaves_no_tasks_and_closes_connections(echo: EchoServer) -> None:
    async with await anyio.connect_tcp("127.0.0.1", echo.port) as direct:
        await recv_exactly(direct, 3)  # the echo server's own accept tasks are all running now
    await settle(echo)
    before = {task.id for task in anyio.get_running_tasks()}
    async with FaultProxy("127.0.0.1", echo.port) as proxy:
        conn = await anyio.connect_tcp(proxy.host, proxy.port)
        with anyio.fail_after(5):
            await recv_exactly(conn, 3)
        proxy.cut(mode="blackhole")
        held = await anyio.connect_tcp(proxy.host, proxy.port)
        with anyio.fail_after(5):
            while proxy.held < 1:
                await anyio.sleep(0.01)
    assert {task.id for task in anyio.get_running_tasks()} == before
    async with conn, held:
        await expect_broken(conn)
        await expect_broken(held)


@pytest.mark.anyio
async def test_body_exception_propagates_unwrapped(echo: EchoServer) -> None:
    with pytest.raises(KeyError):
        async with FaultProxy("127.0.0.1", echo.port):
            raise KeyError("boom")


@pytest.mark.anyio
async def test_command_line_prints_its_address_and_forwards(echo: EchoServer) -> None:
    cmd = [sys.executable, "-m", "exai.testing.faultproxy", "127.0.0.1", str(echo.port)]
    async with await open_process(cmd) as proc:
        try:
            assert proc.stderr is not None
            line = b""
            with anyio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await proc.stderr.receive()
            text = line.decode().strip()
            assert text.startswith("faultproxy: listening on 127.0.0.1:")
            port = int(text.rsplit(":", 1)[1])
            async with await anyio.connect_tcp("127.0.0.1", port) as conn:
                with anyio.fail_after(5):
                    assert await recv_exactly(conn, 3) == b"hi:"
        finally:
            proc.terminate()
            with anyio.CancelScope(shield=True):
                await proc.wait()
