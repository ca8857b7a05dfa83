"""A WebSocket session's answers that come in one scheduler round go out in one write (issue 18).

In a storm the answers come back together: 2,000 calls on 40 sessions, up to 128 answered in one
round. Each was written by its own responder — a frame built by wsproto and a ``write`` system
call each, which on loopback also runs the peer's half of the TCP work. While other calls of
its session are in flight, a call's answer now waits in the outbox for the round's end, and the
session writes all of that round's in one ``write`` (``Session._write_round``); a lone call's
answer is still written at once by its own task. What the socket does not take — a slow reader
— is written by the session's writer under the send deadline, as before: the rest of a frame
first, whole and in order. Counted, never timed (``MockClock``).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from exai.server import outbox
from exai.server.app import Daemon
from exai.server.outbox import ProgressStream
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.daemon_tools import BLOB
from tests.helpers import (
    Rpc,
    make_settings,
    raw_upgrade,
    registry_with,
    running_daemon,
    ws,
    ws_frame,
)

pytestmark = pytest.mark.anyio

MOCK_CLOCK = pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)


class _Writes:
    """Every write the daemon's connections hand their sockets (``ProgressStream``: its direct
    writes that took bytes, and its ``send_all`` calls), with their sizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.kept = 0
        nowait = ProgressStream.send_nowait
        keep = getattr(ProgressStream, "keep", None)
        send_all = ProgressStream.send_all

        def spy_nowait(stream: ProgressStream, data: Any) -> int:
            sent: int = nowait(stream, data)
            if sent:
                self.sizes.append(sent)
            return sent

        async def spy_send_all(stream: ProgressStream, data: Any) -> None:
            self.sizes.append(len(data))
            await send_all(stream, data)

        def spy_keep(stream: ProgressStream, rest: Any) -> None:
            self.kept += 1
            assert keep is not None
            keep(stream, rest)

        if keep is not None:  # (not on the code before it)
            monkeypatch.setattr(ProgressStream, "keep", spy_keep)
        monkeypatch.setattr(ProgressStream, "send_nowait", spy_nowait)
        monkeypatch.setattr(ProgressStream, "send_all", spy_send_all)


class _Gate:
    """A ``gate`` tool whose calls all wait for one event, so their answers come in one round."""

    def __init__(self) -> None:
        self.event: trio.Event | None = None
        self.waiting = 0

    async def handler(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        assert self.event is not None
        self.waiting += 1
        await self.event.wait()
        return ToolResult(text="x" * int(args["bytes"]))

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name="gate",
            description="Test tool: answer `bytes` characters once the test opens the gate.",
            input_schema={
                "type": "object",
                "properties": {"bytes": {"type": "integer", "minimum": 0}},
                "required": ["bytes"],
            },
            handler=self.handler,
        )


def _call(i: int, nbytes: int, seconds: float) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": i,
        "method": "tools/call",
        "params": {"name": "blob", "arguments": {"bytes": nbytes, "seconds": seconds}},
    }


@asynccontextmanager
async def _daemon(tmp_path: Path, **settings: Any) -> AsyncIterator[Daemon]:
    # (the round pacer times rounds in real time: a round the machine made long would spread
    # the calls' starts over later rounds; these tests count what the code does)
    settings.setdefault("round_budget_s", math.inf)
    settings.setdefault("session_max_inflight", 64)
    async with running_daemon(make_settings(tmp_path, **settings), registry_with(BLOB)) as d:
        yield d


@MOCK_CLOCK
async def test_the_answers_of_one_round_go_out_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10 calls on one session answered in one scheduler round: their answers go out in one
    # write. Before: one write each (10 writes).
    writes = _Writes(monkeypatch)
    gate = _Gate()
    gate.event = trio.Event()
    settings = make_settings(tmp_path, round_budget_s=math.inf, session_max_inflight=16)
    async with (
        running_daemon(settings, registry_with(BLOB, gate.spec())) as daemon,
        ws(daemon) as conn,
    ):
        rpc = Rpc(conn)
        assert "result" in await rpc.call("version", {})
        for i in range(10):
            await rpc.start_call("gate", {"bytes": 200}, id=100 + i)
        with trio.fail_after(30):
            while gate.waiting < 10:
                await trio.sleep(0.01)
        before = len(writes.sizes)
        gate.event.set()
        answers = [await rpc.response(100 + i) for i in range(10)]
        during = writes.sizes[before:]

    assert all(a["result"]["isError"] is False for a in answers)
    assert len(during) == 1, during


@MOCK_CLOCK
async def test_a_lone_call_s_answer_is_written_at_once_by_its_own_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one call in flight: its answer is not held for the round's end (nothing to join it)
    writes = _Writes(monkeypatch)
    async with _daemon(tmp_path) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        for i in range(3):
            before = len(writes.sizes)
            res = await rpc.call("blob", {"bytes": 200, "seconds": 1.0}, id=10 + i)
            assert res["result"]["isError"] is False
            assert len(writes.sizes) - before == 1
        with pytest.raises(LookupError):
            outbox._ROUND_END.get()  # (no write was left for a round's end)


def _frames(buf: bytes) -> list[tuple[int, bytes]]:
    """The server's whole frames in ``buf`` as (opcode, payload); a cut frame fails."""
    out = []
    at = 0
    while at < len(buf):
        assert buf[at] & 0x80, "a fragmented frame"
        op = buf[at] & 0x0F
        n, head = buf[at + 1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(buf[at + 2 : at + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(buf[at + 2 : at + 10], "big"), 10
        assert at + head + n <= len(buf), "a cut frame"
        out.append((op, bytes(buf[at + head : at + head + n])))
        at += head + n
    return out


INIT = ws_frame(
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
    ).encode()
)


async def _slow_client(daemon: Daemon) -> trio.SocketStream:
    host, port = daemon.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream, status, _, rest = await raw_upgrade(host, int(port), rcvbuf=4096)
    assert status == 101 and rest == b""
    return stream


@MOCK_CLOCK
async def test_what_the_socket_does_not_take_of_a_round_s_write_follows_whole_and_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 answers of ≈ 12 KB in one round to a client with a small receive buffer that reads
    # only later, slowly but steadily: the round's write takes part of them (the socket fills
    # mid-frame); the writer sends the rest of that frame, then the others — every frame whole,
    # each answer once, in the order they were queued; nobody is cut off.
    writes = _Writes(monkeypatch)
    async with _daemon(tmp_path) as daemon:
        stream = await _slow_client(daemon)
        await stream.send_all(
            INIT + b"".join(ws_frame(json.dumps(_call(i, 6000, 1.0)).encode()) for i in range(40))
        )
        await trio.sleep(3.0)  # (answered and written as far as the socket takes them)
        assert any(size > 12_000 for size in writes.sizes)  # (a round's write)
        assert writes.kept >= 1  # (... that the socket took part of)
        buf = b""
        with trio.fail_after(120):
            while len(_whole(buf)) < 41:
                buf += await stream.receive_some(4096)
                await trio.sleep(0.05)
        await stream.aclose()
        assert daemon.stats.rejections["send_timeout"] == 0
    frames = _frames(buf)
    ids = [json.loads(p)["id"] for op, p in frames]
    assert ids[0] == 0 and sorted(ids[1:]) == list(range(40))
    assert all(op == 0x1 for op, _ in frames)
    for _, payload in frames[1:]:
        assert len(json.loads(payload)["result"]["content"][0]["text"]) > 6000


def _whole(buf: bytes) -> list[int]:
    """Offsets of the whole frames at the start of ``buf``."""
    out = []
    at = 0
    while at + 2 <= len(buf):
        n, head = buf[at + 1] & 0x7F, 2
        if n == 126:
            if at + 4 > len(buf):
                break
            n, head = int.from_bytes(buf[at + 2 : at + 4], "big"), 4
        elif n == 127:
            if at + 10 > len(buf):
                break
            n, head = int.from_bytes(buf[at + 2 : at + 10], "big"), 10
        if at + head + n > len(buf):
            break
        out.append(at)
        at += head + n
    return out


@MOCK_CLOCK
async def test_a_reader_that_stops_in_the_middle_of_a_round_s_write_is_cut_off_at_the_deadline(
    tmp_path: Path,
) -> None:
    # the same answers to a client that never reads: the rest of the round's write waits in
    # the writer under the send deadline, which closes the session (1008) as for any answer
    async with _daemon(tmp_path, send_timeout_s=5.0) as daemon:
        stream = await _slow_client(daemon)
        await stream.send_all(
            INIT + b"".join(ws_frame(json.dumps(_call(i, 6000, 1.0)).encode()) for i in range(40))
        )
        with trio.fail_after(60):
            while not daemon.stats.rejections["send_timeout"]:
                await trio.sleep(0.1)
            while daemon.sessions:
                await trio.sleep(0.1)
        assert daemon.stats.rejections["send_timeout"] == 1
        await stream.aclose()


async def test_what_the_stream_keeps_goes_first_and_nothing_goes_directly_meanwhile() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        stream = ProgressStream(trio.SocketStream(a))
        peer = trio.SocketStream(b)
        stream.keep(memoryview(b"0123456789")[4:])
        assert stream.kept
        assert stream.send_nowait(b"xyz") == 0  # (the kept bytes go first)
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.send_all(b"abc")  # cancelled before it began: keeps them, cuts nothing
        assert stream.kept and not stream.cut
        await stream.send_all(b"abc")
        assert not stream.kept
        got = b""
        while len(got) < 9:
            got += await peer.receive_some(64)
        assert got == b"456789abc"
        await stream.send_all(b"")  # (nothing kept: nothing written)
        assert stream.send_nowait(b"z") == 1
        assert await peer.receive_some(64) == b"z"


