"""The peer's close frame is answered after the answers to what came before it (RFC 6455
§5.5.1: the peer may still read until our close frame; §1.4: what follows its close is
discarded), the calls it started awaited for a short grace (``PEER_CLOSE_GRACE_S``).

trio-websocket answered the close frame at once and closed the stream, so a one-shot client
that sends its request and its close together never got its answer: a text frame and a close
frame in one read went through wsproto, a lone text frame read the short way
(ServerWSConnection) with the close in the next read the same — every answer written after the
close was refused (wsproto allows no data frame after the peer's close) and the session ended.
A call still running past the grace is dropped, as for any client that closes
(tests/server/test_daemon.py::test_closing_the_connection_cancels_its_calls), and a peer that
goes away after its close frame takes its calls with it (its end of stream alone is a
half-close, which changes nothing: tests/server/test_half_close.py).
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from exai.server import session
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import make_settings, raw_upgrade, registry_with, running_daemon, ws_frame

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


def _request(id: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    msg = {"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}}
    return ws_frame(json.dumps(msg).encode())


INIT = _request(0, "initialize", {"protocolVersion": "2025-06-18"})


def _frames(buf: bytes) -> list[tuple[int, bytes]]:
    """Every server frame in ``buf`` (which must end with a whole one): (first byte, payload)."""
    out, at = [], 0
    while at < len(buf):
        assert buf[at + 1] & 0x80 == 0, "a server frame is not masked"
        n, start = buf[at + 1] & 0x7F, at + 2
        if n == 126:
            n, start = struct.unpack("!H", buf[at + 2 : at + 4])[0], at + 4
        elif n == 127:
            n, start = struct.unpack("!Q", buf[at + 2 : at + 10])[0], at + 10
        assert start + n <= len(buf), "a cut frame"
        out.append((buf[at], buf[start : start + n]))
        at = start + n
    return out


async def _connect(url: str) -> trio.SocketStream:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream, status, _, rest = await raw_upgrade(host, int(port))
    assert status == 101 and rest == b""
    return stream


async def _read_to_end(stream: trio.SocketStream) -> list[tuple[int, bytes]]:
    buf = b""
    with trio.fail_after(30):
        while data := await stream.receive_some(65536):
            buf += data
    await stream.aclose()
    return _frames(buf)


def _ids(frames: list[tuple[int, bytes]]) -> list[Any]:
    return [json.loads(p)["id"] for op, p in frames if op == 0x81]


async def test_requests_and_a_close_frame_in_one_read_are_answered_before_the_close(
    tmp_path: Path,
) -> None:
    async with running_daemon(make_settings(tmp_path)) as daemon:
        stream = await _connect(daemon.url)
        version = _request(1, "tools/call", {"name": "version", "arguments": {}})
        await stream.send_all(INIT + version + _request(2, "ping") + CLOSE_1000)
        frames = await _read_to_end(stream)
    assert sorted(_ids(frames)) == [0, 1, 2]  # (calls run at once: in any order)
    assert frames[-1] == (0x88, struct.pack("!H", 1000) + b"bye")  # (the peer's, echoed)


async def test_a_lone_text_frame_and_a_close_frame_in_the_next_read_are_answered_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the request read alone (the short way), the close frame read while its call runs
    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 60.0, raising=False)  # (no race)
    global GATE
    GATE = Gate()
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(INIT)
        await stream.send_all(_request(1, "tools/call", {"name": "gated", "arguments": {}}))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_all(CLOSE_1000)
        await trio.testing.wait_all_tasks_blocked()
        GATE.release.set()
        frames = await _read_to_end(stream)
    assert _ids(frames) == [0, 1]
    assert json.loads(frames[1][1])["result"]["content"][0]["text"] == "released"
    assert frames[-1][0] == 0x88 and len(frames) == 3


async def test_two_requests_in_one_read_are_both_answered(tmp_path: Path) -> None:
    async with running_daemon(make_settings(tmp_path)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(INIT + _request(1, "ping"))
        buf = b""
        with trio.fail_after(30):
            while len(_ids(_whole(buf))) < 2:
                buf += await stream.receive_some(65536)
        await stream.aclose()
    assert _ids(_frames(buf)) == [0, 1]


def _whole(buf: bytes) -> list[tuple[int, bytes]]:
    try:
        return _frames(buf)
    except (AssertionError, IndexError, struct.error):
        return []  # (not whole yet)


async def test_a_ping_and_a_request_in_one_read_get_the_pong_and_the_answer(
    tmp_path: Path,
) -> None:
    async with running_daemon(make_settings(tmp_path)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(ws_frame(b"p1", 0x9) + INIT + _request(1, "ping") + CLOSE_1000)
        frames = await _read_to_end(stream)
    assert frames[0] == (0x8A, b"p1")
    assert _ids(frames) == [0, 1]
    assert frames[-1][0] == 0x88


async def test_frames_after_the_peers_close_frame_are_discarded(tmp_path: Path) -> None:
    async with running_daemon(make_settings(tmp_path)) as daemon:
        stream = await _connect(daemon.url)
        late = ws_frame(b"late", 0x9) + _request(9, "ping")
        await stream.send_all(INIT + CLOSE_1000 + late)
        frames = await _read_to_end(stream)
    assert [op for op, _ in frames] == [0x81, 0x88]
    assert _ids(frames) == [0]


async def test_a_peer_that_closes_and_goes_away_takes_its_calls_with_it(tmp_path: Path) -> None:
    global GATE
    GATE = Gate()
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(INIT)
        await stream.send_all(_request(1, "tools/call", {"name": "gated", "arguments": {}}))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_all(CLOSE_1000)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()  # (gone: its end of stream follows its close frame)
        with trio.fail_after(30):
            while daemon.sessions:
                await trio.sleep(0.01)
        assert GATE.cancelled


async def test_a_call_running_past_the_grace_is_dropped_and_the_close_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 0.0, raising=False)
    global GATE
    GATE = Gate()
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(INIT)
        await stream.send_all(_request(1, "tools/call", {"name": "gated", "arguments": {}}))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_all(CLOSE_1000)  # (and the stream kept open: waiting for our close)
        frames = await _read_to_end(stream)
        with trio.fail_after(30):
            while not GATE.cancelled:
                await trio.sleep(0.01)
    assert [op for op, _ in frames] == [0x81, 0x88]


async def _large(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return ToolResult(text="a" * 400_000)


LARGE = ToolSpec(
    name="large",
    description="Test tool: a large answer.",
    input_schema={"type": "object"},
    handler=_large,
)


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
async def test_a_large_answer_to_a_slow_reader_that_closed_is_written_whole_before_the_close(
    tmp_path: Path,
) -> None:
    # A client that sends its request and its close frame at once, then reads slowly but
    # steadily (4 KiB every 50 ms: a 64 KiB chunk every 0.8 s, far within the send deadline):
    # the answer was cut part-way 1 s after the grace (Session.close's flush bound, then 1 s
    # for the close frame's turn) — a cut frame and no close frame, where the same client
    # without its close frame got the whole answer. (Virtual time: ≈ 5 s of reading.)
    async with running_daemon(make_settings(tmp_path), registry_with(LARGE)) as daemon:
        host, port = daemon.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        stream, status, _, rest = await raw_upgrade(host, int(port), rcvbuf=4096)
        assert status == 101 and rest == b""
        call = _request(1, "tools/call", {"name": "large", "arguments": {}})
        await stream.send_all(INIT + call + CLOSE_1000)
        buf = b""
        with trio.fail_after(300):
            while data := await stream.receive_some(4096):
                buf += data
                await trio.sleep(0.05)
        await stream.aclose()
        assert daemon.stats.rejections["send_timeout"] == 0
    frames = _frames(buf)  # (whole frames only: no cut one)
    assert _ids(frames) == [0, 1]
    assert len(json.loads(frames[1][1])["result"]["content"][0]["text"]) == 400_000
    assert frames[-1] == (0x88, struct.pack("!H", 1000) + b"bye")


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
async def test_a_peer_that_closes_and_reads_nothing_is_given_up_on_at_the_send_deadline(
    tmp_path: Path,
) -> None:
    # the answers after a peer's close frame are written for as long as it reads them: one
    # that reads nothing holds its session until the send deadline, as any client, no longer
    settings = make_settings(tmp_path, send_timeout_s=5.0)
    async with running_daemon(settings, registry_with(LARGE)) as daemon:
        host, port = daemon.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        stream, status, _, rest = await raw_upgrade(host, int(port), rcvbuf=4096)
        assert status == 101 and rest == b""
        call = _request(1, "tools/call", {"name": "large", "arguments": {}})
        await stream.send_all(INIT + call + CLOSE_1000)
        with trio.fail_after(60):
            while daemon.sessions:
                await trio.sleep(0.1)
        assert daemon.stats.rejections["send_timeout"] == 1
        await stream.aclose()


async def test_a_peer_that_sends_on_after_its_close_frame_is_failed_and_its_calls_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing may follow a close frame (§1.4) and wsproto drops it unread: while the answers
    # before it were awaited (or written to a slow reader), a peer could make the daemon read
    # and drop junk at line rate (1 GB in 6.6 s). Past AFTER_CLOSE_BYTES the connection is
    # failed as a peer that went away: its calls dropped, its session ended at once.
    monkeypatch.setattr(session, "PEER_CLOSE_GRACE_S", 600.0, raising=False)  # (no race)
    global GATE
    GATE = Gate()
    async with running_daemon(make_settings(tmp_path), registry_with(GATED)) as daemon:
        stream = await _connect(daemon.url)
        await stream.send_all(INIT)
        await stream.send_all(_request(1, "tools/call", {"name": "gated", "arguments": {}}))
        with trio.fail_after(30):
            await GATE.started.wait()
        await stream.send_all(CLOSE_1000)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(30):
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(64):  # (1 MiB, far past the 64 KiB let through)
                    await stream.send_all(b"\0" * 16384)
            while daemon.sessions:
                await trio.sleep(0.01)
        assert GATE.cancelled
        await stream.aclose()
