"""exai's HTTP/1.1 pool (:mod:`exai.providers.transport`) over real sockets on loopback.

Two kinds of server: the :class:`~exai.testing.MockUpstream` (HTTP and HTTPS), and scripted raw
TCP servers written here for what the mock does not do on purpose (gzip, framing by close, a
server that never reads, one that drops an idle connection). Every test ends by checking that
the pool holds no slot and no connection it should not (httpcore's ``test_cancellations`` is
the model): a leak there would starve a provider for good.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import select
import socket
import ssl
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import httpx
import pytest
import trio
import trustme
from anyio.abc import SocketAttribute

from exai.errors import AnswerTooLarge, UpstreamRetryableError
from exai.providers import client as client_module
from exai.providers import transport
from exai.providers.client import OpenAIClient
from exai.providers.transport import PIECE_BYTES, H11Pool, _Conn
from exai.testing import Fault, MockUpstream
from tests.providers.conftest import provider_settings

pytestmark = pytest.mark.anyio

select_poll = select.poll  # (the real one, for a spy on the pool's)

CHAT = {"model": "mock-a", "messages": [{"role": "user", "content": "hello"}]}
JSON_HEADERS = [(b"content-type", b"application/json")]


def _pool(base_url: str, **kw) -> H11Pool:
    values = {
        "max_connections": 4,
        "connect_timeout_s": 5.0,
        "write_timeout_s": 5.0,
        "headers": {"user-agent": "exai-test"},
    }
    values.update(kw)
    return H11Pool(base_url, **values)


def _idle_and_free(pool: H11Pool, *, connections: int | None = None) -> None:
    """Nothing held: no slot in use, nobody waiting, every open connection idle."""
    s = pool.statistics()
    assert (s.in_use, s.waiting) == (0, 0), s
    assert s.connections == s.idle, s
    if connections is not None:
        assert s.connections == connections, s


async def _body(pool: H11Pool, path: str = "models", body: bytes = b"") -> bytes:
    method = "POST" if body else "GET"
    async with await pool.request(method, path, JSON_HEADERS, body) as response:
        assert response.status_code == 200
        return b"".join([chunk async for chunk in response.aiter_bytes()])


def _stream_body(content: str = "hello") -> bytes:
    return json.dumps({**CHAT, "stream": True}).replace("hello", content).encode()


# ------------------------------------------------------------------ scripted raw servers
Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on loopback whose every connection ``handler`` serves; its base URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(SocketAttribute.local_port)

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                await handler(stream)
            except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                pass

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def read_request(stream: anyio.abc.SocketStream, buf: bytearray) -> bytes | None:
    """One request (head and Content-Length body) from ``stream``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        try:
            buf += await stream.receive()
        except anyio.EndOfStream:
            return None
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += await stream.receive()
    buf[:] = rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


def reset_on_close(stream: anyio.abc.SocketStream) -> None:
    sock = stream.extra(SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def response(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


# ------------------------------------------------------------------ keep-alive and bounds
async def test_sequential_requests_reuse_one_keep_alive_connection():
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        for _ in range(5):
            assert b"mock-a" in await _body(pool)
        assert mock.connections == 1 and pool.connects == 1 and pool.reuses == 4
        _idle_and_free(pool, connections=1)


async def test_concurrent_calls_never_hold_more_connections_than_pool_max():
    async with MockUpstream(models=("mock-a",), latency_s=0.2) as mock:
        settings = provider_settings("a", mock.base_url, None, ("mock-a",), pool_max=4)
        answers = []
        async with OpenAIClient(settings) as client:

            async def one() -> None:
                answers.append(await client.chat(dict(CHAT)))

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(one)
            stats = client.pool_statistics()
            assert stats is not None and stats.connections == stats.idle == 4
        assert len(answers) == 20
        assert mock.peak_active == 4 and mock.connections == 4


async def test_a_request_cancelled_while_waiting_for_a_slot_leaves_the_pool_consistent():
    async with (
        MockUpstream(models=("mock-a",)) as mock,
        _pool(mock.base_url, max_connections=1) as pool,
    ):
        held = await pool.request("GET", "models", [])
        waiting = anyio.Event()
        with anyio.CancelScope() as scope:

            async def waiter() -> None:
                waiting.set()
                await pool.request("GET", "models", [])

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await waiting.wait()
                while pool.statistics().waiting == 0:
                    await anyio.sleep(0.01)
                scope.cancel()
        assert pool.statistics().waiting == 0
        await held.aclose()  # not read to the end: its connection is closed
        _idle_and_free(pool, connections=0)
        assert b"mock-a" in await _body(pool)
        _idle_and_free(pool, connections=1)


async def test_a_wait_for_a_slot_past_the_pool_timeout_is_a_pool_timeout():
    async with (
        MockUpstream(models=("mock-a",)) as mock,
        _pool(mock.base_url, max_connections=1, pool_timeout_s=0.2) as pool,
    ):
        async with await pool.request("GET", "models", []) as held:
            with pytest.raises(httpx.PoolTimeout):
                await pool.request("GET", "models", [])
            assert pool.statistics().in_use == 1  # the timed-out wait took nothing
            assert b"mock-a" in b"".join([c async for c in held.aiter_bytes()])
        _idle_and_free(pool, connections=1)


# ------------------------------------------------------------------ timeouts and cancellation
async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout_and_closes_the_socket():
    closed = anyio.Event()

    async def silent(stream: anyio.abc.SocketStream) -> None:
        try:
            while await stream.receive():
                pass  # the ClientHello, never answered
        except anyio.EndOfStream:
            closed.set()

    async with raw_server(silent) as url:
        https = url.replace("http://", "https://")
        async with _pool(https, connect_timeout_s=0.3) as pool:
            with pytest.raises(httpx.ConnectTimeout):
                await pool.request("GET", "models", [])
            _idle_and_free(pool, connections=0)
            with anyio.fail_after(5):
                await closed.wait()


async def test_cancelling_while_waiting_for_the_response_head_closes_the_upstream_request():
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        mock.set_fault(Fault.hang())
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.request, "POST", "chat/completions", JSON_HEADERS, _stream_body())
            with anyio.fail_after(5):
                while mock.active < 1:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await mock.wait_disconnect(1)
        _idle_and_free(pool, connections=0)


async def test_cancelling_in_the_middle_of_a_body_closes_the_upstream_request():
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        mock.set_fault(Fault.stream_stall(after_chunks=2))
        got_some = anyio.Event()

        async def read() -> None:
            async with await pool.request(
                "POST", "chat/completions", JSON_HEADERS, _stream_body()
            ) as response:
                async for _ in response.aiter_bytes():
                    got_some.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with anyio.fail_after(5):
                await got_some.wait()
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await mock.wait_disconnect(1)
        _idle_and_free(pool, connections=0)


async def test_a_response_closed_before_its_end_closes_its_connection_and_frees_its_slot():
    async with (
        MockUpstream(models=("mock-a",), chunk_delay_s=0.05) as mock,
        _pool(mock.base_url, max_connections=1) as pool,
    ):
        response = await pool.request("POST", "chat/completions", JSON_HEADERS, _stream_body())
        chunks = response.aiter_bytes()
        assert await chunks.__anext__()
        await chunks.aclose()
        with anyio.fail_after(5):
            await mock.wait_disconnect(1)
        _idle_and_free(pool, connections=0)
        mock.chunk_delay_s = 0.0
        assert b"[DONE]" in await _body(pool, "chat/completions", _stream_body())
        assert pool.connects == 2


@pytest.fixture
def big_body() -> Iterator[bytes]:
    """64 MiB, more than loopback's socket buffers hold (here up to 32 + 4 MiB). Made and
    freed outside the event loop: allocating it takes tens of milliseconds of CPU, a stall
    the test's loop step would be charged with."""
    body = b"x" * (64 << 20)
    yield body
    del body


async def test_a_server_that_never_reads_makes_a_write_timeout_and_the_socket_is_closed(
    big_body: bytes,
):
    closed = anyio.Event()

    async def never_reads(stream: anyio.abc.SocketStream) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            closed.set()

    async with raw_server(never_reads) as url, _pool(url, write_timeout_s=0.3) as pool:
        with pytest.raises(httpx.WriteTimeout):
            await pool.request("POST", "chat/completions", JSON_HEADERS, big_body)
        _idle_and_free(pool, connections=0)


async def test_a_large_request_body_goes_to_the_socket_without_a_copy():
    """A large body is written as it is: the loop does not copy it into one buffer with the
    head (64 MiB took ~100 ms of loop time under load, caught by the stall check). Checked by
    what is allocated while it is sent: a copy would allocate the body's size again."""
    body = b"y" * (8 << 20)
    received = 0

    async def drain_then_answer(stream: anyio.abc.SocketStream) -> None:
        nonlocal received
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive()
        head, _, rest = head.partition(b"\r\n\r\n")
        received = len(rest)
        while received < len(body):
            received += len(await stream.receive())
        await stream.send(response(b"{}", "Content-Length: 2"))

    async with raw_server(drain_then_answer) as url, _pool(url) as pool:
        tracemalloc.start()
        try:
            answer = await _body(pool, "chat/completions", body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    size = len(body)
    assert answer == b"{}" and received == size
    assert peak < size // 4, f"{peak} bytes allocated while sending {size}"


async def test_an_idle_connection_the_server_closed_is_not_reused():
    served = 0

    async def one_per_connection(stream: anyio.abc.SocketStream) -> None:
        nonlocal served
        buf = bytearray()
        if await read_request(stream, buf) is not None:
            served += 1
            await stream.send(response(b"{}", "Content-Length: 2"))
        # then close the kept-alive connection, as servers do after their idle timeout

    async with raw_server(one_per_connection) as url, _pool(url) as pool:
        assert await _body(pool) == b"{}"
        for _ in range(50):  # until the FIN has arrived (it is on its way at once)
            await anyio.sleep(0.01)
            if pool._idle and pool._idle[0].dead():
                break
        assert await _body(pool) == b"{}"
        assert (served, pool.connects, pool.resends) == (2, 2, 0)
        _idle_and_free(pool)


async def test_a_request_on_an_idle_connection_reset_by_the_server_is_sent_once_on_a_new_one(
    monkeypatch,
):
    # the readability check would notice the reset first; without it the write itself fails
    monkeypatch.setattr(_Conn, "dead", lambda self: False)
    requests: list[bytes] = []
    reset = anyio.Event()

    async def reset_after_one(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        request = await read_request(stream, buf)
        if request is None:
            return
        requests.append(request)
        await stream.send(response(b"{}", "Content-Length: 2"))
        if len(requests) == 1:
            reset_on_close(stream)
            await stream.aclose()
            reset.set()
            return
        await read_request(stream, buf)

    async with raw_server(reset_after_one) as url, _pool(url) as pool:
        assert await _body(pool, "chat/completions", b'{"n": 1}') == b"{}"
        await reset.wait()
        await anyio.sleep(0.05)  # the reset crosses loopback
        assert await _body(pool, "chat/completions", b'{"n": 2}') == b"{}"
        assert pool.resends == 1 and pool.connects == 2
        assert [r.endswith(b'{"n": 1}') for r in requests] == [True, False]
        assert requests[1].endswith(b'{"n": 2}')  # sent exactly once, on the new connection
        _idle_and_free(pool)


async def test_a_request_the_server_read_and_dropped_is_never_sent_twice():
    requests: list[bytes] = []

    async def drop_the_second(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while (request := await read_request(stream, buf)) is not None:
            requests.append(request)
            if len(requests) >= 2:
                return  # read it, then hang up without an answer
            await stream.send(response(b"{}", "Content-Length: 2"))

    async with raw_server(drop_the_second) as url, _pool(url) as pool:
        assert await _body(pool, "chat/completions", b'{"n": 1}') == b"{}"
        with pytest.raises(httpx.RemoteProtocolError):
            await _body(pool, "chat/completions", b'{"n": 2}')
        assert len(requests) == 2 and pool.resends == 0
        _idle_and_free(pool, connections=0)


# ------------------------------------------------------------------ framing and encodings
BODY = json.dumps({"object": "list", "data": [{"id": "m-" + "x" * 3000}]}).encode()


@pytest.mark.parametrize(
    "raw",
    [
        response(BODY, f"Content-Length: {len(BODY)}"),
        response(chunked(BODY[:7], BODY[7:1000], BODY[1000:]), "Transfer-Encoding: chunked"),
        response(BODY, "Connection: close"),  # framed by the server closing
        response(BODY, f"Content-Length: {len(BODY)}").replace(b"HTTP/1.1", b"HTTP/1.0"),
        response(
            chunked(gzip.compress(BODY)[:10], gzip.compress(BODY)[10:]),
            "Content-Encoding: gzip",
            "Transfer-Encoding: chunked",
        ),
        response(zlib.compress(BODY), "Content-Encoding: deflate", "Connection: close"),
        response(zlib.compress(BODY)[2:-4], "Content-Encoding: deflate", "Connection: close"),
    ],
    ids=["length", "chunked", "close", "http10", "gzip-chunked", "deflate", "raw-deflate"],
)
async def test_bodies_framed_and_encoded_every_usual_way_are_read_whole(raw):
    async def answer(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while await read_request(stream, buf) is not None:
            await stream.send(raw)
            if b"Connection: close" in raw or raw.startswith(b"HTTP/1.0"):
                return  # framed by close

    async with raw_server(answer) as url:
        settings = provider_settings("a", url + "/v1", None, ("m",))
        async with OpenAIClient(settings) as client:
            assert await client.list_models() == ["m-" + "x" * 3000]
            assert await client.list_models() == ["m-" + "x" * 3000]
            stats = client.pool_statistics()
            assert stats is not None and stats.in_use == 0 and stats.connections <= 1


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """64 MiB of zeros, gzipped (about 64 KiB)."""
    return gzip.compress(b"\0" * (64 << 20), compresslevel=9)


async def test_a_small_gzip_body_that_expands_hugely_is_handed_out_in_bounded_pieces(gzip_bomb):
    async def bomb(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while await read_request(stream, buf) is not None:
            await stream.send(
                response(gzip_bomb, "Content-Encoding: gzip", f"Content-Length: {len(gzip_bomb)}")
            )

    async with raw_server(bomb) as url, _pool(url) as pool:
        async with await pool.request("GET", "models", []) as r:
            seen = 0
            async for piece in r.aiter_bytes():
                assert len(piece) <= PIECE_BYTES
                seen += len(piece)
                if seen > (4 << 20):
                    break
        _idle_and_free(pool)

        settings = provider_settings("a", url + "/v1", None, ("m",))
        async with OpenAIClient(settings, max_answer_bytes=1 << 20) as client:
            with pytest.raises(AnswerTooLarge):
                await client.chat(dict(CHAT))


async def test_an_unknown_content_encoding_is_a_transport_error_not_garbage():
    async def brotli(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while await read_request(stream, buf) is not None:
            await stream.send(response(b"\x0b\x02", "Content-Encoding: br", "Content-Length: 2"))

    async with raw_server(brotli) as url:
        settings = provider_settings("a", url + "/v1", None, ("m",))
        async with OpenAIClient(settings) as client:
            with pytest.raises(UpstreamRetryableError) as err:
                await client.chat(dict(CHAT))
            assert err.value.extra["transport"] == "DecodingError"
            stats = client.pool_statistics()
            assert stats is not None and stats.in_use == 0 and stats.connections == 0


async def test_a_response_head_over_the_bound_is_a_protocol_error():
    async def huge_head(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        if await read_request(stream, buf) is not None:
            await stream.send(response(b"", "X-Big: " + "a" * 200_000, "Content-Length: 0"))

    async with raw_server(huge_head) as url, _pool(url) as pool:
        with pytest.raises(httpx.RemoteProtocolError):
            await pool.request("GET", "models", [])
        _idle_and_free(pool, connections=0)


# ------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_keeps_one_connection_alive_and_a_cancel_closes_it(server_tls, client_tls):
    async with MockUpstream(models=("mock-a",), ssl_context=server_tls) as mock:
        assert mock.base_url.startswith("https://")
        async with _pool(mock.base_url, ssl_context=client_tls) as pool:
            for _ in range(3):
                assert b"[DONE]" in await _body(pool, "chat/completions", _stream_body())
            assert mock.connections == 1
            mock.set_fault(Fault.stream_stall(after_chunks=1))
            with anyio.move_on_after(0.5):
                await _body(pool, "chat/completions", _stream_body())
            with anyio.fail_after(5):
                await mock.wait_disconnect(1)
            _idle_and_free(pool, connections=0)


async def test_https_with_a_certificate_from_another_ca_is_a_connect_error(server_tls):
    async with MockUpstream(models=("mock-a",), ssl_context=server_tls) as mock:
        other = ssl.create_default_context()
        trustme.CA().configure_trust(other)
        async with _pool(mock.base_url, ssl_context=other) as pool:
            with pytest.raises(httpx.ConnectError):
                await pool.request("GET", "models", [])
            _idle_and_free(pool, connections=0)
        assert mock.request_count == 0


async def test_the_provider_client_streams_a_chat_over_https(server_tls, client_tls, monkeypatch):
    monkeypatch.setattr(client_module, "_ssl_context", client_tls)
    async with MockUpstream(models=("mock-a",), ssl_context=server_tls) as mock:
        settings = provider_settings("a", mock.base_url, None, ("mock-a",))
        deltas: list[str] = []

        async def on_chunk(text: str, thought: str) -> None:
            deltas.append(text)

        async with OpenAIClient(settings) as client:
            done = await client.chat({**CHAT, "stream": True}, on_chunk=on_chunk)
        assert done["choices"][0]["message"]["content"] == "mock:mock-a: hello"
        assert "".join(deltas) == "mock:mock-a: hello"


async def test_requests_cancelled_at_random_points_leave_no_slot_or_connection_behind():
    import random

    rng = random.Random(18)
    async with (
        MockUpstream(models=("mock-a",), chunk_delay_s=0.002) as mock,
        _pool(mock.base_url, max_connections=3) as pool,
    ):

        async def one(bound: float) -> None:
            with anyio.move_on_after(bound):
                await _body(pool, "chat/completions", _stream_body())

        async def cut_after_first_chunk() -> None:
            # Cut mid-stream whatever the machine's speed: on a busy one every timed bound
            # above may run out before its request reaches the mock.
            with anyio.CancelScope() as scope:
                body = _stream_body()
                async with await pool.request("POST", "chat/completions", JSON_HEADERS, body) as r:
                    async for _ in r.aiter_bytes():
                        scope.cancel()
                        await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for i in range(120):
                if i % 10 == 0:
                    tg.start_soon(cut_after_first_chunk)
                else:
                    tg.start_soon(one, rng.uniform(0.0, 0.06))
        s = pool.statistics()
        assert (s.in_use, s.waiting) == (0, 0) and s.connections == s.idle <= 3
        with anyio.fail_after(10):
            while mock.active:
                await anyio.sleep(0.01)
        assert mock.disconnects > 0  # some were cut mid-stream
        assert b"[DONE]" in await _body(pool, "chat/completions", _stream_body())
        _idle_and_free(pool)


async def test_a_header_that_would_split_the_request_is_refused_before_anything_is_sent():
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        with pytest.raises(httpx.LocalProtocolError):
            await pool.request("GET", "models", [(b"x-evil", b"a\r\nX-Injected: 1")])
        _idle_and_free(pool, connections=0)
        assert mock.request_count == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not HTTP at all
        response(b"{}", "Content-Length: 2", "Transfer-Encoding: chunked"),  # both framings
        response(b"zz\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),  # a bad chunk size
        response(b"{}", "Content-Length: 2", "Content-Length: 3"),  # two lengths
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",  # ends before its length
    ],
    ids=["not-http", "length-and-chunked", "bad-chunk", "two-lengths", "short-body"],
)
async def test_a_response_that_breaks_http_is_a_protocol_error_and_its_connection_is_closed(raw):
    async def broken(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        if await read_request(stream, buf) is not None:
            await stream.send(raw)

    async with raw_server(broken) as url:
        settings = provider_settings("a", url + "/v1", None, ("m",))
        async with OpenAIClient(settings) as client:
            with pytest.raises(UpstreamRetryableError) as err:
                await client.list_models()
            assert err.value.extra["transport"] == "RemoteProtocolError"
            stats = client.pool_statistics()
            assert stats is not None and (stats.in_use, stats.connections) == (0, 0)


async def test_an_informational_response_before_the_answer_is_skipped():
    async def continue_first(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        while await read_request(stream, buf) is not None:
            await stream.send(
                b"HTTP/1.1 100 Continue\r\n\r\n" + response(BODY, f"Content-Length: {len(BODY)}")
            )

    async with raw_server(continue_first) as url, _pool(url) as pool:
        assert await _body(pool) == BODY
        assert await _body(pool) == BODY
        _idle_and_free(pool, connections=1)


async def test_an_endless_stream_of_informational_responses_is_a_protocol_error():
    """Each ``100 Continue`` is a small head of its own: the head bound alone never trips, and
    the pool parsed them (burning the event loop) until the call's deadline."""

    async def continue_forever(stream: anyio.abc.SocketStream) -> None:
        buf = bytearray()
        if await read_request(stream, buf) is not None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                while True:
                    await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n" * 8)

    async with raw_server(continue_forever) as url, _pool(url) as pool:
        with anyio.fail_after(30):  # (a hang guard: the old code never stopped)
            with pytest.raises(httpx.RemoteProtocolError, match="informational"):
                await pool.request("GET", "models", [])
        _idle_and_free(pool, connections=0)


async def test_a_port_nobody_listens_on_is_a_connect_error_and_leaves_nothing_held():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with _pool(f"http://127.0.0.1:{port}") as pool:
            with pytest.raises(httpx.ConnectError):
                await pool.request("GET", "models", [])
            _idle_and_free(pool, connections=0)


async def test_a_request_that_fails_at_once_still_lets_the_other_tasks_run():
    """On loopback a refused connect fails inside ``connect`` itself, with nothing to wait for.
    The failing request must still yield to the scheduler once: a caller that tries again at
    once would otherwise hold the loop for good — no other task runs and its own deadline never
    fires (the run loop that would notice it never gets control back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        async with _pool(f"http://127.0.0.1:{port}") as pool, anyio.create_task_group() as tg:
            other_ran = anyio.Event()

            async def other() -> None:
                other_ran.set()

            tg.start_soon(other)
            tries = 0
            while not other_ran.is_set() and tries < 100:  # (100: a hang guard only)
                tries += 1
                with pytest.raises(httpx.ConnectError):
                    await pool.request("GET", "models", [])
            # the other task ran while the first failure was raised (or, trio running a batch
            # of ready tasks in either order, while the second was)
            assert tries <= 2
            _idle_and_free(pool, connections=0)


async def test_a_request_the_socket_takes_only_in_part_still_arrives_whole(monkeypatch):
    """On plain TCP a request is first offered to the socket directly; what a full send buffer
    does not take must follow, in order, under the write bound."""
    body = bytes(range(256)) * 200  # 51,200 bytes: one write (under PIECE_BYTES)
    assert len(body) < PIECE_BYTES
    taken: list[int] = []
    sent_once = anyio.Event()
    got: list[bytes] = []

    async def handler(stream: anyio.abc.SocketStream) -> None:
        # read nothing until the client's first send has come back (a hang guard only)
        with anyio.move_on_after(5):
            await sent_once.wait()
        request = await read_request(stream, bytearray())
        assert request is not None
        got.append(request.partition(b"\r\n\r\n")[2])
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    connect = H11Pool._connect

    async def small_buffers(self: H11Pool) -> _Conn:
        conn = await connect(self)
        assert conn.plain is not None
        conn.plain.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        real = conn.plain

        class Recording:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            def send(self, data: bytes) -> int:
                n = real.send(data)
                taken.append(n)
                sent_once.set()
                return n

        conn.plain = Recording()  # type: ignore[assignment]
        return conn

    monkeypatch.setattr(H11Pool, "_connect", small_buffers)
    async with raw_server(handler) as url, _pool(url) as pool:
        assert await _body(pool, "chat", body) == b"ok"
        _idle_and_free(pool, connections=1)
    assert taken and taken[0] < len(body)  # the direct send was short...
    assert got == [body]  # ...and the rest followed


# ------------------------------------------------------------------ connecting (issue 18, storms)
@contextlib.contextmanager
def _full_listener() -> Iterator[str]:
    """A loopback listener whose accept queue is full (backlog 0, one connection never
    accepted): the kernel drops further SYNs, so a connect to it stays pending. Its base URL."""
    with socket.socket() as listener, socket.socket() as first:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        first.connect(listener.getsockname())
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_new_connection_to_an_ip_address_is_opened_in_the_requesting_task():
    """A storm opens thousands of connections at once: to an IP address (nothing to resolve,
    one address to try) the socket is connected by the task that asks, without the task,
    task group and timers of a happy-eyeballs connect."""
    spawned: list[str] = []
    me = trio.lowlevel.current_task()

    class Spawns(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            if trio.lowlevel.current_task() is me:  # (the task that spawns it)
                spawned.append(task.name)

    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        assert mock.base_url.startswith("http://127.0.0.1:")
        instrument = Spawns()
        trio.lowlevel.add_instrument(instrument)
        try:
            assert b"mock-a" in await _body(pool)
        finally:
            trio.lowlevel.remove_instrument(instrument)
        assert pool.connects == 1
        _idle_and_free(pool, connections=1)
    assert spawned == []


async def test_a_connect_the_kernel_completed_at_once_does_not_wait_for_a_scheduler_round():
    """On loopback the handshake is over when ``connect`` returns (almost always): the pool
    then goes on without registering the socket for a wake-up. Run under a cancelled scope, a
    connect that waited would be cancelled; one of 20 that did not wait is enough (the kernel
    may defer a handshake to its softirq thread on a busy machine)."""
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        made = 0
        for _ in range(20):
            with anyio.CancelScope() as scope:
                scope.cancel()
                conn = await pool._connect()
                made += 1
                await pool._discard(conn)
        assert made >= 1
        assert pool.statistics().connections == 0


class _CountingSocket(socket.socket):
    """A socket that counts its ``connect_ex`` calls and ``SO_ERROR`` reads; with
    ``in_progress``, its second ``connect_ex`` says the handshake still goes on (EALREADY)."""

    connects = 0
    error_reads = 0
    in_progress = False

    def connect_ex(self, address):  # type: ignore[no-untyped-def, override]
        type(self).connects += 1
        if type(self).in_progress and type(self).connects % 2 == 0:
            return errno.EALREADY
        return super().connect_ex(address)

    def getsockopt(self, level, option, *args):  # type: ignore[no-untyped-def, override]
        if (level, option) == (socket.SOL_SOCKET, socket.SO_ERROR):
            type(self).error_reads += 1
        return super().getsockopt(level, option, *args)


async def test_a_connect_the_kernel_completed_at_once_is_confirmed_by_a_second_connect(
    monkeypatch: pytest.MonkeyPatch,
):
    """One system call (a second ``connect``: 0 once established) says the handshake is over,
    where a zero-timeout ``poll`` and an ``SO_ERROR`` read said it before (issue 18, a storm's
    2,000 new upstream connections). Of 20 connects at least one is done at once (the kernel
    may defer a handshake on a busy machine: then the socket is waited for, as before)."""
    polls: list[object] = []
    monkeypatch.setattr(transport.select, "poll", lambda: polls.append(1) or select_poll())
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        monkeypatch.setattr(transport.socket, "socket", _CountingSocket)
        monkeypatch.setattr(_CountingSocket, "connects", 0)
        monkeypatch.setattr(_CountingSocket, "error_reads", 0)
        for _ in range(20):
            conn = await pool._connect()
            await pool._discard(conn)
        connects, reads = _CountingSocket.connects, _CountingSocket.error_reads
        monkeypatch.undo()
        assert pool.statistics().connections == 0
    assert connects == 40
    assert reads < 20
    assert polls == []


async def test_a_connect_still_going_on_at_the_second_connect_waits_for_the_socket(
    monkeypatch: pytest.MonkeyPatch,
):
    """EALREADY from the second ``connect``: the pool waits until the socket is writable and
    reads how the connect went (``SO_ERROR``); the connection then serves its request."""
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        monkeypatch.setattr(transport.socket, "socket", _CountingSocket)
        monkeypatch.setattr(_CountingSocket, "connects", 0)
        monkeypatch.setattr(_CountingSocket, "error_reads", 0)
        monkeypatch.setattr(_CountingSocket, "in_progress", True)
        assert b"mock-a" in await _body(pool)
        reads = _CountingSocket.error_reads
        monkeypatch.undo()
        assert reads == 1
        _idle_and_free(pool, connections=1)


async def test_a_plain_connection_makes_no_stream_object_unless_a_write_needs_one():
    """Its socket is read and written directly; the stream (anyio's and trio's wrappers, a
    ``getpeername``) is made only when the socket does not take a request whole."""
    async with MockUpstream(models=("mock-a",)) as mock, _pool(mock.base_url) as pool:
        for _ in range(2):
            assert b"mock-a" in await _body(pool)
        _idle_and_free(pool, connections=1)
        (conn,) = pool._idle
        assert conn.stream is None
        assert conn.plain is not None


async def test_a_connect_that_gets_no_answer_is_a_connect_timeout_and_closes_its_socket():
    with _full_listener() as url:
        before = _open_fds()
        async with _pool(url, connect_timeout_s=0.2) as pool:
            with pytest.raises(httpx.ConnectTimeout):
                await pool.request("GET", "models", [])
            _idle_and_free(pool, connections=0)
        assert _open_fds() == before


async def test_a_connect_cancelled_by_its_caller_closes_its_socket_and_frees_its_slot():
    with _full_listener() as url:
        before = _open_fds()
        async with _pool(url) as pool:
            with anyio.CancelScope() as scope:
                scope.deadline = anyio.current_time() + 0.1  # the caller's bound, not the pool's
                await pool.request("GET", "models", [])
            assert scope.cancelled_caught
            _idle_and_free(pool, connections=0)
        assert _open_fds() == before


def test_only_an_ip_address_over_plain_http_is_connected_directly():
    assert _pool("http://127.0.0.1:8000/v1")._sockaddr == (socket.AF_INET, ("127.0.0.1", 8000))
    assert _pool("http://[::1]:8000")._sockaddr[0] == socket.AF_INET6  # type: ignore[index]
    assert _pool("http://localhost:8000")._sockaddr is None  # a name: resolved, each address tried
    assert _pool("https://127.0.0.1:8443")._sockaddr is None  # TLS: anyio's stream
