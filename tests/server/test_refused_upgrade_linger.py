"""A refused WebSocket upgrade with bytes behind it gets its refusal, every time.

A client may send its first frames (or anything) right behind its upgrade request. When the
daemon refuses the upgrade (401 bad token, 403 foreign Origin, 503 over a cap, 400 from
wsproto) those bytes are unread; closing the socket with them unread makes the kernel send a
reset instead of a FIN, and a refusal still in the daemon's send queue is dropped with it: the
client never reads why. The daemon now says it is done (FIN) and reads what the client is still
sending, within the bounds every refusal lingers in (``http11.linger``: ``LINGER_S``,
``LINGER_BYTES``), before it closes — as the HTTP door and the listener's own refusals do.
"""

from __future__ import annotations

import base64
import os
import socket
from urllib.parse import urlsplit

import pytest
import trio

from exai.config import Secret
from tests.helpers import make_settings, running_daemon, ws

pytestmark = pytest.mark.anyio

#: only turns a hang into a failure
HANG_GUARD_S = 30.0
TOKEN = "alice-token-1111"
#: what follows the upgrade request: a masked binary frame of 100 KiB (its mask bit and
#: 64-bit length), not a byte of which the daemon reads before it refuses
BEHIND = b"\x82\xff" + (100 * 1024).to_bytes(8, "big") + b"\0" * 4 + os.urandom(100 * 1024)
ROUNDS = 50


def _upgrade(port: int, *, token: str, origin: str | None = None, key: bool = True) -> bytes:
    lines = [
        "GET /mcp HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Authorization: Bearer {token}",
    ]
    if key:
        lines.append(f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _refused(port: int, request: bytes) -> bytes:
    """Send ``request`` and :data:`BEHIND` at once, half-close, and read to the end: the bytes
    read (the test fails on a reset)."""
    reply = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            await stream.send_all(request + BEHIND)
            stream.socket.shutdown(socket.SHUT_WR)
            while chunk := await stream.receive_some(64 * 1024):
                reply += chunk
        except trio.BrokenResourceError as exc:
            pytest.fail(f"the connection was reset ({exc!r}) after {reply[:60]!r}")
    return reply


@pytest.mark.parametrize(
    ("case", "status"),
    [("bad_token", b"401"), ("foreign_origin", b"403"), ("no_key", b"400")],
)
async def test_a_refused_upgrade_with_frames_behind_it_gets_its_refusal_every_time(
    tmp_path, case: str, status: bytes
) -> None:
    settings = make_settings(tmp_path, tokens=Secret(f"alice:{TOKEN}"))
    async with running_daemon(settings) as d:
        port = urlsplit(d.url).port or 0
        with trio.fail_after(HANG_GUARD_S):
            for _ in range(ROUNDS):
                request = _upgrade(
                    port,
                    token="wrong-token" if case == "bad_token" else TOKEN,
                    origin="https://evil.example" if case == "foreign_origin" else None,
                    key=case != "no_key",
                )
                reply = await _refused(port, request)
                assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:200]


async def test_an_upgrade_refused_for_the_address_cap_with_frames_behind_it_gets_its_503(
    tmp_path,
) -> None:
    settings = make_settings(tmp_path, tokens=Secret(f"alice:{TOKEN}"), max_connections_per_ip=1)
    async with running_daemon(settings) as d:
        port = urlsplit(d.url).port or 0
        async with ws(d, token=TOKEN):  # the address's one connection, held
            with trio.fail_after(HANG_GUARD_S):
                for _ in range(ROUNDS):
                    reply = await _refused(port, _upgrade(port, token=TOKEN))
                    assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
                    assert b"max_connections_per_ip" in reply


async def test_a_refused_upgrade_reads_at_most_its_bound_of_what_follows(tmp_path) -> None:
    """A client that keeps sending is cut off after ``LINGER_BYTES``: the refusal still came
    first, and the daemon did not read on for ever."""
    settings = make_settings(tmp_path, tokens=Secret(f"alice:{TOKEN}"))
    async with running_daemon(settings) as d:
        port = urlsplit(d.url).port or 0
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        reply = b""
        async with stream:
            with trio.fail_after(HANG_GUARD_S):
                await stream.send_all(_upgrade(port, token="wrong-token"))

                async def keep_sending() -> None:
                    chunk = b"\0" * 65536
                    try:
                        while True:
                            await stream.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_sending)
                    try:
                        while chunk := await stream.receive_some(64 * 1024):
                            reply += chunk
                    except trio.BrokenResourceError:
                        pass  # (cut off after the bound: a reset, once the refusal was read)
                    nursery.cancel_scope.cancel()
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
