"""The provider client's HTTP/1.1 transport: a bounded keep-alive connection pool.

:class:`H11Pool` holds the keep-alive connections to one origin (a provider's base URL) and sends
one request at a time on each; :meth:`H11Pool.request` returns a :class:`Response` as soon as its
head has arrived, and its body is read from :meth:`Response.aiter_bytes`. Failures are raised
as **httpx's** exceptions (``ConnectError``, ``ConnectTimeout``, ``WriteError``,
``WriteTimeout``, ``PoolTimeout``, ``ReadError``, ``RemoteProtocolError``, ``DecodingError``), so
:func:`exai.providers.client.map_transport_error` maps them exactly as before: httpx stays the
error vocabulary and the API of the provider client (a test still injects an
``httpx.AsyncBaseTransport``), this module is the fast path under it.

Why our own pool (issue 18). CPU per streamed ``POST /chat/completions`` (about 11 SSE events,
every byte read), 64 concurrent requests in one trio process against the mock upstream in
another, every variant in the same run, 3 interleaved rounds (``.venv/bin/python -m benchmarks
run http_client --full``, 2026-11-30, a shared 2-CPU VM at load 3–7; the run and the machine in
``benchmarks/README.md``, section *http_client*)::

    one httpx.AsyncClient, pool of 64                          4.36 ms  (issue 18 saw 13.5)
    8 httpx clients of 16, least busy first (exai before)      1.56 ms
    64 httpx clients of one connection each                    0.88 ms
    httpx.AsyncClient over this pool (an AsyncBaseTransport)   0.70 ms
    this pool, used directly                                   0.36 ms
    OpenAIClient.chat, streamed, SSE decoded: before → now     1.91 → 0.55 ms

The direct use is what :class:`~exai.providers.client.OpenAIClient` does for every request to a
real provider. httpx's client costs ≈ 0.35 ms of CPU per request on top of any transport
(request and response models, header copies, the auth and redirect machinery, the decoder
stack, event hooks): machinery a provider client that sends two kinds of request does not
need. httpcore's pool costs the rest: its per-request scan of every connection (quadratic in
the pool size under load, the reason for the shards) and its locks. This pool is O(1) per
request: a FIFO semaphore for the slots and a LIFO stack of idle connections.

HTTP/1.1 itself is :mod:`exai.providers.wire` (sans-IO, written for this client) since issue
18's second part; before, h11. Same benchmark, one round each tree, 3 × 6 s, load ≈ 3
(``EXAI_BENCH_HTTP_VARIANTS=h11pool,openai_client .venv/bin/python -m benchmarks run
http_client --full`` in each tree)::

    this pool, used directly:                 over h11 0.305 ms → own reader 0.236 ms
    OpenAIClient.chat, streamed, SSE decoded: over h11 0.435 ms → own reader 0.360 ms

h11 makes an event object and steps its state machine for each chunk of a body, and validates
every request header on every send; the reader takes every body byte one read delivered in one
pass, the pool's own headers are checked once, and so is each distinct request head (a provider
client sends the same few: :meth:`H11Pool._head`). What it accepts and rejects is h11's, held by
differential tests (hypothesis: the same bytes split anywhere, into both); aiohttp through
trio-asyncio measured 0.9 ms in issue 18 and would put an asyncio loop on the provider path.

On plain TCP (no TLS) a connection's socket is read and written directly: a read waits for the
socket to be readable, then reads (the stream tries the read first, and the bytes are almost
never there yet: a failed system call and an exception per read); a request is offered to the
socket at once and only what it does not take goes through the stream under the write bound.
Same benchmark, both trees twice, interleaved (load ≈ 4): the pool 0.226 / 0.239 → 0.202 /
0.192 ms, ``OpenAIClient.chat`` 0.366 / 0.381 → 0.340 / 0.320 ms. TLS connections go through
the TLS stream as before.

Connecting. Plain TCP to an IP address (a local server, a sidecar, the benchmarks' mock) is
connected by the requesting task itself: a non-blocking ``connect``, then a second one, which
says how the first went (on loopback the handshake is over when ``connect`` returns, almost
always), and a wait for the socket to become writable and ``SO_ERROR`` only when it is not yet
connected; its stream (anyio's and trio's
wrappers and a ``getpeername``) is made only if a write needs it, since reads and most writes go
to the socket directly. ``anyio.connect_tcp`` — kept for host names, whose addresses it tries in
turn (happy eyeballs), and for TLS — parses the address, opens a task group, starts a task per
address, waits on an event under a timer and cancels the group. A call that finds no idle
connection pays for a connect, so a storm pays for one per call: in *slow_upstream*'s intake
(2,000 calls at once, py-spy on the daemon) connecting took 24 % of the loop's time (≈ 0.11 ms a
connection), now 15 % of less (≈ 0.05 ms, most of it the ``connect`` and ``socket`` system
calls — on loopback ``connect`` also runs the server's half of the handshake); the daemon's CPU
per request while the calls come in ≈ 0.47 → 0.33 ms (``benchmarks/README.md``, *Part 6*).

Resource handling:
    At most ``max_connections`` connections exist at once (idle ones included). A request
    holds one slot from :meth:`H11Pool.request` until its :meth:`Response.aclose`; a request
    waiting for a slot waits first-in, first-out, for at most ``pool_timeout_s``. A connection
    goes back to the pool only when its response was read to the end and both sides keep it
    alive; in every other case — an exception, a cancellation, a body left unread — it is
    closed at once, so the upstream sees the request end and stops generating. Idle
    connections are closed after ``keepalive_expiry_s`` and when the server has closed them
    (checked before each reuse: a readable idle socket means EOF or junk). Closing the pool
    closes its idle connections, and every connection in use when its response is closed.

Error handling:
    Connecting (DNS, TCP, TLS handshake) is bounded by ``connect_timeout_s``
    (``httpx.ConnectTimeout``; refused, unreachable or a bad certificate: ``ConnectError``);
    writing the request by ``write_timeout_s`` (``WriteTimeout``, a broken socket
    ``WriteError``); the wait for a slot by ``pool_timeout_s`` (``PoolTimeout``). A failed
    request lets the other tasks run once before it raises, even when it found its failure
    without waiting (on loopback a refused connect fails inside ``connect``): a caller that
    tries again at once cannot hold the loop, and its deadline still fires. Reading is
    bounded by the caller (the provider client's stall bound and the call's deadline, both
    cancel scopes): a cancelled read closes the connection. A request whose write fails on a
    *reused* connection (the server closed it while idle) was not sent, and is sent again,
    once, on a new connection; a request that was written is never sent twice by this module
    (the provider layer's retry policy decides). A response that is not HTTP/1.1 we can parse
    is ``RemoteProtocolError`` (a head over :data:`MAX_HEAD_BYTES`, more than
    :data:`MAX_INFORMATIONAL` 1xx heads, a connection ended inside the body); a body that
    does not decompress is ``DecodingError``.

    Decompression (``gzip``, ``deflate``) hands out at most :data:`PIECE_BYTES` at a time, so a
    small compressed body cannot expand into one huge buffer: the caller's byte bounds see
    every piece.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import ssl
import urllib.parse
import zlib
from collections import deque
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import httpx

from exai.providers.wire import Head, ProtocolError, ResponseReader, check_header, request_bytes
from exai.resilience import loop as aio

__all__ = ["H11Pool", "Pacer", "PoolStatistics", "Response"]

#: bytes asked of the socket per read
READ_BYTES = 64 * 1024
#: the largest response head (status line and headers) accepted
MAX_HEAD_BYTES = 100 * 1024
#: the most informational (1xx) responses accepted before the response (``100 Continue``,
#: ``103 Early Hints``: one or two in practice)
MAX_INFORMATIONAL = 16
#: the most bytes a decompressed piece of a body holds
PIECE_BYTES = 64 * 1024
#: request heads a pool keeps, checked and written (:meth:`H11Pool._head`); past it the cache
#: starts over (and it is dropped when the provider's key changes: :meth:`H11Pool.forget_heads`)
MAX_CACHED_HEADS = 64
#: ``socket.SOCK_NONBLOCK`` where the system has it (Linux), else 0
_SOCK_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)



class Pacer(Protocol):
    """A turn-taker (:class:`exai.server.pacing.RoundPacer`, or its ``reads`` lane):
    ``try_turn()`` says whether a turn is had at once, without yielding; else ``await turn()``
    waits for one."""

    def try_turn(self) -> bool: ...

    async def turn(self) -> None: ...


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool: connections open (idle ones included), idle, requests holding a
    slot, requests waiting for one."""

    connections: int
    idle: int
    in_use: int
    waiting: int
    max_connections: int


class _Conn:
    """One connection: its stream, the reader of its current response and when it went idle."""

    __slots__ = ("idle_since", "plain", "raw", "reader", "requests", "stream")

    def __init__(
        self, stream: anyio.abc.ByteStream | None, raw: socket.socket | None, *, plain: bool = False
    ) -> None:
        #: ``None`` for a plain connection until a write needs it (:meth:`byte_stream`)
        self.stream = stream
        self.raw = raw
        #: the socket itself, when the connection is plain TCP (no TLS): read and written
        #: directly (see :func:`_fill`)
        self.plain = raw if plain else None
        self.reader = ResponseReader(MAX_HEAD_BYTES)
        self.idle_since = 0.0
        self.requests = 0

    async def byte_stream(self) -> anyio.abc.ByteStream:
        """The connection's stream (a plain connection's made on first use: most never need it).

        Raises:
            OSError: the socket is no longer connected.
        """
        if self.stream is None:
            assert self.raw is not None
            try:
                self.stream = await anyio.abc.SocketStream.from_socket(self.raw)
            except ValueError as exc:  # (its peer has gone: not connected any more)
                raise OSError(errno.ENOTCONN, "the connection is closed") from exc
        return self.stream

    async def aclose(self) -> None:
        """Close it now, whatever its state: a stream forcefully; a bare socket after waking
        whoever waits on it (as closing its stream would)."""
        if self.stream is not None:
            await anyio.aclose_forcefully(self.stream)
        elif self.raw is not None:
            anyio.notify_closing(self.raw)
            self.raw.close()

    def dead(self) -> bool:
        """Whether an idle connection was closed by the server (or sent something unasked)."""
        sock = self.raw
        if sock is None:
            return False
        try:
            if sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class H11Pool:
    """Keep-alive HTTP/1.1 connections to one origin, at most ``max_connections`` of them.

    Use as an async context manager; leaving it closes every idle connection.

    Args:
        base_url: ``http://`` or ``https://`` host, port and path prefix; requests name a
            target relative to it.
        max_connections: connections open at once (idle ones included); also the number of
            requests in flight.
        connect_timeout_s: bound of one connect (name resolution, TCP, TLS handshake).
        write_timeout_s: bound of writing one request.
        pool_timeout_s: bound of the wait for a free connection slot (``None``: the caller's).
        keepalive_expiry_s: an idle connection older than this is closed instead of reused.
        ssl_context: the TLS context for ``https``; ``None`` builds the system default.
        headers: sent with every request (``user-agent``); a request's own headers add to them.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
        write_timeout_s: float,
        pool_timeout_s: float | None = None,
        keepalive_expiry_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {base_url!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.tls = scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = (host if default_port else f"{host}:{self.port}").encode("ascii")
        self._prefix = parts.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.write_timeout_s = write_timeout_s
        self.pool_timeout_s = pool_timeout_s
        self.keepalive_expiry_s = keepalive_expiry_s
        self._ssl_context = ssl_context
        #: plain TCP to an IP address: its socket address, found once (no name to resolve)
        self._sockaddr = None if self.tls else _numeric_address(self.host, self.port)
        fixed = [(b"host", self._host_header)] + [
            (k.lower().encode("ascii"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]
        for name, value in fixed:
            try:
                check_header(name, value)
            except ProtocolError as exc:
                raise ValueError(str(exc)) from None
        # the pool's own header lines, checked once and written as they are on every request
        self._head_lines = b"".join(name + b": " + value + b"\r\n" for name, value in fixed)
        #: request heads already written and checked, by method, path and headers (see
        #: :meth:`_head`)
        self._heads: dict[tuple[Any, ...], bytes] = {}
        self._slots = anyio.Semaphore(max_connections, fast_acquire=True)
        self._idle: deque[_Conn] = deque()
        self._open = 0
        self._closed = False
        #: connections opened, reused requests, requests sent again after a stale connection
        self.connects = 0
        self.reuses = 0
        self.resends = 0
        #: whose turn every read takes once its bytes are there, before they are taken in
        #: (the daemon's :class:`~exai.server.pacing.RoundPacer`'s ``reads`` lane: many
        #: answers arriving at once are taken in bites); ``None``: none
        self.pace: Pacer | None = None

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> H11Pool:
        if self.tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        idle, self._idle = self._idle, deque()
        for conn in idle:
            await self._discard(conn)

    def statistics(self) -> PoolStatistics:
        """Connections, idle connections, requests holding a slot and requests waiting."""
        stats = self._slots.statistics()
        return PoolStatistics(
            connections=self._open,
            idle=len(self._idle),
            in_use=self.max_connections - self._slots.value,
            waiting=stats.tasks_waiting,
            max_connections=self.max_connections,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<H11Pool {'https' if self.tls else 'http'}://{self._host_header.decode()} "
            f"connections={s.connections}/{s.max_connections} idle={s.idle} "
            f"in_use={s.in_use} waiting={s.waiting}>"
        )

    # -- one request --------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
    ) -> Response:
        """Send ``method`` ``path`` (relative to the base URL) and wait for the response head.

        The caller must :meth:`Response.aclose` the response (``async with`` does): until then
        it holds a connection slot.

        Raises:
            httpx.PoolTimeout, httpx.ConnectTimeout, httpx.ConnectError, httpx.WriteTimeout,
            httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError: see the module
            docstring. ``RuntimeError`` once the pool is closed.
        """
        if self._closed:
            raise RuntimeError("the HTTP pool is closed")
        # (made, and cached, in the step its headers were built — before any wait: made after
        # the wait for a connection, a head built with a key rotated meanwhile went back into
        # the cache that the rotation had cleared, :meth:`forget_heads`)
        head = self._head(method, path, headers)
        await self._acquire()
        conn: _Conn | None = None
        try:
            if body or method not in ("GET", "HEAD"):
                head = b"%bcontent-length: %d\r\n\r\n" % (head, len(body))
            else:
                head += b"\r\n"
            conn = await self._take_idle()
            if conn is not None:
                self.reuses += 1
                if not await self._send(conn, head, body, reused=True):
                    # the server closed the idle connection: nothing was sent; once more, anew
                    await self._discard(conn)
                    conn = None
                    self.resends += 1
            if conn is None:
                conn = await self._connect()
                await self._send(conn, head, body, reused=False)
            response = await self._receive_head(conn)
        except BaseException as exc:
            if conn is not None:
                await self._discard(conn)
            self._slots.release()
            if isinstance(exc, Exception):
                # A failure found without waiting (a refused connect on loopback fails inside
                # ``connect``) still lets the other tasks run once: a caller that tries again
                # at once would otherwise hold the loop, its own deadline never noticed.
                await anyio.lowlevel.cancel_shielded_checkpoint()
            raise
        return response

    def forget_heads(self) -> None:
        """Drop every cached request head (:meth:`_head`): they hold the headers they were sent
        with, a provider's key among them, so its owner calls this when the key changes."""
        self._heads.clear()

    def _head(self, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
        """The request head up to its framing (``Content-Length`` and the blank line are the
        caller's), from :attr:`_heads` when an equal request was sent before: a provider
        client sends the same few heads over and over (its method, path, accept, content type
        and key), which are then checked once, not once per request.

        Raises:
            httpx.LocalProtocolError: a header or the target may not be sent (nothing cached).
        """
        key = (method, path, *headers)
        head = self._heads.get(key)
        if head is not None:
            return head
        target = (self._prefix + "/" + path.lstrip("/")).encode("ascii")
        try:
            head = request_bytes(method.encode("ascii"), target, self._head_lines, headers)
        except ProtocolError as exc:  # a header value with a line break...
            raise httpx.LocalProtocolError(f"the request cannot be sent: {exc}") from None
        head = head[:-2]  # (its blank line: the framing goes before it)
        if len(self._heads) >= MAX_CACHED_HEADS:
            self._heads.clear()  # (a key rotated many times, say: start over, never grow)
        self._heads[key] = head
        return head

    async def _acquire(self) -> None:
        await aio.checkpoint_if_cancelled()
        try:
            self._slots.acquire_nowait()
            return
        except anyio.WouldBlock:
            pass
        if self.pool_timeout_s is None:
            await self._slots.acquire()
            return
        with aio.cancel_scope(deadline=aio.current_time() + self.pool_timeout_s) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            raise httpx.PoolTimeout(
                f"no free connection within {self.pool_timeout_s:g}s "
                f"({self.max_connections} in use)"
            )

    async def _take_idle(self) -> _Conn | None:
        """The most recently used live idle connection; expired or dead ones are closed."""
        idle = self._idle
        if not idle:
            return None
        now = aio.current_time()
        expiry = self.keepalive_expiry_s
        # the oldest idle connection expires first: close it while we are here
        if len(idle) > 1 and now - idle[0].idle_since > expiry:
            await self._discard(idle.popleft())
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > expiry or conn.dead():
                await self._discard(conn)
                continue
            return conn
        return None

    async def _discard(self, conn: _Conn) -> None:
        """Close a connection now, whatever its state; never waits (shielded, forceful)."""
        self._open -= 1
        with aio.cancel_scope(shield=True):
            await conn.aclose()

    async def _connect(self) -> _Conn:
        self._open += 1
        conn: _Conn | None = None
        try:
            with aio.cancel_scope(deadline=aio.current_time() + self.connect_timeout_s):
                if self._sockaddr is not None:
                    conn = await self._connect_address(*self._sockaddr)
                else:
                    conn = await self._connect_by_name()
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            self._open -= 1
            raise httpx.ConnectError(f"cannot connect ({type(exc).__name__}: {exc})") from exc
        except BaseException:
            self._open -= 1
            raise
        if conn is None:  # the connect bound passed (our scope caught its cancellation)
            self._open -= 1
            raise httpx.ConnectTimeout(f"no connection within {self.connect_timeout_s:g}s")
        self.connects += 1
        return conn

    async def _connect_address(self, family: int, sockaddr: tuple[Any, ...]) -> _Conn:
        """Plain TCP to an IP address: the socket connected in this task (see the module
        docstring, *Connecting*); the socket is closed on any failure or cancellation."""
        # (non-blocking from its creation where the system can: no system call to make it so)
        sock = socket.socket(family, socket.SOCK_STREAM | _SOCK_NONBLOCK)
        try:
            if not _SOCK_NONBLOCK:
                sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
            if err == errno.EINPROGRESS:
                # On loopback the handshake is over when connect returns, almost always: then a
                # second connect says so in one system call (Linux: 0 once established, the
                # failure if it failed, EALREADY while it goes on; EISCONN elsewhere), without
                # registering the socket for one wake-up (a poll and an SO_ERROR read before).
                err = sock.connect_ex(sockaddr)
                if err == errno.EISCONN:
                    err = 0
                elif err in (errno.EALREADY, errno.EINPROGRESS):
                    await anyio.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        # (its stream is made only if a write needs it: see :meth:`_Conn.byte_stream`)
        return _Conn(None, sock, plain=True)

    async def _connect_by_name(self) -> _Conn:
        """A host name (resolved, its addresses tried by anyio's happy eyeballs) or TLS."""
        if self.tls:
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                self.host,
                self.port,
                ssl_context=self._ssl_context,
                tls_hostname=self.host,
                tls_standard_compatible=False,
            )
        else:
            stream = await anyio.connect_tcp(self.host, self.port)
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        with contextlib.suppress(OSError):
            if raw is not None:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(stream, raw, plain=not self.tls)

    async def _send(self, conn: _Conn, head: bytes, body: bytes, *, reused: bool) -> bool:
        """Write the request; False when a reused connection turned out closed (not sent)."""
        # A small body goes out with the head in one write; a large one is handed to the
        # socket as it is (never copied on the loop).
        writes = [head + body] if len(body) <= PIECE_BYTES else [head, body]
        conn.reader = ResponseReader(MAX_HEAD_BYTES)
        conn.requests += 1
        sock = conn.plain
        if sock is not None and len(writes) == 1:
            # A small request on plain TCP: the socket (non-blocking) takes it whole at once,
            # almost always; what it does not take goes the usual way, bounded below.
            try:
                sent = sock.send(writes[0])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if reused:
                    return False
                raise httpx.WriteError(f"the connection broke while sending ({exc!r})") from exc
            if sent == len(writes[0]):
                return True
            writes = [writes[0][sent:]]
        try:
            with aio.cancel_scope(deadline=aio.current_time() + self.write_timeout_s) as scope:
                stream = await conn.byte_stream()
                for data in writes:
                    await stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if reused:
                return False
            raise httpx.WriteError(f"the connection broke while sending ({exc!r})") from exc
        if scope.cancelled_caught:
            raise httpx.WriteTimeout(
                f"the request was not written within {self.write_timeout_s:g}s"
            )
        return True

    async def _receive_head(self, conn: _Conn) -> Response:
        reader = conn.reader
        informational = 0
        while True:
            try:
                head = reader.head()
            except ProtocolError as exc:
                raise httpx.RemoteProtocolError(f"the server broke HTTP/1.1: {exc}") from exc
            if head is None:
                await _fill(conn, self.pace)
                continue
            if head.status_code >= 200:
                return Response(self, conn, head)
            # (each 1xx is its own small head: without a count, an endless stream of them
            # keeps the loop parsing until the call's deadline)
            informational += 1
            if informational > MAX_INFORMATIONAL:
                raise httpx.RemoteProtocolError(
                    f"more than {MAX_INFORMATIONAL} informational (1xx) responses"
                )

    def _finished(self, conn: _Conn, reusable: bool) -> bool:
        """Put a connection whose exchange completed back; False when it must be closed."""
        if not reusable or self._closed:
            return False
        reader = conn.reader
        if not reader.done or not reader.keep_alive or reader.leftover or reader.eof:
            return False
        conn.idle_since = aio.current_time()
        self._idle.append(conn)
        return True


def _numeric_address(host: str, port: int) -> tuple[int, tuple[Any, ...]] | None:
    """``(family, socket address)`` when ``host`` is an IP address (no name service asked),
    else ``None``."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    family, _, _, _, sockaddr = infos[0]
    return int(family), sockaddr


async def _fill(conn: _Conn, pace: Pacer | None) -> None:
    """One read from the socket into the connection's parser (EOF included), taking a turn of
    ``pace`` (see :attr:`H11Pool.pace`) once the bytes are there, before they are read.

    On plain TCP the socket is waited for, then read: the reader only asks for more once it has
    taken every byte of the last read, so the bytes are almost never there yet, and trying the
    read first (what the stream does) costs a failed system call and an exception each time.
    """
    sock = conn.plain
    if sock is not None:
        try:
            await aio.wait_readable(sock)
            if pace is not None and not pace.try_turn():
                await pace.turn()
            data = sock.recv(READ_BYTES)
        except BlockingIOError:
            return  # woken without bytes: the caller asks again
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise httpx.ReadError(f"the connection broke while reading ({exc!r})") from exc
        conn.reader.feed(data)
        return
    try:
        data = await (await conn.byte_stream()).receive(READ_BYTES)
        if pace is not None and not pace.try_turn():
            await pace.turn()
    except anyio.EndOfStream:
        data = b""
    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
        raise httpx.ReadError(f"the connection broke while reading ({exc!r})") from exc
    conn.reader.feed(data)


class _Decoder:
    """``gzip`` / ``deflate`` content decoding, lazily, at most :data:`PIECE_BYTES` at a time:
    compressed input is held until its output has been taken, so memory stays bounded by the
    read size plus one piece however much the body expands."""

    __slots__ = ("_head", "_tail", "_z", "encoding")

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._z: Any = zlib.decompressobj(zlib.MAX_WBITS | 16) if encoding == "gzip" else None
        self._head = b""  # deflate: the first bytes, until the format is known
        self._tail = b""

    @property
    def pending(self) -> bool:
        """Whether input is waiting to be decompressed."""
        return bool(self._tail)

    def feed(self, data: bytes) -> None:
        """Take the next compressed bytes (only once :attr:`pending` is false)."""
        if self._z is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return
            self._head = b""
            # RFC 9110 says zlib-wrapped; some servers send raw deflate: the zlib header tells
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._z = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        self._tail = data

    def piece(self) -> bytes:
        """The next piece of output (possibly empty while input is consumed)."""
        try:
            out: bytes = self._z.decompress(self._tail, PIECE_BYTES)
        except zlib.error as exc:
            raise httpx.DecodingError(
                f"the {self.encoding} body does not decompress: {exc}"
            ) from exc
        self._tail = self._z.unconsumed_tail
        return out

    def flush(self) -> bytes:
        """What the decompressor still holds once the body ended."""
        if self._z is None:
            return b""
        try:
            out: bytes = self._z.flush()
        except zlib.error as exc:
            raise httpx.DecodingError(
                f"the {self.encoding} body does not decompress: {exc}"
            ) from exc
        return out


class Response:
    """An HTTP response whose head has arrived; read its body, then :meth:`aclose` it.

    Attributes:
        status_code: the HTTP status.
        raw_headers: ``(name, value)`` pairs as bytes, names lower-case.
    """

    __slots__ = (
        "_conn",
        "_decoder",
        "_done",
        "_headers",
        "_open",
        "_pool",
        "raw_headers",
        "status_code",
    )

    def __init__(self, pool: H11Pool, conn: _Conn, head: Head) -> None:
        self._pool = pool
        self._conn = conn
        self.status_code = head.status_code
        self.raw_headers: list[tuple[bytes, bytes]] = head.headers
        self._headers: httpx.Headers | None = None
        self._open = True
        self._done = False
        self._decoder: _Decoder | None = None
        for name, value in self.raw_headers:
            if name == b"content-encoding":
                enc = value.decode("latin-1").strip().lower()
                if enc in ("gzip", "x-gzip"):
                    self._decoder = _Decoder("gzip")
                elif enc == "deflate":
                    self._decoder = _Decoder("deflate")
                elif enc not in ("", "identity"):
                    raise httpx.DecodingError(f"unsupported content-encoding {enc!r}")

    @property
    def ended(self) -> bool:
        """The body has been read to its end."""
        return self._done

    @property
    def headers(self) -> httpx.Headers:
        """The response headers (case-insensitive)."""
        if self._headers is None:
            self._headers = httpx.Headers(self.raw_headers)
        return self._headers

    def aiter_bytes(self) -> _Body:
        """The body, decoded, in pieces (each read coalesces what the socket had)."""
        return _Body(self)

    async def _next_raw(self) -> bytes:
        """The body bytes the connection has (at least one read's worth), b"" at the end."""
        if self._done or not self._open:
            return b""
        conn = self._conn
        reader = conn.reader
        while True:
            try:
                data = reader.body()
            except ProtocolError as exc:
                raise httpx.RemoteProtocolError(f"the server broke HTTP/1.1: {exc}") from exc
            if reader.done:
                self._done = True
                return data
            if data:
                return data
            await _fill(conn, self._pool.pace)

    async def aclose(self) -> None:
        """Give the connection back (body read to the end) or close it (anything else)."""
        if not self._open:
            return
        self._open = False
        pool = self._pool
        try:
            if not pool._finished(self._conn, self._done):
                await pool._discard(self._conn)
        finally:
            pool._slots.release()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Body:
    """The async iterator of a response body (``aclose`` closes the response)."""

    __slots__ = ("_response",)

    def __init__(self, response: Response) -> None:
        self._response = response

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        r = self._response
        while True:
            decoder = r._decoder
            if decoder is not None and decoder.pending:
                piece = decoder.piece()
                if piece:
                    return piece
                continue
            raw = await r._next_raw()
            if decoder is None:
                if raw:
                    return raw
                raise StopAsyncIteration
            if not raw:
                r._decoder = None
                tail = decoder.flush()
                if tail:
                    return tail
                raise StopAsyncIteration
            decoder.feed(raw)

    async def aclose(self) -> None:
        await self._response.aclose()
