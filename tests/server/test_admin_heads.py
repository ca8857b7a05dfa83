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


async def test_admin_connections_past_the_cap_are_closed_at_once(tmp_path, monkeypatch):
    # a flood of connections that send nothing held a task and a descriptor each for the head's
    # bound, without limit (attack on 94d3462: 10 threads in a tight loop); past the cap a
    # connection is closed as it is accepted, and the port answers again once one is gone
    monkeypatch.setattr(admin, "HEAD_TIMEOUT_S", 60.0)  # (the held ones stay held)
    monkeypatch.setattr(admin, "MAX_CONNECTIONS", 4, raising=False)
    async with running_daemon(make_settings(tmp_path)) as d:
        host, port = d.admin_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        held = [await trio.open_tcp_stream(host, int(port)) for _ in range(4)]
        try:
            # the fifth: closed without an answer, long before the held ones' 60 s
            assert await _exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        finally:
            await held[0].aclose()
        # one gone: the port answers again (the daemon may take a moment to see the close)
        with trio.fail_after(10):
            while not (
                answer := await _exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            ).startswith(b"HTTP/1.1 200 "):
                assert answer == b"", answer
                await trio.sleep(0.01)
        for stream in held[1:]:
            await stream.aclose()
