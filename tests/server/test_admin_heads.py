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


def _samples(d: Any, name: str) -> dict[tuple[str, str], float]:
    """``name``'s samples by (listener, reason)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(d.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels["listener"], sample.labels["reason"]] = sample.value
    return out


async def test_the_admin_listeners_refusals_are_counted_with_its_label(tmp_path):
    # They were counted nowhere: the 400/408/431 answers, a connection that sent nothing in
    # time, and the 505 below.
    async with running_daemon(make_settings(tmp_path)) as d:
        await _exchange(d, b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # 408
        await _exchange(d, b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n")  # 400
        await _exchange(d, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n")  # 431
        await _exchange(d, b"")  # nothing within the bound
        await _exchange(d, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # 505
        await _exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # (no refusal)
        expected = {
            ("admin", "head_timeout"): 1,
            ("admin", "bad_request"): 3,
            ("admin", "handshake_timeout"): 1,
        }
        assert _samples(d, "exai_connections_rejected_total") == expected
        assert _samples(d, "exai_rejections_total") == expected


async def test_an_admin_connection_closed_for_a_newer_one_is_counted_as_evicted(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(admin, "HEAD_TIMEOUT_S", 60.0)
    monkeypatch.setattr(admin, "MAX_WAITING_HEADS", 2, raising=False)
    async with running_daemon(make_settings(tmp_path)) as d:
        host, port = d.admin_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        held = [await trio.open_tcp_stream(host, int(port)) for _ in range(2)]
        try:
            for stream in held:
                await stream.send_all(b"GET /readyz HTTP/1.1\r\n")  # (half a head)
            answer = await _exchange(d, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            with trio.fail_after(10):
                await _first_closed(held)
            # (before the other is closed: a head cut by its client is a bad_request)
            assert _samples(d, "exai_connections_rejected_total") == {("admin", "evicted"): 1}
            assert _samples(d, "exai_rejections_total") == {("admin", "evicted"): 1}
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)


@pytest.mark.parametrize("method", [b"PRI *", b"HEAD /healthz"])
async def test_an_http2_preface_or_version_gets_505_from_both_listeners(tmp_path, method):
    # the admin port answered the HTTP/2 preface 404 (its path "*" is no route), the MCP port 505
    async with running_daemon(make_settings(tmp_path)) as d:
        data = method + b" HTTP/2.0\r\n\r\nSM\r\n\r\n"
        admin_answer = await _exchange(d, data)
        mcp_host, mcp_port = d.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        mcp_answer = b""
        async with await trio.open_tcp_stream(mcp_host, int(mcp_port)) as stream:
            await stream.send_all(data)
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    mcp_answer += chunk
    for answer in (admin_answer, mcp_answer):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 505 "), answer
        if method == b"PRI *":
            assert json.loads(body) == {
                "error": "bad_request",
                "message": "HTTP/2.0 is not served; use HTTP/1.1",
            }
        else:
            assert body == b""  # (the head of a HEAD's answer only)
    assert _samples(d, "exai_connections_rejected_total") == {
        ("admin", "bad_request"): 1,
        ("mcp", "bad_request"): 1,
    }
