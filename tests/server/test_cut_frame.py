"""Nothing is written after a frame whose write was cut part-way.

Found by the attack pass on the writer that runs only while something is queued (6421846); it is
older than that. A write cut in the middle of its frame — the send deadline passing for a peer
that reads too slowly (``send_timeout_s`` with no 64 KiB chunk taken), or a cancellation — left
the connection writable, and the close frame (1008, or the listener's 1000) was written after
the cut frame: a client that went on reading took the close frame's bytes for the rest of the
answer's text (1007, invalid UTF-8, at the client) instead of seeing the connection end. Now
every write after a cut one fails as closed, so the connection ends with the cut frame.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from exai.server.outbox import ProgressStream, send_pieces
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import make_settings, raw_upgrade, registry_with, running_daemon, ws_frame

pytestmark = pytest.mark.anyio


async def _big(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return ToolResult(text="a" * 400_000)


BIG = ToolSpec(
    name="big",
    description="Test tool: a large answer.",
    input_schema={"type": "object"},
    handler=_big,
)


async def _connect(url: str) -> trio.SocketStream:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream, status, _, rest = await raw_upgrade(host, int(port), rcvbuf=4096)
    assert status == 101 and rest == b""
    return stream


def _request(id: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}
    return ws_frame(json.dumps(msg).encode())


def _split_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole server frames at the start of ``data``, and what follows them."""
    frames = []
    while len(data) >= 2:
        n, start = data[1] & 0x7F, 2
        if n == 126:
            n, start = struct.unpack("!H", data[2:4])[0], 4
        elif n == 127:
            n, start = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < start + n:
            break
        frames.append((data[0], data[start : start + n]))
        data = data[start + n :]
    return frames, data


async def test_a_slow_reader_cut_at_the_send_deadline_gets_nothing_after_the_cut_frame(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, send_timeout_s=0.5)
    async with running_daemon(settings, registry_with(BIG)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(_request(0, "initialize", {"protocolVersion": "2025-06-18"}))
        await stream.send_all(_request(1, "tools/call", {"name": "big", "arguments": {}}))
        # read far slower than one 64 KiB chunk per send timeout, and on to the end
        data = b""
        with trio.fail_after(60):
            while True:
                got = await stream.receive_some(2048)
                if not got:
                    break
                data += got
                await trio.sleep(0.05)
        assert daemon.stats.rejections["send_timeout"] == 1
        await stream.aclose()

    frames, rest = _split_frames(data)
    assert [op for op, _ in frames] == [0x81]  # (the initialize answer)
    # the answer's frame, cut: its header, then only bytes of the answer's text (JSON, ASCII)
    assert rest[0] == 0x81 and rest[1] == 127
    body = rest[10:]
    assert body.startswith(b'{"jsonrpc"')
    assert body.isascii(), body[-40:]


async def test_a_write_after_a_cut_one_fails_as_closed() -> None:
    left, _right = trio.testing.lockstep_stream_pair()
    stream = ProgressStream(left)
    with trio.move_on_after(0.01):  # (nobody reads: the write is cut part-way)
        await stream.send_all(b"x" * 1_000_000)
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"y")
    assert stream.send_nowait(b"y") == 0
    # a write cancelled before it began cuts nothing
    fresh = ProgressStream(trio.testing.memory_stream_pair()[0])
    with trio.CancelScope() as scope:
        scope.cancel()
        await fresh.send_all(b"z")
    await fresh.send_all(b"z")


async def test_a_message_written_in_pieces_cancelled_between_two_pieces_cuts_the_stream() -> None:
    # A large answer is written a piece a send_all (exai.server.outbox.send_pieces). A cancel
    # that lands between two pieces (at the next piece's start: "a write cancelled before it
    # began cuts nothing") left the stream writable in the middle of the message's frame, so
    # the close frame that follows (the session's, the listener's) went out as part of it.
    left, _right = trio.testing.memory_stream_pair()
    stream = ProgressStream(left)
    written: list[bytes] = []

    with trio.CancelScope() as scope:

        async def sent() -> None:
            written.append(bytes(left.send_stream.get_data_nowait()))
            scope.cancel()  # (after the head and the first piece went whole)

        left.send_stream.send_all_hook = sent
        await send_pieces(stream, b"HEAD", [b"one", b"two", b"three"], b"TAIL")
    assert scope.cancelled_caught and written == [b"HEADone"]
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"close frame")
    assert stream.send_nowait(b"close frame") == 0
    # a message cancelled before its first piece went cuts nothing
    fresh = ProgressStream(trio.testing.memory_stream_pair()[0])
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_pieces(fresh, b"HEAD", [b"one", b"two"])
    await fresh.send_all(b"z")
