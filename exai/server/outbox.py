"""The writing side of a connection: a queue bounded in count and bytes, and a stream that
reports progress.

A session's answers and notifications wait in its :class:`Outbox` until the writer task sends
them — or, for a call's answer put while nothing is queued on a door that allows it
(:attr:`Outbox.direct`), are written by the responder's own task, one hand-off fewer per call.
The outbox holds at most ``max_count`` messages and ``max_bytes`` bytes of encoded text (one
message larger than that is let in when the outbox is empty, so it can still be sent);
every byte queued is charged to the session's :class:`~exai.server.budget.Ledger`. A message
that must be delivered waits for room; an advisory one (progress) is dropped and counted.

:class:`ProgressStream` wraps the connection's transport stream and writes in 64 KiB chunks,
calling back after each one. The writer keeps a deadline of ``send_timeout_s`` from the last
progress, so a peer that stops reading is detected whatever the message size, while one that
reads slowly but steadily is not cut off. A read that finds the peer gone (end of stream or
reset) first waits for the connection's turn to be torn down (:mod:`exai.server.endings`).

:meth:`ProgressStream.send_nowait` hands a message of at most 64 KiB to a plain TCP socket
directly (a non-blocking ``write``, never under TLS); the caller
(:meth:`exai.server.wsconn.ServerConnection.send_text`) sends only what the socket did not take
through the stream, under its write deadline as before. A
``send_all`` yields to the scheduler even when the socket takes everything at once, and at
concurrency 1 each such round costs CPU (issue 18).

Resource handling:
    :meth:`Outbox.close` drops whatever is queued and refunds its bytes; waiting senders get
    :class:`trio.ClosedResourceError`.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import trio

from exai.server.budget import Ledger
from exai.server.endings import EndingTurn
from exai.server.pieces import Text

__all__ = ["CHUNK_BYTES", "Outbox", "ProgressStream", "at_round_end", "send_pieces"]

#: the unit :class:`ProgressStream` writes in: the writer's deadline moves after each one
CHUNK_BYTES = 64 * 1024
#: what a read asks for when its caller gives no size (trio's ``SocketStream`` default)
DEFAULT_RECEIVE_BYTES = 64 * 1024


#: scheduler rounds with nothing due after which :func:`at_round_end`'s instrument leaves the run
ROUND_END_IDLE_ROUNDS = 64


class _RoundEnd(trio.abc.Instrument):
    """Calls what :func:`at_round_end` was given, once, as the scheduler round ends (trio's
    ``before_io_wait``: every task runnable at the round's start has had its step). In the run
    only while it is used: it leaves after :data:`ROUND_END_IDLE_ROUNDS` rounds with nothing
    due, so a daemon that never defers a write pays no hook per round."""

    def __init__(self) -> None:
        self.due: list[Callable[[], None]] = []
        self.installed = False
        self.idle = 0

    def before_io_wait(self, timeout: float) -> None:
        due = self.due
        if not due:
            self.idle += 1
            if self.idle >= ROUND_END_IDLE_ROUNDS:
                self.installed = False
                trio.lowlevel.remove_instrument(self)
            return
        self.idle = 0
        self.due = []
        for fn in due:
            try:
                fn()
            except Exception:  # (a hook that raises is dropped from the run by trio)
                logging.getLogger(__name__).exception("a write at the round's end failed")


_ROUND_END: trio.lowlevel.RunVar[_RoundEnd] = trio.lowlevel.RunVar("exai_round_end")


def at_round_end(fn: Callable[[], None]) -> None:
    """Call ``fn()`` once, at the end of the current scheduler round, outside any task (it must
    not raise, nor wait; a task it makes runnable must be woken through the run's token, as
    the loop may be about to sleep: ``trio.lowlevel.current_trio_token().run_sync_soon``)."""
    try:
        ends = _ROUND_END.get()
    except LookupError:
        ends = _RoundEnd()
        _ROUND_END.set(ends)
    if not ends.installed:
        ends.installed = True
        ends.idle = 0
        trio.lowlevel.add_instrument(ends)
    ends.due.append(fn)


#: the queue of every outbox with nothing queued: never appended to (see ``_append``)
_NOTHING_QUEUED: deque[Text] = deque()


class Outbox:
    """Encoded messages waiting to be written to one connection.

    Args:
        max_count: messages queued at most.
        max_bytes: bytes of text queued at most (``EXAI_SESSION_MAX_PENDING_BYTES``).
        ledger: the session's ledger, charged for every queued byte.

    Attributes:
        direct: set by a door that can write a message from the sender's own task: then a
            message :meth:`put` with ``direct=True`` while nothing is queued is written by
            ``direct(text)`` at once
            (the door's write deadline applies as to its writer) instead of waking the writer.
            It stays queued, and charged, while it is written, so messages put meanwhile queue
            behind it and the writer sends them after it, in order.
        wake: set by a door whose writer runs only while there is something to write (the
            WebSocket session: an idle session holds no writer task): called when a message
            is queued for the writer and none waits in :meth:`get` — not while a direct write
            holds the queue (``wake`` is called when it ends, if anything queued behind it).
            The door's writer sends with :meth:`next` and :meth:`written` until :meth:`next`
            says there is nothing more, and calls :meth:`abandon` if its connection fails.
            ``wake`` may itself write what is queued, at once, from the task that queued it
            (the WebSocket session; the HTTP door's SSE stream): it must not wait.
        defer: set by a door that writes the answers of one scheduler round together (the
            WebSocket session, while it has several calls in flight): a message :meth:`put`
            with ``direct=True`` is first offered to ``defer(text)``; when it says yes, the
            message is queued (and charged) without waking the writer, and the door writes it
            with whatever else is queued at the round's end (:func:`at_round_end`).
    """

    def __init__(self, max_count: int, max_bytes: int, ledger: Ledger) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ledger = ledger
        # (the empty queue every outbox shares while it has nothing queued: a deque holds a
        # block of 64 slots, ≈ 0.6 KB, even empty, in each of 10,000 idle sessions)
        self._queue: deque[Text] = _NOTHING_QUEUED
        self.queued_bytes = 0
        # the writer waits for a message; senders wait for room (parking lots: a wake-up with
        # nobody waiting costs nothing, and the writer is not woken when room is made)
        self._readable = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._closed = False
        self.direct: Callable[[Text], Awaitable[None]] | None = None
        #: a message is being written by :attr:`direct` (the writer leaves the queue alone)
        self._direct_busy = False
        self.wake: Callable[[], None] | None = None
        self.defer: Callable[[Text], bool] | None = None
        #: the writer's connection failed: what is queued will not be written (:meth:`flushed`)
        self._abandoned = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def writing(self) -> bool:
        """Whether a message is being written by :attr:`direct` now."""
        return self._direct_busy

    def _has_room(self, nbytes: int) -> bool:
        if not self._queue:
            return True
        return len(self._queue) < self.max_count and self.queued_bytes + nbytes <= self.max_bytes

    def _append(self, text: Text) -> None:
        if self._queue is _NOTHING_QUEUED:
            self._queue = deque()
        self._queue.append(text)
        self.queued_bytes += len(text)
        self.ledger.add(len(text))

    # (each wake-up below is skipped when nobody waits: unparking an empty lot costs ≈ 0.8 µs,
    # and most puts, writes and closes have nobody to wake)
    def _push(self, text: Text) -> None:
        self._append(text)
        if self._readable:
            self._readable.unpark_all()
        elif self.wake is not None and not self._direct_busy:
            self.wake()

    async def wait_room(self, nbytes: int) -> None:
        """Wait until ``nbytes`` fit (the writer's progress bounds the wait).

        Raises:
            trio.ClosedResourceError: the outbox was closed.
        """
        while not self._closed and not self._has_room(nbytes):
            await self._room.park()
        if self._closed:
            raise trio.ClosedResourceError("the connection is closing")

    async def put(self, text: Text, *, direct: bool = False) -> None:
        """Queue ``text``, waiting for room.

        Args:
            text: the message.
            direct: write it from this task when nothing is queued and the door allows it
                (:attr:`direct`). Only for a task that may block until the peer reads: a call's
                responder, not the connection's reader, which keeps reading while the outbox
                has room.
                A door that defers answers (:attr:`defer`) may instead leave it queued for
                its write at the scheduler round's end: then this returns at once.

        Raises:
            trio.ClosedResourceError: the outbox was closed (or, writing it directly, the
                connection went).
        """
        await self.wait_room(len(text))
        if direct and self.defer is not None and not self._direct_busy and self.defer(text):
            self._append(text)  # (written at the round's end with the others: no wake)
            return
        if not direct or self.direct is None or self._queue:
            self._push(text)
            return
        self._append(text)
        self._direct_busy = True
        try:
            await self.direct(text)
        finally:
            self._direct_busy = False
            if self._queue and self._queue[0] is text:  # (unless close(drop=True) dropped it)
                self.written()
            if (self._queue or self._closed) and self._readable:
                self._readable.unpark_all()  # what queued behind it, or the end
            elif self._queue and self.wake is not None:
                self.wake()  # what queued behind it

    def full(self) -> bool:
        """Whether no message at all would be queued now (closed, or at its count or bytes):
        an advisory message is dropped before it is even encoded."""
        if self._closed:
            return True
        if not self._queue:
            return False
        return len(self._queue) >= self.max_count or self.queued_bytes >= self.max_bytes

    def put_nowait(self, text: Text) -> bool:
        """Queue ``text`` if it fits now; returns False (nothing queued) if not."""
        if self._closed or not self._has_room(len(text)):
            return False
        self._push(text)
        return True

    async def get(self) -> Text:
        """The oldest message, waiting for one; the caller calls :meth:`written` after sending.

        Raises:
            trio.EndOfChannel: closed and empty.
        """
        while not self._queue or self._direct_busy:
            if self._closed and not self._queue:
                raise trio.EndOfChannel
            await self._readable.park()
        return self._queue[0]

    def next(self) -> Text | None:
        """The oldest message, for a writer started by :attr:`wake` (it calls :meth:`written`
        once it is sent); ``None`` when nothing is queued, or a direct write holds the queue
        (then :attr:`wake` is called again when it ends, if anything queued behind it)."""
        if not self._queue or self._direct_busy:
            return None
        return self._queue[0]

    def abandon(self) -> None:
        """The writer's connection failed: nothing queued will be written (:meth:`flushed`
        waits no more for it). What is queued stays charged until :meth:`close` drops it."""
        self._abandoned = True
        if self._room:
            self._room.unpark_all()

    async def flushed(self) -> None:
        """Wait until everything queued was written (also a direct write: its message stays
        queued while it is written), dropped (:meth:`close` with ``drop``) or abandoned. Only
        once the outbox is closed (nothing more is queued meanwhile); the caller bounds it."""
        while self._queue and not self._abandoned:
            await self._room.park()

    def written(self, count: int = 1) -> None:
        """The message :meth:`get` returned (or the first ``count`` of :meth:`queued`) was
        sent: drop them and refund their bytes."""
        queue = self._queue
        nbytes = 0
        for _ in range(min(count, len(queue))):
            nbytes += len(queue.popleft())
        if not queue:
            self._queue = _NOTHING_QUEUED  # (an idle session holds no block of its own)
        self.queued_bytes -= nbytes
        self.ledger.add(-nbytes)
        if self._room:
            self._room.unpark_all()

    def queued(self) -> list[Text]:
        """Every message queued now, oldest first (a writer that sends several in one write
        calls :meth:`written` with their count once they are sent)."""
        return list(self._queue)

    def close(self, *, drop: bool) -> None:
        """No more messages. With ``drop``, forget (and refund) what is queued; otherwise the
        writer sends what is queued and then sees the end."""
        self._closed = True
        if drop:
            self.ledger.add(-self.queued_bytes)
            self._queue = _NOTHING_QUEUED
            self.queued_bytes = 0
        if self._readable:
            self._readable.unpark_all()
        if self._room:
            self._room.unpark_all()


class ProgressStream(trio.abc.HalfCloseableStream):
    """A stream that writes in :data:`CHUNK_BYTES` chunks and calls ``on_progress`` after each
    one that more chunks of the same write follow.

    Reads return what was given back with :meth:`unread` first; everything else is passed to
    the wrapped stream unchanged — except the peer's end: a read that finds the end of stream
    or a reset first waits for the connection's :attr:`turn` to be torn down, when it has one
    (:mod:`exai.server.endings`) — and while the stream is held (:meth:`hold`): a read that
    finds nothing given back waits for :meth:`release` before it reads the wrapped stream.
    """

    #: a read found the peer's end of stream (its FIN: it sends nothing more, but may still
    #: read — a half-close — or may have gone; set on the connection's last read, so a class
    #: attribute until then: nothing more held per idle connection)
    peer_ended = False

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.on_progress: Callable[[], None] | None = None
        #: set by the listener once the connection is admitted to a door
        self.turn: EndingTurn | None = None
        self._unread = b""
        #: while held (:meth:`hold`): the event :meth:`release` sets and the bytes it gives back
        self._held: tuple[trio.Event, bytes] | None = None
        #: the last read from the socket came back short: the next one waits before it reads
        self._drained = False
        #: a write ended part-way: nothing more is written (:meth:`send_all`)
        self.cut = False
        #: the rest of a write the socket took part of (:meth:`keep`): the next write's first
        self._kept: memoryview | None = None
        # the socket of a plain TCP stream, which keeps no bytes of its own (never under TLS,
        # whose bytes must go through its stream); trio makes every socket non-blocking, and a
        # socket found blocking is never written to directly
        self._socket: trio.socket.SocketType | None = None
        if type(inner) is trio.SocketStream:
            fd = inner.socket.fileno()
            if fd >= 0 and not os.get_blocking(fd):
                self._socket = inner.socket

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Hand ``data`` to a plain TCP stream's non-blocking socket without waiting: how many
        bytes it took — all of them when its send buffer has room, fewer or none when not (the
        caller sends the rest with :meth:`send_all`); always 0 for any other stream (TLS).

        Never blocks and never yields to the scheduler. The caller must be the stream's only
        writer at that moment (what :meth:`send_all` also asks).

        Raises:
            trio.BrokenResourceError: the peer went away (the socket's error).
        """
        sock = self._socket
        if sock is None or self.cut or self._kept is not None:
            return 0  # (send_all says why, for a cut stream; sends what is kept first)
        fd = sock.fileno()
        if fd < 0:
            return 0  # closed: send_all says so
        try:
            return os.write(fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    @property
    def plain(self) -> bool:
        """Whether :meth:`send_nowait` can hand bytes to the socket (plain TCP, not TLS)."""
        return self._socket is not None

    @property
    def kept(self) -> bool:
        """Whether the rest of a write is kept (:meth:`keep`) for the next :meth:`send_all`."""
        return self._kept is not None

    def keep(self, rest: bytes | bytearray | memoryview) -> None:
        """The socket took only part of what :meth:`send_nowait` handed it: ``rest`` goes first
        in the next :meth:`send_all` (which ``send_all(b"")`` sends alone); meanwhile
        :meth:`send_nowait` hands nothing to the socket. The caller holds the stream's writing
        turn (no other write may come between) and makes sure some writer follows."""
        if rest:
            self._kept = memoryview(rest)

    def unread(self, data: bytes) -> None:
        """Give ``data`` back: the next reads return it before anything from the stream (the
        listener read a request head before it knew which door it was for)."""
        self._unread = data + self._unread

    def hold(self, rest: bytes = b"") -> None:
        """Hold the stream until :meth:`release`: a read that finds nothing given back with
        :meth:`unread` waits instead of reading the wrapped stream, and ``rest`` is given back
        at the release, after what is given back then.

        The WebSocket door's upgrade: the listener read the request head — and, in the same
        reads, whatever the client sent past it (RFC 6455 lets a client send its first frames
        right behind the upgrade request) — and gives back the head alone. The connection's
        reader reads it and then the next bytes, which must not reach wsproto before the
        upgrade is answered: its HTTP/1.1 state keeps bytes read past the request to itself
        and the WebSocket connection the answer makes starts without them, so those frames
        were lost (:meth:`~exai.server.wsconn.ServerConnection._accept` releases the stream
        once the upgrade is answered; a refused upgrade never reads on)."""
        self._held = (trio.Event(), rest)

    def release(self) -> None:
        """End :meth:`hold`: what it held is given back (read next) and a read waiting on it
        goes on."""
        held = self._held
        if held is not None:
            self._held = None
            event, rest = held
            if rest:
                self._unread += rest
            event.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` in chunks (see the class). A write that ends part-way — cancelled (a
        send deadline), or failed — cuts the stream: every later write raises
        :exc:`trio.ClosedResourceError`, so nothing (a close frame, say) follows a cut frame
        on the wire, where the peer would read it as the rest of the frame. A write cancelled
        before it began cuts nothing.

        Raises:
            trio.ClosedResourceError: an earlier write was cut (or as the wrapped stream's).
        """
        if self.cut:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("an earlier write was cut part-way")
        view = memoryview(data)
        if not view and self._kept is None:
            await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint_if_cancelled()  # (cancelled before it began)
        try:
            kept = self._kept
            if kept is not None:
                # the rest of a write the socket took part of (keep): on the wire before these
                self._kept = None
                await self._send_chunks(kept)
                if view and self.on_progress is not None:
                    self.on_progress()
            await self._send_chunks(view)
        except BaseException:
            # (a write cancelled while it waited for room before its first byte went is
            # counted as cut too: its peer was reading nothing then)
            self.cut = True
            raise

    async def _send_chunks(self, view: memoryview) -> None:
        for start in range(0, len(view), CHUNK_BYTES):
            if start and self.on_progress is not None:
                # a chunk went and more follow (progress after the last one would renew
                # the deadline of a write that is over: ≈ 2 µs for each one-chunk answer)
                self.on_progress()
            await self.inner.send_all(view[start : start + CHUNK_BYTES])

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The next bytes, as the wrapped stream's ``receive_some``. On a plain TCP stream whose
        last read came back short (fewer bytes than asked: the socket had no more then), the
        read waits until the socket is readable and then reads
        (:meth:`receive_when_readable`) instead of trying first a read that finds nothing: a
        WebSocket connection's reader reads one message and asks for the next, which is not
        there yet — a ``recv`` returning ``EAGAIN`` and trio's wrapping of it per message
        (issue 18, part 8). Bytes already in the socket are read in the next scheduler round.
        While the stream is held (:meth:`hold`), a read with nothing given back waits for the
        release first."""
        held = self._held
        if held is not None and not self._unread:
            await held[0].wait()
        if self._drained and self._socket is not None and not self._unread:
            size = DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes
            if size < 1:
                raise ValueError("max_bytes must be >= 1")
            got = await self.receive_when_readable(size)
            self._drained = len(got) < size
            return got
        if self._unread:
            n = len(self._unread) if max_bytes is None else max_bytes
            data, self._unread = self._unread[:n], self._unread[n:]
            await trio.lowlevel.checkpoint()
            return data
        try:
            got = await self.inner.receive_some(max_bytes)
        except trio.BrokenResourceError:
            if self.turn is not None:
                await self.turn.take()
            raise
        if not got:
            if self.turn is not None:
                await self.turn.take()
            self.peer_ended = True
        self._drained = 0 < len(got) < (DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes)
        return got

    async def receive_when_readable(self, max_bytes: int) -> bytes | bytearray:
        """:meth:`receive_some` for a read that expects to wait (a disconnect watch while a call
        runs): on a plain TCP stream it waits until the socket is readable and then reads,
        instead of first trying a read that finds nothing (a ``recv`` returning ``EAGAIN`` and
        trio's wrapping of it, ≈ 4 µs a call on the HTTP door, issue 18). Any other stream, or
        bytes given back with :meth:`unread`: :meth:`receive_some`. Always yields (a
        checkpoint: cancelled, it raises :exc:`trio.Cancelled`), also when it raises at once.

        Raises:
            trio.BrokenResourceError: the peer reset the connection (after the connection's
                turn, as :meth:`receive_some`).
            trio.ClosedResourceError: the stream was closed.
        """
        sock = self._socket
        if sock is None or self._unread or self._held is not None:
            return await self.receive_some(max_bytes)
        while True:
            # a socket closed before the wait has no descriptor (-1): trio would register a wait
            # for -1, fail on it with a ValueError and leave the registration behind, so every
            # later wait on a closed socket got ``BusyResourceError`` (another task's)
            if sock.fileno() < 0:
                # (raising at once, it is still a checkpoint: a loop of such reads can be
                # cancelled and lets the other tasks run)
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError("the socket was closed")
            await trio.lowlevel.wait_readable(sock)
            fd = sock.fileno()  # (again after the wait: closed meanwhile is -1, never reused)
            if fd < 0:
                raise trio.ClosedResourceError("the socket was closed")
            try:
                got = os.read(fd, max_bytes)
            except (BlockingIOError, InterruptedError):
                continue  # (woken with nothing to read after all)
            except OSError as exc:
                if self.turn is not None:
                    await self.turn.take()
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            if not got:
                if self.turn is not None:
                    await self.turn.take()
                self.peer_ended = True
            return got

    async def send_eof(self) -> None:
        if isinstance(self.inner, trio.abc.HalfCloseableStream):
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def send_pieces(
    stream: trio.abc.SendStream, head: bytes, parts: Iterable[bytes], tail: bytes = b""
) -> None:
    """Write ``head``, each of ``parts`` (a large message's :class:`~exai.server.pieces.Pieces`,
    or their framing), then ``tail``: one ``send_all`` a piece (the first with ``head``), each
    a step of its own, so no step copies or writes the whole message. On a
    :class:`ProgressStream`, each piece written is progress (its ``on_progress``), as each
    chunk of one write is. A message begun and not written to its end (cancelled between two
    pieces, or a piece's write failed) cuts a :class:`ProgressStream` as a write cut part-way
    does (:meth:`ProgressStream.send_all`): nothing follows the cut message on the wire."""
    first = True
    try:
        for part in parts:
            if first:
                await stream.send_all(head + part)
                first = False
            else:
                progress = getattr(stream, "on_progress", None)
                if progress is not None:
                    progress()
                await stream.send_all(part)
        if first:
            await stream.send_all(head + tail)
        elif tail:
            await stream.send_all(tail)
    except BaseException:
        # (a piece's own write cut part-way has cut it already; one cancelled before it
        # began, at the next piece's start, cuts nothing by itself, but the message is cut)
        if not first and isinstance(stream, ProgressStream):
            stream.cut = True
        raise
