"""Server-side WebSocket connections on trio-websocket, with two fixes the daemon needs.

trio-websocket turns a frame that fails to parse (invalid UTF-8 in a text frame, a protocol
violation) into a local close but never tells the peer why: wsproto reports it as a
``CloseConnection`` event while the connection is still OPEN, and trio-websocket only answers
close frames in the REMOTE_CLOSING state. :class:`ServerConnection` sends the close frame with
the parse failure's code (1007 for invalid UTF-8, 1002 for a protocol error) before the stream
is closed, as RFC 6455 §7.1.7 asks.

It also charges every part of a frame being received to the daemon's budget
(:class:`~exai.server.budget.InboundMeter`, set by the session): a part that does not fit
closes the connection with 1013 (try again later), so the frames of a thousand connections
cannot pile up outside the budget. A message's size — for that charge and for
``EXAI_MAX_FRAME_BYTES`` (1009) — is its UTF-8 bytes (:func:`message_bytes`), as at the HTTP
door: trio-websocket counts the characters of a text message, so a message of 4-byte characters
four times the limit got through (2 M emoji, 8 MB, under a 4 MiB limit) and was charged a
quarter of what it holds. An ASCII message (``str.isascii`` reads a flag: 20 ns) costs nothing
more; any other is encoded once to count it (0.35–0.46 ms per MB of ``é``, ``中`` or emoji text,
measured with ``timeit`` on the development machine).

A call's answer goes out through :meth:`ServerConnection.send_text`: on a plain TCP stream
(:class:`~exai.server.outbox.ProgressStream` over a ``trio.SocketStream``) whose lock no other
writer holds, a frame of at most 64 KiB is handed to the non-blocking socket at once
(:meth:`~exai.server.outbox.ProgressStream.send_nowait`), which almost always takes it whole; what
it does not take is sent the usual way, under the same lock, in order, and only that part waits
under the caller's write deadline (no deadline scope for a frame sent at once). ``send_message``
yields to the scheduler twice even when nothing waits (the stream lock's checkpoint and the socket
send's), and at concurrency 1 every such round costs CPU (issue 18: the responder task of a ``chat``
call resumed 7 times, of a ``version`` call 4 times; with this, the provider slot and the finished
call not waited for, 3 and 1). A whole text message is handed to the session's reader without the
channel's checkpoints (:meth:`ServerConnection._handle_message_event`): the connection's reader task
went through one more scheduler round per message for them. A message that comes alone in a
read, as one whole text frame, is unmasked and decoded by :class:`ServerWSConnection` instead of
wsproto's frame and message decoders (≈ 2 µs of CPU against ≈ 10 µs for a ``tools/call``
request; anything else is wsproto's, with every rule of RFC 6455).

The peer's close frame is not answered by the reader (trio-websocket answers it at once and
closes the stream, so the answers to the messages read before it were lost): the session answers
it (:meth:`ServerConnection.aclose`) once it has answered those, while the reader goes on reading
only to see the peer's end of stream (more than :data:`AFTER_CLOSE_BYTES` after the close
frame fails the connection), and :class:`ServerWSConnection` lets a text frame out between the
peer's close and ours, which RFC 6455 allows and wsproto refuses. The peer's end of stream (a
FIN: a half-close, ``shutdown(SHUT_WR)``) is not an abort either, with or without a close frame
before it: the peer sends nothing more but may read on, and the session answers it as a close
(:meth:`ServerConnection._abort_web_socket`); a peer that has gone fails the first write.

This leans on trio-websocket internals (``_wsproto``, ``_send``, ``_stream``, ``_stream_lock``,
``_abort_web_socket``, ``_reader_task``, ``_get_request``, ``_connection_proposal``,
``_close_stream``, ``_close_reason``, ``_recv_channel``, ``_send_channel``, ``_reader_running``,
``_message_parts``, ``_max_message_size``, ``_close_handshake``,
``_for_testing_peer_closed_connection``, ``_close_web_socket``); pyproject pins the minor version
it was checked against. For memory per idle session it also swaps three of wsproto's and trio's
attributes once they are not used (the handshake's h11 state and event queue) or are empty
almost always (the message channel's buffer, the connection's event queue):
tests/server/test_wsconn_memory.py checks they exist.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Generator, Iterable
from contextlib import AbstractContextManager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest
from trio_websocket._impl import CloseReason
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, RejectConnection, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from exai.server.budget import InboundMeter
from exai.server.outbox import CHUNK_BYTES, ProgressStream, send_pieces
from exai.server.pieces import Pieces

__all__ = [
    "ServerConnection",
    "ServerWSConnection",
    "accept_request",
    "http_version",
    "message_bytes",
]


#: what a peer may send after its close frame (nothing, by RFC 6455 §1.4; some slack) before
#: the connection is failed, while the answers before it are written (:class:`ServerWSConnection`)
AFTER_CLOSE_BYTES = 64 * 1024


class _FewItems(list[Any]):
    """A queue that is empty almost always and holds a few items at most: a list, which holds
    no storage while empty, with the ``popleft`` of the ``collections.deque`` it stands in for
    (an empty deque holds a block of 64 slots, ≈ 0.7 KB). Its users here: the connection's
    message channel (at most ``message_queue_size`` = 1 message, while the session's reader
    is busy) and wsproto's queue of events not read from frames (the peer's end of stream)."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def message_bytes(data: str | bytes | bytearray) -> int:
    """The size of a WebSocket message or part of one, in bytes: a text's UTF-8 bytes (not its
    characters, which ``len`` counts: a 4-byte character is 1), a binary one's length."""
    if not isinstance(data, str) or data.isascii():
        return len(data)
    return len(data.encode("utf-8", "surrogatepass"))


class ServerConnection(WebSocketConnection):
    #: charged for every part of a frame as it arrives (``None`` until the session sets it)
    meter: InboundMeter | None = None
    #: the peer's close frame is answered by the session (:meth:`aclose`) once it has answered
    #: what came before it, not at once by the reader (set by the session)
    answer_close_later = False
    #: the peer's close frame, read while :attr:`answer_close_later` (its answer not yet sent)
    peer_close: CloseReason | None = None
    #: called once the connection is closed (the session's wait for its answers, see above)
    on_closed: Callable[[], None] | None = None
    #: the write deadline of a pong (the session's ``send_timeout_s``; ``None``: none)
    pong_timeout_s: float | None = None
    #: called when a pong made no progress for ``pong_timeout_s`` (the peer reads nothing)
    on_pong_stalled: Callable[[], None] | None = None

    async def _close_stream(self) -> None:
        proposal = self._connection_proposal
        if proposal is not None and not proposal._value_event.is_set():
            # wsproto refused the upgrade request (trio-websocket's reader answered it 400 or
            # 426): what the client sent behind it is unread, and closing now would reset the
            # connection and drop the answer. No request will come (accept_request says so at
            # once: None); the listener lingers, then closes the stream.
            self._reader_running = False
            proposal.set_value(None)  # type: ignore[arg-type]
            return
        await super()._close_stream()
        if self.peer_close is not None and self._close_reason is None:
            # the reader failed a peer that sent on after its close frame (ServerWSConnection.
            # receive_data): the connection is gone, as for a peer that went away (1006) — the
            # session's wait for its answers ends now (on_closed)
            await self._close_web_socket(1006, "data after the close frame")

    async def _accept(
        self, request: Any, subprotocol: str | None, extra_headers: list[tuple[bytes, bytes]]
    ) -> None:
        await super()._accept(request, subprotocol, extra_headers)
        # The upgrade is answered: what the client sent past its request (frames sent with it,
        # held back by the listener: ProgressStream.hold) is read now, by the WebSocket
        # connection the answer made — wsproto's handshake would have kept it to itself.
        stream = self._stream
        if isinstance(stream, ProgressStream):
            stream.release()
        # The upgrade is answered: the handshake's HTTP/1.1 state (an h11 connection with its
        # state tables and buffers) and its event queue (a deque: ≈ 0.6 KB even empty) are not
        # used again, but wsproto keeps them for the life of the WebSocket connection
        # (``WSConnection.handshake``: its ``events()`` still reads the empty queue) — in every
        # idle session. (wsproto's own attributes: tests/server/test_wsconn_memory.py checks
        # that they are there to drop, so an upgrade that renames them is seen.)
        handshake: Any = self._wsproto.handshake
        if getattr(handshake, "_h11_connection", None) is not None:
            handshake._h11_connection = None
        if not getattr(handshake, "_events", True):
            handshake._events = ()
        # (and the upgrade request as wsproto parsed it — its headers, ≈ 1 KB — which only the
        # accept reads)
        if getattr(handshake, "_initiating_request", None) is not None:
            handshake._initiating_request = None
        # The WebSocket connection's own event queue: only the end of stream is put there
        # (frames' events come from its frame protocol), so it is empty all its life.
        connection: Any = self._wsproto.connection
        if type(getattr(connection, "_events", None)) is deque and not connection._events:
            connection._events = _FewItems()

    async def send_text(
        self,
        message: str | Pieces,
        wait_scope: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        """``send_message(message)``, with a small frame handed to a plain TCP socket at once
        when no other writer holds the stream (see the module docstring).

        Args:
            message: the text frame's text, or a large one's pieces (written one at a time).
            wait_scope: entered around every part of the send that may wait (another writer's
                lock, a socket that does not take the frame whole) and nothing else — the
                caller's write deadline, made only when a send has to wait (a frame the
                socket takes at once needs none).

        Raises:
            ConnectionClosed: the connection is closed or closing, or the peer went away
                (as ``send_message``).
        """
        if self._close_reason:
            raise ConnectionClosed(self._close_reason)
        stream = self._stream
        lock = self._stream_lock
        if isinstance(message, Pieces):
            await self._send_pieces(message, wait_scope)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        if not isinstance(stream, ProgressStream) or lock.locked():
            with wait_scope():
                await self._send(TextMessage(data=message))
            return
        lock.acquire_nowait()
        try:
            try:
                data = self._wsproto.send(TextMessage(data=message))
            except LocalProtocolError:
                raise ConnectionClosed(self._closing_reason()) from None
            sent = stream.send_nowait(data) if len(data) <= CHUNK_BYTES else 0
            if sent < len(data):
                with wait_scope():
                    await stream.send_all(memoryview(data)[sent:] if sent else data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()  # (no network wait: closes the channels)
            assert self._close_reason is not None
            raise ConnectionClosed(self._close_reason) from None
        finally:
            lock.release()

    def send_texts_now(self, texts: Iterable[str | Pieces], limit: int) -> tuple[int, bool]:
        """Hand the leading small texts of ``texts`` to a plain TCP socket as their text frames,
        in one write, now — never waiting, never yielding (no task needed: the session's write
        at a scheduler round's end). Texts are taken while their frames come to at most
        ``limit`` bytes (the first is always taken), up to the first :class:`Pieces`.

        Returns ``(count, whole)``: how many texts went on the wire, and whether their frames
        went whole. Not whole: the socket took part of them, and the stream keeps the rest for
        the next write on it (:meth:`~exai.server.outbox.ProgressStream.keep`), so their
        frames stay whole and in order on the wire — the caller must make sure a writer follows
        (:meth:`send_kept`). ``(0, True)`` when nothing went: another writer holds the stream,
        the connection is closing or gone, it is not plain TCP, the socket took no byte, or no
        text frame may be sent now — the writer's usual send says why.
        """
        stream = self._stream
        wsp = self._wsproto
        if (
            self._close_reason
            or self._stream_lock.locked()
            or not isinstance(stream, ProgressStream)
            or not isinstance(wsp, ServerWSConnection)
        ):
            return 0, True
        parts: list[bytes] = []
        count = size = 0
        try:
            for text in texts:
                if not isinstance(text, str):
                    break
                data = text.encode("utf-8")
                head = wsp.text_frame_head(len(data))
                if head is None or (count and size + len(head) + len(data) > limit):
                    break
                parts += (head, data)
                count += 1
                size += len(head) + len(data)
        except (LocalProtocolError, UnicodeEncodeError):
            pass  # (the frames before it, if any; the writer's send says why)
        if not count:
            return 0, True
        data = b"".join(parts)
        try:
            sent = stream.send_nowait(data)
        except trio.BrokenResourceError:
            return 0, True  # (the writer finds the peer gone)
        if sent == 0:
            return 0, True
        if sent < len(data):
            stream.keep(memoryview(data)[sent:])
            return count, False
        return count, True

    async def send_kept(
        self, wait_scope: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
    ) -> None:
        """Write what the stream kept of frames handed to its socket part-way
        (:meth:`send_texts_now`), if another write has not sent it first, under ``wait_scope``.

        Raises:
            ConnectionClosed: the connection is closed or closing, or the peer went away.
        """
        stream = self._stream
        lock = self._stream_lock
        with wait_scope():
            if lock.locked():
                await lock.acquire()
            else:
                lock.acquire_nowait()
            try:
                if isinstance(stream, ProgressStream) and stream.kept:
                    await stream.send_all(b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._abort_web_socket()
                raise ConnectionClosed(self._closing_reason()) from None
            finally:
                lock.release()

    async def _send_pieces(
        self, message: Pieces, wait_scope: Callable[[], AbstractContextManager[object]]
    ) -> None:
        """A large message as one text frame written piece by piece, each write a step of its
        own (exai.server.pieces): wsproto would copy it whole four times in one step (≈ 0.3 s
        for 16 MiB). The same bytes as wsproto's frame."""
        stream = self._stream
        wsp = self._wsproto
        lock = self._stream_lock
        with wait_scope():
            if lock.locked():
                await lock.acquire()
            else:
                lock.acquire_nowait()  # (no scheduler round for a lock nobody holds)
            try:
                head = None
                try:
                    if isinstance(wsp, ServerWSConnection):
                        head = wsp.text_frame_head(message.nbytes)
                    if head is None:  # (never: no extension is negotiated)
                        data = wsp.send(TextMessage(data=message.text()))
                except LocalProtocolError:
                    raise ConnectionClosed(self._closing_reason()) from None
                try:
                    if head is None:
                        await stream.send_all(data)
                    else:
                        await send_pieces(stream, head, message.parts)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._abort_web_socket()
                    assert self._close_reason is not None
                    raise ConnectionClosed(self._close_reason) from None
            finally:
                lock.release()

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        state = self._wsproto.state
        if state == ConnectionState.OPEN:
            # not a close frame from the peer: a local parse failure; say why before closing
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        elif (
            state == ConnectionState.REMOTE_CLOSING
            and self.answer_close_later
            and self._close_reason is None
            and self.peer_close is None
        ):
            # The peer's close frame: it sends nothing more (RFC 6455 §1.4: what follows is
            # discarded), but it may still read until our close frame (§5.5.1, §7.1.1) — a
            # one-shot client sends its request and its close at once. trio-websocket answers
            # it here and closes the stream, so the answers to the messages read before it were
            # lost (whether they came in the same read or in an earlier one). The session
            # reads those messages, answers them, then closes (:meth:`aclose`); this reader
            # goes on reading (wsproto drops the bytes) only to see the peer's end of stream,
            # which ends nothing (a half-close: _abort_web_socket); a reset, or a write that
            # fails, ends the connection as before (1006: the session's calls are dropped).
            self.peer_close = CloseReason(event.code, event.reason or None)
            self._for_testing_peer_closed_connection.set()
            if isinstance(self._wsproto, ServerWSConnection):
                self._wsproto.text_after_peer_close = True
            await self._send_channel.aclose()  # (the session reads what came before, then ends)
            return
        await super()._handle_close_connection_event(event)

    async def _aclose(self, code: int, reason: str | None) -> None:
        """trio-websocket's close, and the answer to a peer's close frame left for the session
        (:attr:`answer_close_later`): our close frame with ``code`` (the session echoes the
        peer's), then the stream is closed (RFC 6455 §7.1.1: the server closes TCP first)."""
        if self.peer_close is None or self._close_reason is not None:
            await super()._aclose(code, reason)
            return
        self._close_reason = self.peer_close
        try:
            with contextlib.suppress(
                ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self._send(CloseConnection(code=code, reason=reason))
        finally:
            self._close_handshake.set()
            await self._close_stream()

    #: the peer's end of stream was read and left to the session (:meth:`_abort_web_socket`)
    _peer_ended = False

    async def _abort_web_socket(self) -> None:
        """trio-websocket's abort (the peer went away: 1006, the session's calls dropped) —
        except for the reader finding the peer's end of stream while the session answers the
        peer's close (:attr:`answer_close_later`): a FIN says the peer sends nothing more, not
        that it reads nothing more. A one-shot client (``nc -N``, a script) sends its requests
        and its close frame, or only its requests, then shuts its side down and reads the
        answers; the abort dropped them all. So the end of stream is the peer's close: after
        its close frame, nothing more (the session is answering that close already); without
        one, it stands for one (:attr:`peer_close`, code 1000), and the session answers what
        came before it as it answers a close frame — the calls awaited for at most
        ``PEER_CLOSE_GRACE_S``, their answers written while the peer reads, under the send
        deadline. A peer that has gone fails that write (a reset), which aborts as before.

        The reader calls this right after the read that found the end (no checkpoint between:
        :attr:`~exai.server.outbox.ProgressStream.peer_ended` is that read's); a failed write
        after it aborts."""
        stream = self._stream
        if (
            self.answer_close_later
            and not self._peer_ended
            and self._close_reason is None
            and isinstance(stream, ProgressStream)
            and stream.peer_ended
        ):
            self._peer_ended = True
            self._reader_running = False  # (nothing more to read)
            if self.peer_close is None:
                self.peer_close = CloseReason(1000, "the client ended its stream")
                self._for_testing_peer_closed_connection.set()
                await self._send_channel.aclose()  # (the session reads what came before)
            return
        await super()._abort_web_socket()

    async def _close_web_socket(self, code: int, reason: str | None = None) -> None:
        await super()._close_web_socket(code, reason)
        if self.on_closed is not None:
            self.on_closed()

    async def _handle_ping_event(self, event: Ping) -> None:
        """The pong, written under the session's write deadline (trio-websocket writes it with
        none): a peer that sends pings and reads nothing filled the socket's buffer with pongs,
        and the connection's reader then waited in a pong's write for ever — it read nothing
        more, no writer ran (nothing was queued), and the session was never closed (1008 is
        for a peer that stops reading). The wait for another writer's turn is not under it
        (that writer has its own deadline, which a slow but steady reader keeps moving)."""
        if self.peer_close is not None:
            return  # (after the peer's close frame: discarded, RFC 6455 §1.4)
        timeout = self.pong_timeout_s
        if timeout is None:
            await super()._handle_ping_event(event)
            return
        try:
            data = self._wsproto.send(event.response())
        except LocalProtocolError:
            raise ConnectionClosed(self._closing_reason()) from None
        async with self._stream_lock:
            with trio.move_on_after(timeout) as scope:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._abort_web_socket()
                    raise ConnectionClosed(self._closing_reason()) from None
        if scope.cancelled_caught:
            if self.on_pong_stalled is not None:
                self.on_pong_stalled()
            # (the reader stops: the session ends, and no further pong waits its turn)
            raise ConnectionClosed(CloseReason(1008, "not reading"))

    async def _send(self, event: Event) -> None:
        """trio-websocket's send, except that wsproto refusing an event because the close
        handshake has begun raises :class:`ConnectionClosed`, as any send on a closed connection
        does. Our close frame (a frame that failed to parse: 1007, 1002; a stalled writer: 1008)
        puts wsproto in ``LOCAL_CLOSING`` before trio-websocket sets ``_close_reason``; an answer
        or a pong sent meanwhile raised wsproto's ``LocalProtocolError``, which ended the session
        as an error (logged with the answer's first 200 characters) instead of a close."""
        try:
            await super()._send(event)
        except LocalProtocolError:
            raise ConnectionClosed(self._closing_reason()) from None

    def _closing_reason(self) -> CloseReason:
        return self._close_reason or CloseReason(1006, "the connection is closing")

    #: UTF-8 bytes of the message being received so far (its earlier parts)
    _message_bytes = 0

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if self.peer_close is not None:
            return  # (after the peer's close frame: discarded, RFC 6455 §1.4)
        nbytes = message_bytes(event.data)
        total = self._message_bytes + nbytes
        if total > self._max_message_size:
            # Before the budget: a message over the limit never fits, so "try again later"
            # (1013) would be a lie when the part that crosses the limit also finds the budget
            # full. (trio-websocket's own check counts characters, never more than this.)
            await self._refuse_message(
                1009, f"Exceeded maximum message size: {self._max_message_size} bytes"
            )
            return
        meter = self.meter
        if meter is not None and not meter.take(nbytes):
            await self._refuse_message(
                1013, "the daemon holds as many client bytes as its budget allows; try again later"
            )
            return
        self._message_bytes = 0 if event.message_finished else total
        if event.message_finished and not self._message_parts and type(event) is TextMessage:
            # A whole text message in one event (almost every one): handed to the session's
            # reader without the channel's checkpoints, so this task goes on reading in the same
            # step instead of being put aside and resumed once per message. A reader that does
            # not wait and a full channel take trio-websocket's way (which waits for room).
            try:
                self._send_channel.send_nowait(event.data)
                return
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return  # (as trio-websocket: the session stopped reading)
        await super()._handle_message_event(event)

    async def _refuse_message(self, code: int, reason: str) -> None:
        """Drop the message being received and close with ``code`` (as trio-websocket does
        for a message over its size limit)."""
        self._message_parts = []
        self._message_size = self._message_bytes = 0
        self._close_reason = CloseReason(code, reason)
        with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
            await self._send(CloseConnection(code=code, reason=reason))
        await self._recv_channel.aclose()
        self._reader_running = False



class ServerWSConnection(WSConnection):
    """wsproto's server connection, with a short way for what almost every read of a client's
    connection brings: whole text frames (masked, unfragmented, no extension, a length under
    64 KiB) — one, or in a storm several (a client that sends 50 calls at once: 13–20 in a
    4 KiB read) — read while wsproto has nothing pending. Their texts are unmasked and decoded
    here (≈ 2 µs each) instead of by wsproto's frame and message decoders, whose generators,
    buffers and header objects cost ≈ 8-17 µs per message (``timeit``, issue 18). Anything
    else — a frame that does not fit these rules or fails them (invalid UTF-8, a non-minimal
    length), a control frame, a part of a frame — goes to wsproto as before, with everything
    after it in the read, and wsproto applies every rule of RFC 6455 to it: the whole frames
    before it were read the short way, and come first. wsproto's state is untouched by frames
    read the short way: it was idle before and is idle after each.

    Leans on wsproto internals (``Connection._proto``, ``_events``, ``FrameProtocol.extensions``,
    ``_parse_more``, ``_frame_decoder.header``/``buffer``, ``_message_decoder.opcode``);
    tests/server/test_wsconn_fast_text.py checks them and compares both ways on generated frames.
    """

    #: messages read the short way, given by the next :meth:`events`
    _ready: list[TextMessage] | None = None
    #: a text frame may be sent between the peer's close frame and ours (set by
    #: :class:`ServerConnection` when it leaves the peer's close to its session)
    text_after_peer_close = False
    #: bytes were given to wsproto while a message read the short way waited: it comes first
    _behind = False
    #: bytes read after the peer's close frame, while its answer is left to the session
    _after_close = 0

    def text_frame_head(self, nbytes: int) -> bytes | None:
        """The head of one whole, unmasked text frame of ``nbytes`` as :meth:`send` writes it
        (its payload follows, written in pieces: :class:`~exai.server.pieces.Pieces`), where
        :meth:`send` would send one; ``None`` if an extension transforms the payload (none
        is ever negotiated) or a fragmented message is in progress.

        Raises:
            LocalProtocolError: no text frame may be sent now (as :meth:`send`).
        """
        conn = self.connection
        state = None if conn is None else conn.state
        if conn is None or not (
            state is ConnectionState.OPEN
            or (self.text_after_peer_close and state is ConnectionState.REMOTE_CLOSING)
        ):
            raise LocalProtocolError(f"a text frame cannot be sent in state {state}.")
        proto = conn._proto
        if proto.extensions or proto._outbound_opcode is not None:
            return None
        if nbytes <= 125:
            return bytes((0x81, nbytes))
        if nbytes <= 0xFFFF:
            return bytes((0x81, 126)) + nbytes.to_bytes(2, "big")
        return bytes((0x81, 127)) + nbytes.to_bytes(8, "big")

    def send(self, event: Event) -> bytes:
        """wsproto's; with :attr:`text_after_peer_close`, a text frame may also be sent after
        the peer's close frame and before ours, as RFC 6455 allows (§5.5.1: a close frame is
        answered "as soon as practical"; no data frame may follow one's *own* close): wsproto
        refuses any data frame once it has read the peer's, and the answers to what came before
        it are written then (:attr:`ServerConnection.answer_close_later`)."""
        if self.text_after_peer_close and type(event) is TextMessage:
            conn = self.connection
            if conn is not None and conn.state is ConnectionState.REMOTE_CLOSING:
                return bytes(conn._proto.send_data(event.data, event.message_finished))
        return super().send(event)

    def receive_data(self, data: bytes | None) -> None:
        conn = self.connection
        if data and conn is not None and self._ready is None:
            ready, used = _whole_text_frames(conn, data)
            if ready:
                self._ready = ready
                if used == len(data):
                    return
                data = data[used:]  # (the rest is wsproto's: it reads it after these)
        if self._ready is not None:
            self._behind = True
        if (
            self.text_after_peer_close
            and data
            and conn is not None
            and conn.state is ConnectionState.REMOTE_CLOSING
        ):
            # Nothing may follow the peer's close frame (RFC 6455 §1.4), and wsproto drops it
            # unread — while the answers before it are written, for as long as the peer reads
            # them: a peer that reads its answer slowly could make the daemon read and drop
            # junk at line rate all that time (1 GB in 6.6 s, found by the attack on
            # 86b7df9). Past AFTER_CLOSE_BYTES the connection is failed (its stream closed:
            # ServerConnection._close_stream), as a peer that went away.
            self._after_close += len(data)
            if self._after_close > AFTER_CLOSE_BYTES:
                raise RemoteProtocolError("data after the close frame", event_hint=None)
        if conn is not None:
            super().receive_data(data)
            return
        try:
            super().receive_data(data)
        except UnicodeError:
            # the upgrade request: wsproto decodes its Host (IDNA), target, Connection, Upgrade
            # and Sec-WebSocket-* values as ASCII, and a byte past it raised UnicodeDecodeError
            # out of trio-websocket's reader — no answer, the connection reset and a
            # session.error logged at error level for each such request (found by an attack
            # on the Host check: 'Host: \xfflocalhost'). A malformed request is refused (400)
            # as wsproto refuses any other, and lingers as they do (Listener)
            raise RemoteProtocolError(
                "the upgrade request has a header or target that is not ASCII",
                event_hint=RejectConnection(status_code=400),
            ) from None

    def events(self) -> Generator[Event, None, None]:
        ready = self._ready
        if ready is not None:
            self._ready = None
            yield from ready
            if not self._behind:
                return  # (wsproto had nothing pending and was given nothing since)
            self._behind = False
        yield from super().events()


def _whole_text_frames(conn: Connection, data: bytes | bytearray) -> tuple[list[TextMessage], int]:
    """The text messages of the whole, masked, unfragmented text frames that wsproto would
    accept at the start of ``data``, read while wsproto has nothing pending, and how many
    bytes they take (``([], 0)`` when the first is not one, or wsproto is not idle)."""
    if conn.state is not ConnectionState.OPEN or conn._events:
        return [], 0
    proto = conn._proto
    decoder = proto._frame_decoder
    if (
        proto.extensions
        # (a frame that failed to parse ended wsproto's frame parser, a generator, for good:
        # it reads no frame after it, the state still OPEN)
        or proto._parse_more.gi_frame is None  # type: ignore[attr-defined]
        or decoder.header is not None
        or decoder.buffer.buffer
        or proto._message_decoder.opcode is not None
    ):
        return [], 0
    out: list[TextMessage] = []
    size = len(data)
    at = 0
    while size - at >= 6 and data[at] == 0x81:  # FIN, no RSV bit, TEXT
        length = data[at + 1] ^ 0x80  # (the MASK bit must be set: a client's frame is masked)
        if length < 126:
            start = at + 6
        elif length == 126:
            if size - at < 8:
                break
            length = (data[at + 2] << 8) | data[at + 3]
            if length < 126:
                break  # a length in 2 bytes that fits in 1: wsproto refuses it
            start = at + 8
        else:
            break  # not masked, or a 64-bit length
        end = start + length
        if end > size:
            break  # (a part of a frame)
        if length:
            mask = (data[start - 4 : start] * ((length + 3) >> 2))[:length]
            payload = (
                int.from_bytes(data[start:end], "little") ^ int.from_bytes(mask, "little")
            ).to_bytes(length, "little")
        else:
            payload = b""
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            break  # (wsproto closes with 1007)
        out.append(TextMessage(data=text, frame_finished=True, message_finished=True))
        at = end
    return out, at


async def accept_request(
    nursery: trio.Nursery, stream: trio.abc.Stream, *, max_message_size: int
) -> WebSocketRequest | None:
    """Read the HTTP upgrade request from ``stream`` (the caller bounds the time); ``None``
    when wsproto refused it (no ``Sec-WebSocket-Key``, a version other than 13, …: it answered
    400 or 426; the stream is left open for the caller to linger on and close). Without that,
    the wait for a request went on until the caller's bound, and the refusal was taken for a
    client that sent nothing."""
    connection = ServerConnection(
        stream,
        ServerWSConnection(ConnectionType.SERVER),
        message_queue_size=1,
        max_message_size=max_message_size,
    )
    # the message channel's buffer (one message while the session's reader is busy): a list,
    # not a deque's block of 64 slots, in every idle session (trio's own attribute: checked
    # by tests/server/test_wsconn_memory.py)
    state: Any = getattr(connection._recv_channel, "_state", None)
    if type(getattr(state, "data", None)) is deque and not state.data:
        state.data = _FewItems()
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


def http_version(request: WebSocketRequest) -> bytes | None:
    """The HTTP version of the upgrade request (``b"1.1"``, ``b"1.0"``), or ``None`` when
    trio-websocket's internals do not show it. wsproto accepts an HTTP/1.0 upgrade, which
    RFC 6455 §4.1 does not allow; the daemon refuses it."""
    try:
        h11_conn = request._connection._wsproto.handshake._h11_connection  # type: ignore[attr-defined]
    except AttributeError:
        return None
    version = getattr(h11_conn, "their_http_version", None)
    return version if isinstance(version, bytes) else None
