"""A session closed by another task (drain's hand-over, a revoked token, the last sweep) while
answers are still being written, and the peer sends one more message meanwhile (a client goes
on sending while the daemon drains).

Found by the attack pass on the writer that runs only while something is queued (6421846,
251c723); it is older than them. ``Session.close`` sets ``closing_reason`` first, then waits (up
to 1 s) for what is queued to be written. The session's reader, handed a message meanwhile, saw
``closing_reason`` and returned, and the session's nursery was cancelled: the answer being
written was cut in the middle of its frame, those queued behind it were lost uncounted, and the
close frame was then written after the cut frame — the client read the close frame's bytes as
the rest of the answer's text (1007, invalid UTF-8, or a garbled frame). 150 clients sending
calls through a drain: 2-6 of them got 1007, 40-64 answers queued before the close were lost.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from exai.server.session import Session
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import make_settings, raw_upgrade, registry_with, running_daemon, ws_frame

pytestmark = pytest.mark.anyio

ANSWER_CHARS = 400_000


async def _big(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return ToolResult(text=str(args["fill"]) * ANSWER_CHARS)


BIG = ToolSpec(
    name="big",
    description="Test tool: a large answer.",
    input_schema={"type": "object"},
    handler=_big,
)


async def _connect(url: str) -> trio.SocketStream:
    """A WebSocket client over a TCP socket with a small receive buffer (the server's writes
    block as soon as the client stops reading), its upgrade answered."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream, status, _, rest = await raw_upgrade(host, int(port), rcvbuf=4096)
    assert status == 101 and rest == b""
    return stream


def _frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """The whole server frames at the start of ``buf`` (removed from it): (opcode, payload)."""
    out = []
    while len(buf) >= 2:
        assert buf[1] & 0x80 == 0, "a server frame is not masked"
        n, start = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, start = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, start = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < start + n:
            break
        out.append((buf[0], bytes(buf[start : start + n])))
        del buf[: start + n]
    return out


def _request(id: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}
    return ws_frame(json.dumps(msg).encode())


async def test_a_close_from_another_task_writes_every_queued_answer_whole_first(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, send_timeout_s=30.0)
    async with running_daemon(settings, registry_with(BIG)) as daemon:
        stream = await _connect(daemon.url)
        buf = bytearray()
        await stream.send_all(_request(0, "initialize", {"protocolVersion": "2025-06-18"}))
        while not _frames(buf):
            buf += await stream.receive_some(65536)
        [session] = list(daemon.sessions)
        assert isinstance(session, Session)
        # two large answers: the first written by its responder, blocked in the middle of its
        # frame (the client reads nothing), the second queued behind it for the writer
        for i, fill in ((1, "a"), (2, "b")):
            await stream.send_all(
                _request(i, "tools/call", {"name": "big", "arguments": {"fill": fill}})
            )
        with trio.fail_after(30):
            while len(session.core.outbox) < 2:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        # closed by another task, as the drain's hand-over closes it; the client sends one
        # more message meanwhile (its reader hands it on and sees the session closing)
        assert daemon.conn_nursery is not None
        daemon.conn_nursery.start_soon(session.close, 1012, "exai is restarting; reconnect")
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(_request(3, "ping"))
        await trio.testing.wait_all_tasks_blocked()
        got: list[tuple[int, bytes]] = []
        with trio.fail_after(30):
            while not got or got[-1][0] != 0x88:
                data = await stream.receive_some(65536)
                if not data:
                    break
                buf += data
                got += _frames(buf)
        await stream.aclose()

    assert buf == b""  # (nothing cut: every frame whole)
    # (the two calls run at once: either answer may come first)
    answers = {m["id"]: m for m in (json.loads(p) for op, p in got if op == 0x81)}
    assert sorted(answers) == [1, 2]
    assert answers[1]["result"]["content"][0]["text"].startswith("a" * ANSWER_CHARS)
    assert answers[2]["result"]["content"][0]["text"].startswith("b" * ANSWER_CHARS)
    assert got[-1][0] == 0x88 and struct.unpack("!H", got[-1][1][:2])[0] == 1012
