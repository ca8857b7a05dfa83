"""A send on a WebSocket whose close handshake we began is ConnectionClosed, never a crash.

Found by the attack pass on the direct socket writes (issue 18): a frame that fails to parse
(invalid UTF-8 → 1007, a reserved opcode → 1002) arriving while answers were being written. Our
close frame puts wsproto in LOCAL_CLOSING before trio-websocket sets ``_close_reason``; an answer
(or a pong) sent in between raised wsproto's ``LocalProtocolError``, which nothing caught: the
session ended as ``session.error`` (120 of 120 connections, each line carrying the first 200
characters of the answer) instead of closing.
"""

from __future__ import annotations

import base64
import os

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto.events import CloseConnection, Ping

from exai.server.outbox import ProgressStream
from exai.server.wsconn import ServerConnection, accept_request

pytestmark = pytest.mark.anyio


async def _open(nursery: trio.Nursery, *, wrapped: bool) -> ServerConnection:
    """A server connection past its handshake, over a memory stream (in a ProgressStream, as
    the listener makes, when ``wrapped``: send_text's own path)."""
    server, client = trio.testing.memory_stream_pair()
    key = base64.b64encode(os.urandom(16)).decode()
    await client.send_all(
        (
            "GET /mcp HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    stream: trio.abc.Stream = ProgressStream(server) if wrapped else server
    request = await accept_request(nursery, stream, max_message_size=1 << 20)
    conn = await request.accept()
    assert isinstance(conn, ServerConnection)
    return conn


@pytest.mark.parametrize("wrapped", [True, False], ids=["progress-stream", "plain-stream"])
async def test_a_send_after_our_close_frame_is_connection_closed(wrapped: bool) -> None:
    async with trio.open_nursery() as nursery:
        conn = await _open(nursery, wrapped=wrapped)
        # what ServerConnection._handle_close_connection_event does first: the close frame
        # goes out while trio-websocket has not yet marked the connection closed
        conn._wsproto.send(CloseConnection(code=1007, reason="invalid UTF-8"))
        assert conn._close_reason is None
        with pytest.raises(ConnectionClosed):
            await conn.send_text('{"jsonrpc":"2.0","id":1,"result":{}}')  # a call's answer
        with pytest.raises(ConnectionClosed):
            await conn.send_message('{"jsonrpc":"2.0","method":"notifications/progress"}')
        with pytest.raises(ConnectionClosed):
            await conn._send(Ping(b"x").response())  # the reader's pong
        nursery.cancel_scope.cancel()


class _FullBudget:
    """An InboundMeter whose daemon budget is full: every part is refused."""

    held = 0

    def take(self, nbytes: int) -> bool:
        return False


async def _close_code_of(message: str, *, max_message_size: int) -> int:
    """Send ``message`` (one frame) to a server connection whose budget is full and return the
    close code the server answers with."""
    server, client = trio.testing.memory_stream_pair()
    key = base64.b64encode(os.urandom(16)).decode()
    await client.send_all(
        (
            "GET /mcp HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    async with trio.open_nursery() as nursery:
        request = await accept_request(nursery, server, max_message_size=max_message_size)
        conn = await request.accept()
        assert isinstance(conn, ServerConnection)
        conn.meter = _FullBudget()  # type: ignore[assignment]
        head = await client.receive_some()
        assert head.startswith(b"HTTP/1.1 101") and head.endswith(b"\r\n\r\n")
        await client.send_all(_client_frame(message))
        code = None
        with trio.fail_after(10):
            while code is None:
                data = await client.receive_some()
                if not data:
                    break
                code = _close_code(data)
        nursery.cancel_scope.cancel()
    assert code is not None
    return code


def _client_frame(text: str) -> bytes:
    """One masked, final text frame (RFC 6455 §5.2), as a client sends it."""
    payload = text.encode()
    n = len(payload)
    head = bytearray([0x81])
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _close_code(data: bytes) -> int | None:
    """The code of a server close frame at the start of ``data`` (unmasked), if it is one."""
    if len(data) >= 4 and data[0] == 0x88:
        return int.from_bytes(data[2:4], "big")
    return None


async def test_a_message_over_the_size_limit_closes_1009_even_when_the_budget_is_full() -> None:
    """A part that crosses the size limit and finds the budget full is over the limit (1009):
    1013 (try again later) would have the client send it again, forever."""
    assert await _close_code_of("x" * 3000, max_message_size=1000) == 1009
    # and a message within the limit that finds the budget full: try again later
    assert await _close_code_of("x" * 500, max_message_size=1000) == 1013
