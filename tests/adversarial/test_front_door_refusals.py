"""Issue 12.10: the front door of a real ``exai serve`` refuses what it cannot serve honestly.

``/readyz`` says not ready while every connection slot is taken (a balancer sends the next
client elsewhere instead of to a 503); an upgrade with two ``Authorization`` headers and an
HTTP/1.0 upgrade are refused with 400 before any token is looked at. A well-behaved client is
served next to each attack.
"""

from __future__ import annotations

import base64
import json
import os
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon
from tests.helpers import ws

pytestmark = pytest.mark.anyio

TOKEN = "t-0123456789abcdef0123456789abcdef"
OTHER = "t-fedcba9876543210fedcba9876543210"


async def raw_request(url: str, head_lines: list[str]) -> tuple[int, dict[str, str], bytes]:
    """Send an upgrade request written by hand; the status, headers and body of the answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            *head_lines,
            f"Host: {parts.hostname}:{parts.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: mcp",
        ]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        with trio.fail_after(SERVED_WITHIN_S):
            while not _complete(buf):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        await stream.aclose()
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for h in header_lines:
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), headers, body


def _complete(buf: bytes) -> bool:
    """The whole answer is in: headers, and the body when one is announced (101 has none)."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    return b" 101 " in head.split(b"\r\n", 1)[0] or len(body) >= _length(head)


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def test_readyz_is_not_ready_while_every_connection_slot_is_taken(tmp_path) -> None:
    async with live_daemon(tmp_path, EXAI_MAX_CONNECTIONS="3") as daemon:
        assert await daemon.ready()
        async with AsyncExitStack() as stack:
            for _ in range(3):
                await stack.enter_async_context(ws(daemon.url))
            with trio.fail_after(SERVED_WITHIN_S):
                while (await daemon.get("/readyz")).status_code != 503:
                    await trio.sleep(0.05)
            body = (await daemon.get("/readyz")).json()
            assert body == {"ready": False, "reason": "max_connections"}
        with trio.fail_after(SERVED_WITHIN_S):
            while not await daemon.ready():  # a slot is free again: ready again
                await trio.sleep(0.05)
        await daemon.assert_serves()
        assert (await daemon.status())["daemon"]["ready"] is True


async def test_an_upgrade_with_two_authorization_headers_is_refused_with_400(tmp_path) -> None:
    async with live_daemon(tmp_path, EXAI_TOKENS=f"alice:{TOKEN}") as daemon:
        for first, second in ((TOKEN, OTHER), (OTHER, TOKEN), (TOKEN, TOKEN)):
            status, _, body = await raw_request(
                daemon.url,
                [
                    "GET /mcp HTTP/1.1",
                    f"Authorization: Bearer {first}",
                    f"Authorization: Bearer {second}",
                ],
            )
            assert status == 400
            assert json.loads(body)["error"] == "bad_request"
            assert "Authorization" in json.loads(body)["message"]
        status, _, _ = await raw_request(
            daemon.url, ["GET /mcp HTTP/1.1", f"Authorization: Bearer {TOKEN}"]
        )
        assert status == 101  # one header is fine
        await daemon.assert_serves(token=TOKEN)


async def test_an_http_1_0_upgrade_is_refused_with_400(tmp_path) -> None:
    async with live_daemon(tmp_path) as daemon:
        status, _, body = await raw_request(daemon.url, ["GET /mcp HTTP/1.0"])
        assert status == 400
        assert "HTTP/1.1" in json.loads(body)["message"]
        status, _, _ = await raw_request(daemon.url, ["GET /mcp HTTP/1.1"])
        assert status == 101
        await daemon.assert_serves()
