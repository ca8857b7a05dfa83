"""Empty lines before a request line, on the MCP listener's port, over real sockets, in-process.

RFC 9112 §2.2: "a server that is expecting to receive and parse a request-line SHOULD ignore at
least one empty line (CRLF) received prior to the request-line". A client that ends a body with
a stray CRLF (some old ones do, counting it out of ``Content-Length``) sends one before its next
request on a kept connection; h11 refuses it ("no request line received"), and the door answered
400 and closed the connection. They are skipped now — before a connection's first request (the
listener's read) and before a kept connection's next one (the door's read, by hand or by h11) —
as many as the head's bound (64 KiB) allows; skipped, they are no part of a head.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from exai.server.http11 import MAX_HEAD_BYTES, skip_empty_lines
from tests.helpers import make_settings, running_daemon
from tests.httpmcp import envelope, http_url, raw_exchange, request_bytes

pytestmark = pytest.mark.anyio


def _ping(d: Any, id: int = 1) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": "ping", "params": {"_meta": envelope()}}
    headers = [("Content-Type", "application/json"), ("Accept", "application/json")]
    return request_bytes(d.url, json.dumps(msg).encode(), headers=headers)


async def _connect(d: Any) -> trio.SocketStream:
    parts = urlsplit(http_url(d.url))
    return await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)


async def _read_answer(stream: trio.abc.ReceiveStream) -> bytes:
    """One whole response with a Content-Length (head and body)."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            got = await stream.receive_some(65536)
            assert got, data
            data += got
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += await stream.receive_some(65536)
    return data


async def test_a_stray_crlf_after_a_body_on_a_kept_connection_is_ignored(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        async with await _connect(d) as stream:
            # the CRLF in the same write as the body: read past the request with it
            await stream.send_all(_ping(d, 1) + b"\r\n")
            assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")
            await stream.send_all(_ping(d, 2))
            answer = await _read_answer(stream)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
            # on its own, then the request in a later write; CR and LF in writes of their own
            for before in ([b"\r\n"], [b"\r", b"\n"], [b"\n", b"\r\n\r\n"]):
                for part in before:
                    await stream.send_all(part)
                    await trio.sleep(0.05)  # (read on their own, most likely)
                await stream.send_all(_ping(d, 3))
                answer = await _read_answer(stream)
                assert answer.startswith(b"HTTP/1.1 200 "), (before, answer[:300])
        assert d.stats.rejections["bad_request"] == 0


async def test_a_stray_crlf_before_a_request_h11_reads_is_ignored_too(tmp_path):
    # a request the door gives to h11 (chunked: not a plain one), after the empty lines
    async with running_daemon(make_settings(tmp_path)) as d:
        body = json.dumps(
            {"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"_meta": envelope()}}
        ).encode()
        head = (
            b"POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Accept: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunked = head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        async with await _connect(d) as stream:
            await stream.send_all(_ping(d, 1))
            assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")
            await stream.send_all(b"\r\n" + chunked)
            answer = await _read_answer(stream)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


async def test_empty_lines_before_a_connections_first_request_are_ignored(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        status, _, body = await raw_exchange(d.url, b"\r\n\n\r\n" + _ping(d))
        assert status == 200, body
        assert d.stats.rejections["bad_request"] == 0


async def test_empty_lines_before_a_websocket_upgrade_are_ignored(tmp_path):
    # (the bytes read are replayed into the WebSocket door's own h11: without the empty lines)
    async with running_daemon(make_settings(tmp_path)) as d:
        upgrade = (
            b"GET /mcp HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        async with await _connect(d) as stream:
            await stream.send_all(b"\r\n\r\n" + upgrade)
            data = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 101 "), data[:300]


async def test_only_empty_lines_is_a_connection_that_sent_nothing(tmp_path):
    # closed without a word at the handshake bound (handshake_timeout), not answered 408: no
    # head began
    async with running_daemon(make_settings(tmp_path, handshake_timeout_s=0.3)) as d:
        async with await _connect(d) as stream:
            await stream.send_all(b"\r\n\r\n")
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b""
        assert d.stats.rejections["handshake_timeout"] == 1
        assert d.stats.rejections["head_timeout"] == 0


async def test_empty_lines_past_the_heads_bound_are_refused_431(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        status, _, _ = await raw_exchange(d.url, b"\r\n" * (MAX_HEAD_BYTES // 2 + 1) + _ping(d))
        assert status == 431
        async with await _connect(d) as stream:  # on a kept connection too
            await stream.send_all(_ping(d, 1))
            assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")
            await stream.send_all(b"\r\n" * (MAX_HEAD_BYTES // 2 + 1) + _ping(d, 2))
            answer = await _read_answer(stream)
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:300]


async def test_skip_empty_lines_reads_on_until_a_request_line_begins() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await ours.send_all(b"\n\r\nGET / HTTP/1.1\r\n")
    assert await skip_empty_lines(theirs, b"\r") == (b"GET / HTTP/1.1\r\n", 4)
    assert await skip_empty_lines(theirs, b"POST") == (b"POST", 0)
    await ours.send_all(b"\r\n")
    await ours.send_eof()
    assert await skip_empty_lines(theirs, b"\r\n") == (b"", 4)  # (the peer closed)
