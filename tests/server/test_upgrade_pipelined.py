"""Frames a client sends right behind its WebSocket upgrade request — in the same write, or in
the next one before it has read the ``101`` — are read as the connection's first frames.

RFC 6455 lets a client send frames once it has sent the handshake; a one-shot client writes the
upgrade and its first requests at once. The listener reads the head (and, in the same reads,
what follows it) before it knows the door, then gives it back to trio-websocket: wsproto's
handshake parsed the head with h11, which kept every byte past it to itself, and the WebSocket
connection the ``101`` made started without them — the frames were lost, on the MCP door and
the old op protocol's door alike, and the client waited for answers that never came. The bytes
past the head are now held back until the upgrade is answered
(:meth:`exai.server.outbox.ProgressStream.hold`).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import make_settings, running_daemon, ws_frame

pytestmark = pytest.mark.anyio


def _request(id: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}
    return ws_frame(json.dumps(msg).encode())


INIT = _request(0, "initialize", {"protocolVersion": "2025-06-18"})
CALL = _request(1, "tools/call", {"name": "version", "arguments": {}})


def _upgrade(port: int, path: str = "/mcp") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mcp\r\n\r\n"
    ).encode()


def _texts(buf: bytes) -> list[dict[str, Any]] | None:
    """The text frames after the ``101`` head in ``buf``, or ``None`` while one is cut."""
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    out, at = [], 0
    while at < len(body):
        if len(body) < at + 4:
            return None
        n, start = body[at + 1] & 0x7F, at + 2
        if n == 126:
            n, start = struct.unpack("!H", body[at + 2 : at + 4])[0], at + 4
        elif n == 127:
            n, start = struct.unpack("!Q", body[at + 2 : at + 10])[0], at + 10
        if start + n > len(body):
            return None
        if body[at] == 0x81:
            out.append(json.loads(body[start : start + n]))
        at = start + n
    return out


async def _answers(stream: trio.SocketStream, count: int) -> list[dict[str, Any]]:
    """Read until ``count`` text frames came (10 s: the old code never sent them)."""
    buf = b""
    with trio.fail_after(10):
        while True:
            got = _texts(buf) if b"\r\n\r\n" in buf else None
            if got is not None and len(got) >= count:
                return got
            data = await stream.receive_some(65536)
            assert data, f"closed after {buf[:300]!r}"
            buf += data


def _port(daemon: Any) -> int:
    return int(daemon.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


async def test_an_initialize_and_a_call_sent_with_the_upgrade_are_answered(
    tmp_path: Path,
) -> None:
    async with running_daemon(make_settings(tmp_path)) as daemon:
        port = _port(daemon)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(_upgrade(port) + INIT + CALL)  # (one write)
        answers = await _answers(stream, 2)
        await stream.aclose()
    assert sorted(a["id"] for a in answers) == [0, 1]
    call = next(a for a in answers if a["id"] == 1)
    assert call["result"]["isError"] is False


async def test_frames_sent_right_after_the_upgrade_before_its_answer_are_answered(
    tmp_path: Path,
) -> None:
    # the upgrade, then the frames in the next write, before the 101 is read: they may reach
    # the daemon before it answers the upgrade (read while wsproto still held the handshake)
    async with running_daemon(make_settings(tmp_path)) as daemon:
        port = _port(daemon)
        for _ in range(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(_upgrade(port))
            await stream.send_all(INIT)
            await stream.send_all(CALL)
            answers = await _answers(stream, 2)
            await stream.aclose()
            assert sorted(a["id"] for a in answers) == [0, 1]


async def test_the_old_op_protocols_hello_sent_with_the_upgrade_is_answered(
    tmp_path: Path,
) -> None:
    async with running_daemon(make_settings(tmp_path)) as daemon:
        port = _port(daemon)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        hello = ws_frame(json.dumps({"op": "hello", "session_id": "s1"}).encode())
        await stream.send_all(_upgrade(port, "/") + hello)
        answers = await _answers(stream, 1)
        await stream.aclose()
    assert answers[0]["op"] == "hello_ack" and answers[0]["ok"] is True
