"""The WebSocket door: one MCP session per WebSocket connection, over the session core.

Everything that turns messages into executions — admission, slots, deadlines, exactly-once,
progress, cancellation, audit — is the :class:`~exai.server.core.SessionCore`'s. This module
only moves frames: a reader (this task) hands each text frame to the core, a writer sends what
the core queued, and the connection is closed when the peer goes, the core asks for it, or the
daemon drains. When the peer goes, the teardown waits for the connection's turn
(:mod:`exai.server.endings`: a few at a time when thousands go at once).

Writing:
    answers and notifications wait in the core's bounded :class:`~exai.server.outbox.Outbox` (count
    and bytes); an answer waits for room (back-pressure on the slow client's own calls), progress is
    dropped and counted when there is none. An answer put while nothing is queued is written by the
    responder's own task (:attr:`~exai.server.outbox.Outbox.direct`: no hand-off to the writer task,
    which sends whatever queues meanwhile after it, in order). What is queued for the writer —
    progress, mostly — is first handed to a plain TCP socket at once by the task that queued it
    (:meth:`~exai.server.wsconn.ServerConnection.send_texts_now`: no task started for it, issue 18,
    part 17a); the writer task sends only what that does not (the rest of a frame the socket took
    part of, kept by the stream and sent first; what another write holds back). The writer task runs
    only while something is queued for it (:attr:`~exai.server.outbox.Outbox.wake` starts it, it
    ends when the queue is empty): an idle session holds no task for it (memory per idle session). A
    write that makes no progress for ``send_timeout_s`` — the writer's, a direct one, or a pong
    written by the connection's reader — closes the connection with 1008 and everything the session
    held is freed. A message of at most 64 KiB on plain TCP — a direct answer, or what the writer
    sends (mostly progress) — is handed to the non-blocking socket at once when no other write holds
    the connection (:meth:`~exai.server.wsconn.ServerConnection.send_text`; what the socket does not
    take goes the usual way, under the same deadline; a direct answer's deadline scope is made only
    then).

Closing:
    the peer's close frame (RFC 6455: it sends nothing more, but reads until ours) — or its end
    of stream (a FIN: a half-closed client sends nothing more, but may read on) — is answered
    once the messages read before it are: the calls they started are awaited for at most
    :data:`PEER_CLOSE_GRACE_S` (a one-shot client sends its request and its close at once),
    then what is queued is written — for as long as the peer reads it, under the send
    deadline as any answer — and the close frame echoed; a call still running is dropped
    as for any client that goes (:meth:`Session._answer_close`).

Error handling:
    A frame over ``max_frame_bytes`` closes with 1009 and invalid UTF-8 with 1007 (both done by
    wsproto/trio-websocket), a binary frame closes with 1003. Every other bad input gets a
    JSON-RPC error and the session stays up. Over the message rate a request gets
    ``data.reason = "rate_limited"``; sustained abuse — more than ``session_abuse_limit``
    rate-limited messages beyond a tenth of the rate — closes the connection with 1008.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from exai.config import Settings
from exai.logs import log_event
from exai.server.auth import Identity
from exai.server.budget import InboundMeter
from exai.server.core import SessionCore, SessionShared
from exai.server.outbox import CHUNK_BYTES, ProgressStream, at_round_end
from exai.server.pieces import Pieces, Text
from exai.server.wsconn import ServerConnection, message_bytes

__all__ = ["PEER_CLOSE_GRACE_S", "Session", "SessionShared"]

#: the most bytes of frames the write at a scheduler round's end hands the socket at once
ROUND_WRITE_BYTES = CHUNK_BYTES

#: how long the answers of calls running when the peer's close frame arrives are awaited before
#: it is answered (and those calls dropped): long enough for a one-shot client's quick call
#: (``initialize``, ``tools/list``, ``version``), short against a client's close handshake
PEER_CLOSE_GRACE_S = 1.0


class Session:
    """Serve one WebSocket connection until it closes or the daemon stops.

    Args:
        shared: what every session of the daemon shares.
        settings: the daemon's settings when the connection was admitted.
        conn: the accepted WebSocket connection.
        ip: the client's address.
        identity: who the connection authenticated as.
        stream: the connection's transport wrapped in a :class:`ProgressStream`, so the writer's
            deadline follows its progress (``None`` in tests that build sessions by hand).
        core: a ready-made core (the old op protocol's door builds its own, with its encoder);
            default: a JSON-RPC one.
    """

    def __init__(
        self,
        shared: SessionShared,
        settings: Settings,
        conn: WebSocketConnection,
        ip: str,
        identity: Identity,
        stream: ProgressStream | None = None,
        *,
        core: Callable[[Callable[[int, str], Awaitable[None]]], SessionCore] | None = None,
    ) -> None:
        self.shared = shared
        self.settings = settings
        self.conn = conn
        self.ip = ip
        self.identity = identity
        if core is None:
            self.core = SessionCore(shared, settings, ip, identity, close=self.close)
        else:
            self.core = core(self.close)
        self.id = self.core.id
        self._write_scope: trio.CancelScope | None = None
        self._stream = stream
        if stream is not None:
            stream.on_progress = self._write_progress
        self.meter = InboundMeter(shared.budget)
        if isinstance(conn, ServerConnection):
            conn.meter = self.meter
            # (a pong is written by the connection's reader, under the same deadline)
            conn.pong_timeout_s = settings.send_timeout_s
            conn.on_pong_stalled = self._pong_stalled
            # (the peer's close frame is answered once what came before it is: _answer_close)
            conn.answer_close_later = True
        self.nursery: trio.Nursery | None = None
        # an answer put while nothing is queued is written by its own task (no hand-off), a
        # small one straight to a plain TCP socket when it can (ServerConnection.send_text)
        self.core.outbox.direct = self._direct_write
        # the writer task runs only while something is queued for it: an idle session holds no
        # task, frames, scope or last message for it (≈ 3.5 KB of each of 10,000 idle sessions)
        self.core.outbox.wake = self._wake_writer
        self._writing = False
        self._send_text = conn.send_text if isinstance(conn, ServerConnection) else None
        # while several calls run, their answers are written at the scheduler round's end,
        # those of one round together (_defer, _write_round)
        if isinstance(conn, ServerConnection) and stream is not None and stream.plain:
            self.core.outbox.defer = self._defer
        #: what is queued for the writer is handed to a plain TCP socket at once instead
        #: (_wake_writer)
        self._write_now = isinstance(conn, ServerConnection) and stream is not None and stream.plain
        #: a write at the round's end is due (at_round_end): the writer is not woken meanwhile
        self._round_due = False
        #: messages at the head of the outbox whose frames the socket took part of: the
        #: stream keeps the rest, which the writer sends before anything else
        self._kept = 0

    @property
    def closing_reason(self) -> tuple[int, str] | None:
        return self.core.closing_reason

    # ---------------------------------------------------------------- running
    async def run(self, handle: Callable[[str], Awaitable[Any]] | None = None) -> None:
        """Serve until the peer goes away; on exit every call of this session is detached and
        every byte it had charged is given back.

        Args:
            handle: what to do with each text frame (default: the core's JSON-RPC handling).
        """
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.core.nursery = nursery
                if self.core.outbox.next() is not None:
                    self._wake_writer()  # (queued before the session ran)
                try:
                    await self._reader(handle or self.core.handle_text)
                finally:
                    # Detach before the responders wind down: a call nobody else watches is
                    # cancelled now, even one still waiting (shielded) for its slots.
                    self.core.detach_all()
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            self.nursery = None
            self.core.release_all()
            self.meter.release_all()
            # (with the core's links, see release_all: the session is not a reference cycle)
            self.core.outbox.wake = None
            self.core.outbox.defer = None
            if self._stream is not None:
                self._stream.on_progress = None
            if isinstance(self.conn, ServerConnection):
                self.conn.on_pong_stalled = None

    async def hand_over(self) -> None:
        """Draining: close this session (1012, service restart) once every call admitted on it
        has been answered, so its client reconnects — through the balancer, to a daemon that
        is not stopping — and re-sends what was left unanswered."""
        ledger = self.core.ledger
        await self.shared.changes.wait_for(lambda: ledger.count == 0)
        if self.closing_reason is None:
            # what is queued is written as long as the peer reads it (each write under the
            # send deadline; the drain's own bound ends the rest): a 1 s bound cut a large
            # answer to a slow but steady reader in the middle of its frame
            await self.close(1012, "exai is restarting; reconnect", flush_s=math.inf)

    #: set once a :meth:`close` has ended (made by it: an idle session holds no event)
    _close_done: trio.Event | None = None

    async def close(self, code: int, reason: str, *, flush_s: float = 1.0) -> None:
        """Flush what is queued, then close with ``code`` (bounded: a stuck peer gets 1 s).
        The session's reader, which stops once ``closing_reason`` is set, waits for it when
        another task closes (:meth:`_reader`).

        ``flush_s``: how long what is queued may take to be written — ``math.inf`` for the
        answer to the peer's close frame: then only the writes' own deadline bounds it
        (``send_timeout_s`` without progress closes with 1008, dropping the rest), so a peer
        that reads slowly but steadily gets the answers it waits for whole."""
        done = self._close_done = trio.Event()
        try:
            self.core.closing_reason = (code, reason)
            self.core.outbox.close(drop=False)
            with trio.move_on_after(flush_s):
                await self.core.outbox.flushed()
            with trio.move_on_after(1.0):
                await self.conn.aclose(code, reason)
        finally:
            done.set()

    async def _answer_close(self) -> None:
        """The peer sent its close frame: it sends nothing more, but may still read until ours
        (RFC 6455 §5.5.1, §7.1.1) — a one-shot client sends its request and its close at once.
        Every message read before it has been handled; the calls they started are awaited
        for at most :data:`PEER_CLOSE_GRACE_S`, then the close frame is answered (echoing its
        code) after what is queued (:meth:`close`). A call still running then is dropped as
        for any client that closes (cancelled, or kept for a re-send of its idempotency key):
        a client that closes with calls running is not kept waiting for its close handshake.
        The answers themselves are written as long as the peer reads them — each write under
        the send deadline (``send_timeout_s`` without progress: 1008), as any answer: a 1 s
        bound cut a large answer to a slow but steady reader in the middle of its frame. The
        peer's end of stream (a FIN) without a close frame is answered the same way: it sends
        nothing more, and may read on (``shutdown(SHUT_WR)``, ``nc -N``); after a close frame
        it changes nothing. A peer that has gone (a reset, a write that fails) ends the wait:
        its calls go with it. Nothing to do when the connection ended otherwise."""
        conn = self.conn
        peer = getattr(conn, "peer_close", None)
        if peer is None or conn.closed is not None:
            return
        assert isinstance(conn, ServerConnection)
        if self.closing_reason is None:
            core = self.core
            ledger = core.ledger
            with trio.CancelScope() as waiting:
                conn.on_closed = waiting.cancel
                try:
                    # the calls: for the grace
                    with trio.move_on_after(PEER_CLOSE_GRACE_S):
                        await self.shared.changes.wait_for(
                            lambda: ledger.count == core.answering
                        )
                    # their answers (waiting for room, being written): while the peer reads
                    if ledger.count == core.answering:
                        await self.shared.changes.wait_for(
                            lambda: ledger.count == 0 or self.closing_reason is not None
                        )
                finally:
                    conn.on_closed = None
            if self.closing_reason is None and conn.closed is None:
                await self.close(peer.code, peer.reason or "", flush_s=math.inf)
                return
        done = self._close_done  # (another task's close: the drain's hand-over, a stall)
        if done is not None:
            await done.wait()

    def _write_progress(self) -> None:
        scope = self._write_scope
        if scope is not None:
            scope.deadline = trio.current_time() + self.settings.send_timeout_s

    def _wake_writer(self) -> None:
        """Something is queued for the writer (:attr:`Outbox.wake`): start it unless it runs.
        Not once the session's nursery is cancelled (the session is ending: a writer would be
        cancelled at once, and the nursery may already be closed to new tasks while an
        execution's watcher still queues progress for this session)."""
        if self._round_due:
            return  # (the write at the round's end sends what is queued, or starts the writer)
        nursery = self.nursery
        if self._writing or nursery is None or nursery.cancel_scope.cancel_called:
            return
        if self._write_now and not self._kept:
            # What is queued (progress, mostly) goes to the socket now, from the task that
            # queued it, in one write: no writer task started and run for it (issue 18, part
            # 17a: each progress notification of a streamed call started one). The writer is
            # started only for what the socket does not take — the rest of a frame (kept by the
            # stream, sent first) or what could not be handed over now (another write holds
            # the stream, a large message) — and sends it under the send deadline as always.
            outbox = self.core.outbox
            texts = outbox.queued()
            conn = cast(ServerConnection, self.conn)
            count, whole = conn.send_texts_now(texts, ROUND_WRITE_BYTES)
            if not whole:
                self._kept = count  # (written once the writer has sent the rest)
            elif count:
                outbox.written(count)
                if count == len(texts):
                    return
        self._writing = True
        nursery.start_soon(self._writer)

    def _defer(self, text: Text) -> bool:
        """Whether a call's answer (:meth:`Outbox.put` with ``direct``) waits for the write at
        the scheduler round's end (:meth:`_write_round`): when other calls of this session are
        in flight, whose answers may come in the same round (a storm's answers come back
        together: one write for all of a round's, not one each), and nothing else writes. A
        lone call's answer is written at once, by its own task, as before."""
        if self._round_due:
            return True
        if (
            self.core.ledger.count < 2
            or self._writing
            or self._kept
            or self.nursery is None
            or isinstance(text, Pieces)
        ):
            return False
        self._round_due = True
        at_round_end(self._write_round)
        return True

    def _write_round(self) -> None:
        """At the scheduler round's end (outside any task): what is queued goes to the socket
        in one write (:meth:`ServerConnection.send_texts_now`) — or, for whatever it does not
        take (another write holds the stream, a large answer, a full socket, the rest of a
        frame), the writer is started, which sends it under the send deadline as always."""
        self._round_due = False
        outbox = self.core.outbox
        conn = self.conn
        try:
            if not self._writing and not self._kept and isinstance(conn, ServerConnection):
                texts = outbox.queued()
                if texts:
                    count, whole = conn.send_texts_now(texts, ROUND_WRITE_BYTES)
                    if whole:
                        outbox.written(count)
                    else:
                        self._kept = count  # (written once the writer has sent the rest)
            if self._kept or outbox.next() is not None:
                # (the loop may be about to sleep: the writer is started through the run's
                # token, which wakes it)
                trio.lowlevel.current_trio_token().run_sync_soon(self._wake_writer)
        except Exception as exc:  # (never raised out of the hook: trio would drop it)
            # never lose what is queued: the writer sends it (or says why it cannot)
            log_event("session.round_write_failed", logging.ERROR, session=self.id, error=repr(exc))
            trio.lowlevel.current_trio_token().run_sync_soon(self._wake_writer)

    async def _writer(self) -> None:
        """Send what is queued, in order, and end once nothing is (the outbox's ``wake`` starts
        it again when something is queued: :meth:`_wake_writer`)."""
        outbox = self.core.outbox
        timeout = self.settings.send_timeout_s
        # (ServerConnection.send_text: a small frame straight to the socket when it takes it,
        # no scheduler round for the stream lock and the send — most messages queued here are
        # progress notifications, one or more per streamed call)
        send = self._send_text or self._send_message
        try:
            # One scope for every write of this run: its deadline is set for each message
            # (and moved by the stream's progress while a large one is written).
            with trio.CancelScope() as scope:
                self._write_scope = scope
                if self._kept:
                    # the rest of frames the round's write handed to the socket part-way
                    scope.deadline = trio.current_time() + timeout
                    assert isinstance(self.conn, ServerConnection)
                    await self.conn.send_kept()
                    outbox.written(self._kept)
                    self._kept = 0
                while (text := outbox.next()) is not None:
                    scope.deadline = trio.current_time() + timeout
                    await send(text)
                    outbox.written()
            self._write_scope = None
            if scope.cancelled_caught:
                await self._stalled()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            # the peer went away with answers still queued: stop reading too; the answers are
            # kept by the executions for a reconnecting bridge
            outbox.abandon()
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()
        finally:
            self._write_scope = None
            self._writing = False

    async def _send_message(self, text: Text) -> None:
        """trio-websocket's ``send_message``, for a connection that is not a
        :class:`ServerConnection` (which writes :class:`Pieces` piece by piece)."""
        await self.conn.send_message(text.text() if isinstance(text, Pieces) else text)

    async def _direct_write(self, text: Text) -> None:
        """Write one message from the task that put it (the outbox was empty, so nothing is
        being written), under the writer's deadline: ``send_timeout_s`` from the last progress.
        A frame the socket takes at once needs no deadline: the scope that carries it is made
        only when the send has to wait (:meth:`ServerConnection.send_text`'s ``wait_scope``).

        Raises:
            trio.ClosedResourceError: the peer went away or read nothing for
                ``send_timeout_s`` (then the session is closed with 1008, as by the writer).
        """
        scope: trio.CancelScope | None = None

        def wait_scope() -> trio.CancelScope:
            nonlocal scope
            scope = trio.CancelScope(deadline=trio.current_time() + self.settings.send_timeout_s)
            self._write_scope = scope
            return scope

        try:
            if self._send_text is not None:
                await self._send_text(text, wait_scope)
            else:
                with wait_scope():
                    await self._send_message(text)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            if self.nursery is not None:  # the peer went away: stop reading too
                self.nursery.cancel_scope.cancel()
            raise trio.ClosedResourceError("the connection is closed") from None
        finally:
            self._write_scope = None
        if scope is not None and scope.cancelled_caught:
            await self._stalled()
            raise trio.ClosedResourceError("the peer reads nothing")

    def _pong_stalled(self) -> None:
        """A pong made no progress for ``send_timeout_s`` (the connection's reader wrote it):
        the peer reads nothing — closed as by a stalled writer (:meth:`_stalled`)."""
        nursery = self.nursery
        if nursery is None or nursery.cancel_scope.cancel_called or self.closing_reason:
            return  # (the session is ending already)
        nursery.start_soon(self._stalled)

    async def _stalled(self) -> None:
        """The peer read nothing for ``send_timeout_s``: close with 1008 and free everything."""
        timeout = self.settings.send_timeout_s
        core = self.core
        self.shared.stats.rejections["send_timeout"] += 1
        log_event(
            "session.send_timeout",
            logging.WARNING,
            session=self.id,
            ip=self.ip,
            queued_bytes=core.outbox.queued_bytes,
            pending=core.ledger.count,
        )
        reason = f"not reading: nothing could be written for {timeout:g}s"
        core.closing_reason = (1008, reason)
        core.outbox.close(drop=True)
        # The send buffer is full, so the close frame may not go out either: give it a moment,
        # then the connection's owner closes the TCP stream.
        with trio.move_on_after(min(1.0, timeout)):
            await self.conn.aclose(1008, reason)
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()

    async def _reader(self, handle: Callable[[str], Awaitable[Any]]) -> None:
        while True:
            try:
                message = await self.conn.get_message()
            except ConnectionClosed:
                await self._answer_close()
                # the connection closed: the teardown waits its turn (exai.server.endings),
                # unless the read that found the end of stream already took it
                turn = None if self._stream is None else self._stream.turn
                if turn is not None and not turn.taken:
                    await turn.take()
                return
            try:
                if isinstance(message, bytes):
                    await self.close(1003, "binary frames are not supported; send JSON-RPC as text")
                    return
                await handle(message)
            finally:
                # the frame is handled: what a call keeps of it is charged to its ledger
                # (the connection charged its UTF-8 bytes)
                self.meter.release(message_bytes(message))
            # (not kept while the session waits for the next one: its bytes were given back,
            # and an idle session would hold its last message, however large, meanwhile)
            del message
            if self.closing_reason is not None:
                # A close by another task (the drain's hand-over, a revoked token) flushes what
                # is queued first: returning now would cancel the session's nursery, cutting
                # the answer being written in the middle of its frame (the close frame then
                # followed the cut frame: 1007 at the client) and losing those behind it.
                # (A stalled writer's close sets no event: it ends the session itself.)
                done = self._close_done
                if done is not None:
                    await done.wait()
                return
