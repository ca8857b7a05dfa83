"""A client that half-closes — sends its requests (and, on WebSocket, maybe its close frame),
then shuts its side down (``shutdown(SHUT_WR)``, as ``nc -N`` and one-shot scripts do) — still
reads every answer before the daemon closes.

A FIN says the peer sends nothing more, not that it reads nothing more (RFC 9112 §9.6 for
HTTP; RFC 6455 §7.1.1: a WebSocket client waits for the server's close). The daemon took it for
a peer that had gone: the WebSocket connection's reader aborted (1006) and the session dropped
its calls — after a close frame too, whose answer-after-the-answers (``PEER_CLOSE_GRACE_S``,
tests/server/test_peer_close.py) the FIN then cut short — and the HTTP door cancelled the
request's call and closed without a response. Now the end of stream is answered as a close: the
running calls are given ``PEER_CLOSE_GRACE_S``, their answers written, then the connection
closed (WebSocket: our close frame; HTTP: ``Connection: close``); a call still running then is
dropped as for any client that goes, and a client that has gone fails the first write.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from exai.server import session
from exai.server.outbox import ProgressStream
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import make_settings, raw_upgrade, registry_with, running_daemon, ws_frame
from tests.httpmcp import MODERN, envelope

pytestmark = pytest.mark.anyio

CLOSE_1000 = ws_frame(struct.pack("!H", 1000) + b"bye", 0x8)


class Gate:
    """What the ``gated`` tool waits on, and what it saw."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.release = trio.Event()
        self.cancelled = False


GATE = Gate()


async def _gated(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    GATE.started.set()
    try:
        await GATE.release.wait()
    except trio.Cancelled:
        GATE.cancelled = True
        raise
    return ToolResult(text="released")


GATED = ToolSpec(
    name="gated",
    description="Test tool: answers once released.",
    input_schema={"type": "object"},
    handler=_gated,
)


@pytest.fixture(autouse=True)
def _fresh_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    global GATE
    GATE = Gate()
    # (the grace far longer than any test: the answer comes when the test releases the call)
    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 600.0)


def _request(id: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}
    return ws_frame(json.dumps(msg).encode())


INIT = _request(0, "initialize", {"protocolVersion": "2025-06-18"})
GATED_CALL = _request(1, "tools/call", {"name": "gated", "arguments": {}})


def _frames(buf: bytes) -> list[tuple[int, bytes]]:
    """Every server frame in ``buf`` (which must end with a whole one): (first byte, payload)."""
    out, at = [], 0
    while at < len(buf):
        n, start = buf[at + 1] & 0x7F, at + 2
        if n == 126:
            n, start = struct.unpack("!H", buf[at + 2 : at + 4])[0], at + 4
        elif n == 127:
            n, start = struct.unpack("!Q", buf[at + 2 : at + 10])[0], at + 10
        assert start + n <= len(buf), "a cut frame"
        out.append((buf[at], buf[start : start + n]))
        at = start + n
    return out


async def _read_to_end(stream: trio.SocketStream) -> bytes:
    buf = b""
    with trio.fail_after(30):
        while data := await stream.receive_some(65536):
            buf += data
    await stream.aclose()
    return buf


async def _until_its_end_is_read(daemon: Any) -> None:
    """Until the daemon has read the client's end of stream (or has ended its connection:
    what the old code did)."""

    def stream(door: Any) -> ProgressStream:
        found = getattr(door, "_stream", None)  # (a WebSocket session's)
        return found if isinstance(found, ProgressStream) else door.stream  # (an HTTP one's)

    with trio.fail_after(30):
        while daemon.sessions and not all(stream(d).peer_ended for d in daemon.sessions):
            await trio.sleep(0.005)
    await trio.testing.wait_all_tasks_blocked()


def _port(daemon: Any) -> int:
    return int(daemon.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


# ---------------------------------------------------------------------------- WebSocket


@pytest.mark.parametrize("close_frame", [True, False], ids=["close_frame", "no_close_frame"])
async def test_a_websocket_client_that_half_closes_gets_its_answers_and_our_close(
    tmp_path: Path, close_frame: bool
) -> None:
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        stream, status, _, rest = await raw_upgrade("127.0.0.1", _port(daemon))
        assert status == 101 and rest == b""
        await stream.send_all(INIT + GATED_CALL + (CLOSE_1000 if close_frame else b""))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_eof()  # (shutdown(SHUT_WR): it reads on)
        await _until_its_end_is_read(daemon)
        GATE.release.set()
        frames = _frames(await _read_to_end(stream))
    texts = [json.loads(p) for op, p in frames if op == 0x81]
    assert [t["id"] for t in texts] == [0, 1]
    assert texts[1]["result"]["content"][0]["text"] == "released"
    assert not GATE.cancelled
    op, payload = frames[-1]
    assert op == 0x88 and struct.unpack("!H", payload[:2])[0] == 1000  # (ours, after them)
    if close_frame:
        assert payload[2:] == b"bye"  # (the peer's, echoed)


async def test_a_websocket_call_running_past_the_grace_after_a_fin_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 0.0)
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        stream, status, _, _ = await raw_upgrade("127.0.0.1", _port(daemon))
        assert status == 101
        await stream.send_all(INIT + GATED_CALL)
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_eof()
        frames = _frames(await _read_to_end(stream))
        with trio.fail_after(30):
            while not GATE.cancelled:
                await trio.sleep(0.01)
    assert [op for op, _ in frames] == [0x81, 0x88]  # (initialize's answer, our close)


# ---------------------------------------------------------------------------- HTTP


def _post(
    port: int,
    accept: str,
    id: int = 7,
    method: str = "tools/call",
    params: dict[str, Any] | None = None,
) -> bytes:
    if params is None:
        params = {"name": "gated", "arguments": {}}
    params = {**params, "_meta": envelope(MODERN)}
    body = json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).encode()
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: {accept}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize(
    "accept", ["application/json", "application/json, text/event-stream"], ids=["json", "sse"]
)
async def test_an_http_client_that_half_closes_after_its_post_gets_the_answer(
    tmp_path: Path, accept: str
) -> None:
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        port = _port(daemon)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(_post(port, accept))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_eof()  # (RFC 9112 §9.6: a half-closed client reads the response)
        await _until_its_end_is_read(daemon)
        GATE.release.set()
        response = await _read_to_end(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), response[:300]
    assert b"connection: close" in head.lower()
    assert b'"id":7' in body and b"released" in body
    assert not GATE.cancelled


async def test_an_http_call_running_past_the_grace_after_a_fin_is_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 0.0)
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        port = _port(daemon)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(_post(port, "application/json"))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_eof()
        with trio.fail_after(30):
            while not GATE.cancelled:
                await trio.sleep(0.01)
        await stream.aclose()


def _responses(data: bytes, count: int) -> list[tuple[h11.Response, bytes]]:
    """The responses in ``data`` (a client's h11 reading them in order; at most ``count``)."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    out: list[tuple[h11.Response, bytes]] = []
    while len(out) < count:
        conn.send(h11.Request(method="POST", target="/mcp", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        head, body = None, b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert not isinstance(event, h11.ConnectionClosed) and event is not h11.NEED_DATA
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
        assert head is not None
        out.append((head, body))
        if conn.their_state is not h11.DONE:
            break  # (the server closes after this one)
        conn.start_next_cycle()
    return out


@pytest.mark.parametrize(
    "accept", ["application/json", "application/json, text/event-stream"], ids=["json", "sse"]
)
async def test_http_requests_pipelined_before_a_fin_are_all_answered(
    tmp_path: Path, accept: str
) -> None:
    # A one-shot client pipelines its requests, then half-closes (``printf ... | nc -N``): the
    # daemon had read them all before the end of stream, while the first call ran. Each is
    # answered in order, the last with Connection: close (the old code answered the first,
    # with Connection: close, and dropped the others it had read).
    settings = make_settings(tmp_path, heartbeat_interval_s=0.05)  # (SSE: begun by a keep-alive)
    async with running_daemon(settings, registry_with(GATED)) as daemon:
        port = _port(daemon)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            _post(port, accept)
            + _post(port, accept, 8, "ping", {})
            + _post(port, accept, 9, "tools/call", {"name": "version", "arguments": {}})
        )
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_eof()
        await _until_its_end_is_read(daemon)
        GATE.release.set()
        responses = _responses(await _read_to_end(stream), 3)
    ids = []
    for head, body in responses:
        assert head.status_code == 200
        if dict(head.headers)[b"content-type"].startswith(b"text/event-stream"):
            body = body.rsplit(b"event: message\ndata: ", 1)[1]
        ids.append(json.loads(body)["id"])
    assert ids == [7, 8, 9]
    assert (b"connection", b"close") in responses[-1][0].headers
    assert all((b"connection", b"close") not in head.headers for head, _ in responses[:-1])
    assert not GATE.cancelled


@pytest.mark.parametrize(
    "accept", ["application/json", "application/json, text/event-stream"], ids=["json", "sse"]
)
async def test_a_large_http_answer_being_written_when_the_client_half_closes_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accept: str
) -> None:
    # The grace after a FIN bounds the call, not the write of its answer: a client that
    # half-closes while its (large) answer is written and reads it slowly gets all of it, as
    # on the WebSocket door. The HTTP door cut the body (or the SSE stream) at the grace's
    # end, in the middle (≈ 0.5 MB of 7.4 at a 16 KiB / 5 ms reader with the 1 s grace).
    from benchmarks.load import large_answers as la

    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 0.0)  # (over before the answer is read)
    nbytes = 1024 * 1024
    la.prepare(nbytes)
    settings = make_settings(tmp_path, heartbeat_interval_s=0.05, max_answer_bytes=64 * 1024 * 1024)
    async with running_daemon(settings, registry_with(la.BIG)) as daemon:
        port = _port(daemon)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        arguments = {"bytes": nbytes, "seconds": 0.2}  # (SSE: begun by a keep-alive first)
        await stream.send_all(
            _post(port, accept, 7, "tools/call", {"name": "big", "arguments": arguments})
        )
        received = bytearray()
        with trio.fail_after(30):
            while b'"id":7' not in received:  # (its answer is being written)
                received += await stream.receive_some(4096)
        await stream.send_eof()
        await _until_its_end_is_read(daemon)
        received += await _read_to_end(stream)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    if accept == "application/json":
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert len(body) == length
        msg = json.loads(body)
    else:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/mcp", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(bytes(received))
        conn.receive_data(b"")
        data = b""
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert event is not h11.NEED_DATA and not isinstance(event, h11.ConnectionClosed)
            if isinstance(event, h11.Data):
                data += event.data
        msg = json.loads(data.rsplit(b"event: message\ndata: ", 1)[1])
    assert msg["id"] == 7
    assert msg["result"]["structuredContent"]["content"] == la.prepare(nbytes)[1]
