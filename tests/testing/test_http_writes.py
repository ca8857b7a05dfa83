"""How the mock upstream's HTTP/1.1 connection writes: on plain TCP under trio, a small write
goes to the socket directly (no scheduler round per SSE event), the bytes and their order as
before; a long run of them still lets the other connections in; TLS and asyncio go the usual
way."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from exai.testing import _http
from exai.testing._http import HttpConnection

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nContent-Length: 2\r\n\r\n{}"


class _Pair:
    def __init__(self, server: anyio.abc.SocketStream, client: anyio.abc.SocketStream) -> None:
        self.server = server
        self.client = client
        self.usual_sends = 0
        original = server.send

        async def counted(item: bytes) -> None:
            self.usual_sends += 1
            await original(item)

        # every write that goes the usual way (through the stream) is counted
        server.send = counted  # type: ignore[method-assign]

    async def read_all(self) -> bytes:
        chunks = []
        with anyio.fail_after(5):
            while True:
                try:
                    chunks.append(await self.client.receive())
                except anyio.EndOfStream:
                    return b"".join(chunks)


@pytest.fixture
async def pair() -> AsyncIterator[_Pair]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener:
        port = listener.extra(SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        inner = listener.listeners[0]
        assert isinstance(inner, anyio.abc.SocketListener)
        server = await inner.accept()
        async with client, server:
            yield _Pair(server, client)


async def _stream_events(conn: HttpConnection, events: list[bytes]) -> None:
    request = await conn.next_request()
    assert request is not None
    await conn.start_response(200, [("content-type", "text/event-stream")], content_length=None)
    for event in events:
        await conn.send_data(event)
    await conn.end_response()
    await conn.close()


def _chunked(events: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _events(n: int) -> list[bytes]:
    return [b'data: {"n": %d}\n\n' % i for i in range(n)]


@pytest.mark.anyio
async def test_small_writes_on_plain_tcp_go_to_the_socket_without_the_stream(pair: _Pair) -> None:
    events = _events(12)
    conn = HttpConnection(pair.server, max_body_bytes=1024)
    await pair.client.send(REQUEST)
    await _stream_events(conn, events)
    received = await pair.read_all()
    assert pair.usual_sends == 0
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == _chunked(events)


@pytest.mark.anyio
async def test_a_long_run_of_direct_writes_goes_the_usual_way_once_in_a_while(
    pair: _Pair,
) -> None:
    # the usual way has a checkpoint: other connections get their turn during a long stream
    run = _http.DIRECT_WRITES_IN_A_ROW
    events = _events(3 * run)
    conn = HttpConnection(pair.server, max_body_bytes=1024)
    await pair.client.send(REQUEST)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stream_events, conn, events)
        received = await pair.read_all()
    # head + 3 * run events + end: one write in every run + 1 the usual way
    writes = 1 + 3 * run + 1
    assert pair.usual_sends == writes // (run + 1)
    assert received.partition(b"\r\n\r\n")[2] == _chunked(events)


@pytest.mark.anyio
async def test_a_write_over_the_direct_size_goes_the_usual_way(pair: _Pair) -> None:
    big = b"data: " + b"x" * _http.DIRECT_WRITE_BYTES + b"\n\n"
    conn = HttpConnection(pair.server, max_body_bytes=1024)
    await pair.client.send(REQUEST)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stream_events, conn, [big])
        received = await pair.read_all()
    assert pair.usual_sends == 1
    assert received.partition(b"\r\n\r\n")[2] == _chunked([big])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_under_asyncio_every_write_goes_through_the_stream(
    pair: _Pair, anyio_backend: Any
) -> None:
    events = _events(3)
    conn = HttpConnection(pair.server, max_body_bytes=1024)
    await pair.client.send(REQUEST)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stream_events, conn, events)
        received = await pair.read_all()
    assert pair.usual_sends == 1 + 3 + 1
    assert received.partition(b"\r\n\r\n")[2] == _chunked(events)
