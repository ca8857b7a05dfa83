"""Sessions whose peers go at once are torn down a few at a time (exai.server.endings, issue 18).

A scheduler batch is what trio runs between two looks at its poller (``after_io_wait`` …
``before_io_wait``); its timers and every other task wait for the whole of it. These tests
count, with a trio instrument, how many sessions finish their teardown in one batch when all
their peers close in the same instant — never wall-clock time.
"""

from __future__ import annotations

import base64
import os
from collections import Counter

import pytest
import trio

from exai.server.endings import Endings
from exai.server.session import Session
from tests.helpers import instances_of, live_objects, make_settings, running_daemon

pytestmark = pytest.mark.anyio

SESSIONS = 48
AT_ONCE = 4


class Batches(trio.abc.Instrument):
    """Counts the listener's connection tasks that end in each scheduler batch."""

    def __init__(self) -> None:
        self.batch = 0
        self.ended: Counter[int] = Counter()

    def after_io_wait(self, timeout: float) -> None:
        self.batch += 1

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("Listener._handle_stream"):
            self.ended[self.batch] += 1


async def _open_session(host: str, port: int) -> trio.SocketStream:
    """A raw WebSocket upgrade to /mcp, read up to its 101: the session is running after it."""
    stream = await trio.open_tcp_stream(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            f"GET /mcp HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mcp\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk, "closed during the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return stream


async def _close_at_once(daemon: object, n: int) -> Batches:
    """Open ``n`` sessions, close all their sockets in one step, wait until the daemon has torn
    every one down; the batches it took."""
    host, port = daemon.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)  # type: ignore[attr-defined]
    streams = [await _open_session(host, int(port)) for _ in range(n)]
    with trio.fail_after(30):
        while len(daemon.sessions) < n:  # type: ignore[attr-defined]
            await trio.sleep(0.01)
    batches = Batches()
    trio.lowlevel.add_instrument(batches)
    try:
        for stream in streams:  # no checkpoint in between: every FIN is sent before we yield
            stream.socket.close()
        with trio.fail_after(30):
            while len(daemon.sessions) or sum(batches.ended.values()) < n:  # type: ignore[attr-defined]
                await trio.sleep(0.005)
    finally:
        trio.lowlevel.remove_instrument(batches)
    return batches


async def test_sessions_closing_at_once_end_at_most_at_once_per_batch(tmp_path):
    # Fails without the turns: every session's teardown runs in lockstep with the others', and
    # all of them end in the same batch.
    async with running_daemon(make_settings(tmp_path)) as d:
        d.listener.endings = Endings(AT_ONCE)
        batches = await _close_at_once(d, SESSIONS)
        assert sum(batches.ended.values()) == SESSIONS
        assert max(batches.ended.values()) <= AT_ONCE
        assert d.listener.endings.waited > 0  # (the line did form)


async def test_sessions_closing_at_once_leave_nothing_behind(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        d.listener.endings = endings = Endings(AT_ONCE)
        with instances_of(Session) as sessions:
            await _close_at_once(d, SESSIONS)
        assert sessions.made == SESSIONS
        assert len(d.sessions) == 0
        assert d.admission.open == 0
        assert endings.free == AT_ONCE  # every turn given back
        assert await live_objects(sessions) == []


async def test_a_session_ending_alone_waits_for_no_turn(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        d.listener.endings = endings = Endings(AT_ONCE)
        batches = await _close_at_once(d, 1)
        assert sum(batches.ended.values()) == 1
        assert endings.waited == 0
        assert endings.free == AT_ONCE


async def test_a_turn_is_taken_once_and_given_back_once():
    endings = Endings(1)
    turn = endings.turn()
    await turn.take()
    await turn.take()  # (the reader and the session both take it: one turn)
    assert endings.free == 0
    turn.give_back()
    turn.give_back()
    assert endings.free == 1
    endings.turn().give_back()  # never taken: nothing to give back
    assert endings.free == 1


async def test_a_connection_cancelled_while_in_line_holds_no_turn():
    endings = Endings(1)
    first, second = endings.turn(), endings.turn()
    await first.take()
    with trio.move_on_after(0.01) as scope:  # (the wait is cancelled: its length is no figure)
        await second.take()
    assert scope.cancelled_caught
    assert not second.held
    assert endings.waited == 1
    first.give_back()
    assert endings.free == 1
    second.give_back()  # it holds none: the turn stays free
    assert endings.free == 1


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
async def test_turns_held_for_good_delay_another_connections_teardown_by_the_bound_only():
    # The attack that found it: connections that half-close and then read a trickle keep their
    # writer (so their teardown, so their turn) alive for as long as they like; every other
    # peer that left waited in line behind them, its session, slots and calls kept — for good.
    endings = Endings(2, max_wait_s=5.0)
    held = [endings.turn(), endings.turn()]
    for turn in held:
        await turn.take()  # never given back
    honest = endings.turn()
    started = trio.current_time()
    await honest.take()
    assert trio.current_time() - started == pytest.approx(5.0)  # (virtual time: MockClock)
    assert not honest.held and endings.gave_up == 1 and endings.free == 0
    honest.give_back()  # holds none: gives nothing back
    assert endings.free == 0
    held[0].give_back()
    assert endings.free == 1
    late = endings.turn()
    await late.take()  # a turn free again: taken at once
    assert late.held


# ------------------------------------------------------------------ reads that expect to wait


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def test_a_read_that_waits_first_returns_the_bytes_then_the_end_after_a_turn():
    """``ProgressStream.receive_when_readable`` (the HTTP door's disconnect watch) reads what
    a plain TCP peer sends, and its end of stream only once the connection holds its turn,
    as ``receive_some`` does."""
    from exai.server.outbox import ProgressStream

    client, server = await _tcp_pair()
    stream = ProgressStream(server)
    endings = Endings(1)
    stream.turn = endings.turn()
    async with client, stream:
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read_twice() -> None:
                got.append(bytes(await stream.receive_when_readable(1024)))
                got.append(bytes(await stream.receive_when_readable(1024)))

            nursery.start_soon(read_twice)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # (waiting: nothing read yet)
            await client.send_all(b"ahead")
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"ahead"]
            await client.send_eof()
        assert got == [b"ahead", b""]
        assert stream.turn.held and endings.free == 0
        stream.turn.give_back()


async def test_a_read_that_waits_first_raises_closed_when_its_stream_is_closed():
    from exai.server.outbox import ProgressStream

    client, server = await _tcp_pair()
    stream = ProgressStream(server)
    raised: list[BaseException] = []

    async def read() -> None:
        try:
            await stream.receive_when_readable(1024)
        except trio.ClosedResourceError as exc:
            raised.append(exc)

    async with client, trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await stream.aclose()
    assert len(raised) == 1


async def test_a_read_that_waits_first_reads_what_was_given_back_and_other_streams_as_usual():
    from exai.server.outbox import ProgressStream

    left, right = trio.testing.memory_stream_pair()
    stream = ProgressStream(left)
    stream.unread(b"head")
    assert await stream.receive_when_readable(1024) == b"head"
    await right.send_all(b"body")
    assert await stream.receive_when_readable(1024) == b"body"
