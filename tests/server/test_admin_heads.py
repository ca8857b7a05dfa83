"""The admin listener's first request head, read by the MCP listener's rule
(:func:`exai.server.http11.read_first_head`), over real sockets, in-process (the head's bound
made short; nothing here measures time).

Before: a head begun and not whole within ``HEAD_TIMEOUT_S`` was cut without a word (the MCP
listener answers 408 ``head_timeout``, RFC 9110 §15.5.9), a malformed one too (400/431 there),
and empty lines before a request line (RFC 9112 §2.2) made h11 refuse the request.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

import exai.server.admin as admin
from tests.helpers import make_settings, running_daemon

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _short_head_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "HEAD_TIMEOUT_S", 0.3)


async def _exchange(d: Any, data: bytes) -> bytes:
    """Send ``data`` on a new connection to the admin port: all it answers until it closes."""
    host, port = d.admin_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    received = b""
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(data)
        with trio.fail_after(10):
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return received


async def test_an_admin_head_begun_and_not_finished_in_time_is_answered_408(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        answer = await _exchange(d, b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"\r\nconnection: close" in head.lower()
        assert json.loads(body)["error"] == "head_timeout"
        # a connection that sent nothing is still closed without a word
        assert await _exchange(d, b"") == b""
        # and the port answers on
        assert (await _exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
            b"HTTP/1.1 200 "
        )


async def test_a_malformed_admin_head_is_answered_400(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        answer = await _exchange(d, b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert json.loads(body)["error"] == "bad_request"


async def test_empty_lines_before_an_admin_request_are_ignored(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        answer = await _exchange(d, b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        # only empty lines: nothing was sent, closed without a word at the bound
        assert await _exchange(d, b"\r\n\r\n") == b""


async def test_a_connection_past_the_cap_of_waiting_ones_closes_the_oldest(tmp_path, monkeypatch):
    # a flood of connections that send nothing held a task and a descriptor each for the head's
    # bound, without limit (attack on 94d3462: 10 threads in a tight loop); past the cap the
    # oldest connection still waiting for its request is closed, so the newest — a health
    # check sending its request at once — is answered through any such flood
    monkeypatch.setattr(admin, "HEAD_TIMEOUT_S", 60.0)  # (the held ones stay held)
    monkeypatch.setattr(admin, "MAX_WAITING_HEADS", 4, raising=False)
    async with running_daemon(make_settings(tmp_path)) as d:
        host, port = d.admin_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        held = []
        try:
            for _ in range(4):
                held.append(await trio.open_tcp_stream(host, int(port)))
                await held[-1].send_all(b"GET /readyz HTTP/1.1\r\n")  # (half a head)
            for _ in range(2):
                answer = await _exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 200 "), answer
                # one held connection was closed to let it in (which one is the daemon's order
                # of accepting them), without a word, long before its 60 s
                with trio.fail_after(10):
                    closed = await _first_closed(held)
                held.remove(closed)
                await closed.aclose()
                # a new one fills the cap again: the next check closes one more
                held.append(await trio.open_tcp_stream(host, int(port)))
                await held[-1].send_all(b"GET /readyz HTTP/1.1\r\n")
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)


async def _first_closed(streams: list[trio.SocketStream]) -> trio.SocketStream:
    """The first of ``streams`` the peer closes (an end of stream or a reset)."""
    found: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def watch(stream: trio.SocketStream) -> None:
            try:
                data = await stream.receive_some(100)
            except trio.BrokenResourceError:
                data = b""
            assert data == b"", data
            found.append(stream)
            nursery.cancel_scope.cancel()

        for stream in streams:
            nursery.start_soon(watch, stream)
    return found[0]
