"""The Streamable HTTP door: ``POST /mcp`` on the MCP listener, both eras, over the session core.

The listener reads a connection's first request head and, when it is not a WebSocket upgrade,
admits the connection (draining/overloaded, the global and per-IP caps, the per-IP cap of the
deployment: 503 + ``Retry-After``) and hands it here. Each request on it (HTTP/1.1 keep-alive,
one at a time, read by h11 or, when plain, without it: "Cost per request" below) then goes
through, in order, before a byte of its body is read::

    target, origin- or absolute-form (400 for an absolute-form authority not host[:port])
    → Host (421, exai.server.origins) → path /mcp (404) → Origin (403) → one Authorization,
    a valid bearer token (400, 401 with WWW-Authenticate) → method: POST; DELETE ends a
    session; anything else 405
    → draining / overloaded (503 + Retry-After: the body was not read, so a balancer may
    re-send it elsewhere) → Content-Type application/json (415) → Accept (406)
    → Mcp-Session-Id: one, signed, unexpired, this identity's, not ended (400 / 404)
    → MCP-Protocol-Version: one, a version exai speaks, the session's (400)
    → one of Content-Length and Transfer-Encoding (400), within EXAI_MAX_FRAME_BYTES (413)
    → ``100 Continue`` if asked

and its body is read within the same cap (a chunked body too: 413 at the first byte over),
each part charged to the daemon's budget as it arrives (503 ``overloaded`` when it does not fit).

**Eras.** A body carrying the 2026-07-28 ``_meta`` envelope (or a request whose
``MCP-Protocol-Version`` header names that version) is served statelessly: no session, the
routing headers (``MCP-Protocol-Version``, ``Mcp-Method``, ``Mcp-Name``), when sent, must agree
with the body (-32020, 400); a notification is acknowledged with 202. Anything else is the
initialize era: ``initialize`` answers with a new signed ``Mcp-Session-Id``
(:mod:`exai.server.mcp_sessions`), every other message must carry it (400 without), and a
``DELETE`` ends it (204; the session's calls running on this daemon are cancelled, and each
one's request ends with the JSON-RPC error ``session_ended`` for its id — not an empty stream,
which left a client's pending request waiting for its timeout). ``GET`` (a
server-initiated stream) is 405 in both eras.

**Answers.** Each request gets its own :class:`~exai.server.core.SessionCore` — so its
admission, slots, deadline, exactly-once key, progress, cancellation and audit are those of
every door — with the connection's message bucket (``EXAI_SESSION_RATE_PER_S``) and, in the
initialize era, the session's nonce as its id (a request re-sent with the same id in the same
session joins the first). The answer is ``application/json``; a ``tools/call`` whose client
accepts ``text/event-stream`` switches to an SSE stream scoped to that request at its first
progress notification (or, with none, after ``EXAI_HEARTBEAT_INTERVAL_S``, then with a
keep-alive comment each interval, so no proxy idles it out), and ends it with the answer.
JSON-RPC errors are sent with status 200, except: a body that is not one JSON-RPC message
(parse error, batch, bad envelope) is 400, and in the 2026-07-28 era the codes the spec maps to
statuses are (-32602/-32020/-32022 → 400, -32601 → 404).

**Cancellation.** A client that closes its connection while its call runs cancels it (down to
the upstream request) — unless the call carries an idempotency key, which keeps it for a
re-send to join for ``ORPHAN_GRACE_S``, as on WebSocket. Its end of stream (a FIN) is not yet
a close: a client that half-closed (``shutdown(SHUT_WR)`` after its request, as ``nc -N`` and
one-shot scripts do; RFC 9112 §9.6) still reads, so the call is given
:data:`~exai.server.session.PEER_CLOSE_GRACE_S` to answer — an answer it has is written as any,
for as long as the client reads it (the grace bounds the call, not the write)
(``Connection: close`` when it sent no request after it: requests pipelined before the FIN are
each answered in turn, as on a kept connection, the last with ``Connection: close``), and a
client that has gone fails that write — and is cancelled after it; a reset cancels at once.
In the initialize era a ``notifications/cancelled`` posted in the same session cancels the
call it names, on this daemon (with several daemons, the cancellation must reach the daemon
that runs the call: docs/deploy.md). A cancelled call's request is ended without an answer
(an empty SSE stream, or, for a JSON-only client, the error ``cancelled``) — but one its
session's ``DELETE`` cancelled, whose client did not cancel it, with the error
``session_ended`` for its id.

**Writing.** A response after which the door closes the connection (a ``DELETE``, whose body is not
read; a refusal; a draining daemon) says ``Connection: close``. Answers wait in the core's bounded
outbox; a peer that reads nothing for ``EXAI_SEND_TIMEOUT_S`` is disconnected and everything its
request held is freed, as on WebSocket — whatever the write: an answer, an SSE event, a ``202``, a
``204``, a ``100 Continue`` or a refusal (:meth:`HttpConnection._timed`; a client pipelining
notifications and reading none of their 202s held its connection for good). An idle keep-alive
connection is closed after ``EXAI_HTTP_KEEPALIVE_S``. A JSON answer (head and body) is one write,
made by the call's own responder (:attr:`~exai.server.outbox.Outbox.direct`: no hand-off) while
the connection's task reads the connection for a disconnect. An SSE answer is shaped the same
way: each progress notification is handed to the socket by the task that made it (its stream's
head with the first; :meth:`HttpConnection._progress_now`), the answer is written by the
responder with the stream's end, and the connection's task reads the connection — and writes a
keep-alive comment after an interval without a write. No task is started or woken for a write
(issue 18, part 17a: the disconnect-watch task and a wake-up of the connection's task per event
had made a streamed call ≈ 12 % dearer than a JSON one). A write the socket does not take whole
at once (a client that reads slowly, a TLS stream) hands the rest of the stream to the
connection's task, which writes it under the send deadline beside a task that watches for the
disconnect, as every stream was written before (:meth:`HttpConnection._hand_to_stream`). A
request's core is freed when the request ends: nothing of it is left in a reference cycle for
the garbage collector.

**Slow heads.** An idle kept connection is closed after ``EXAI_HTTP_KEEPALIVE_S`` without a
word; once bytes of its next request's head came, that head must be whole within
``EXAI_HANDSHAKE_TIMEOUT_S`` of the first (a bound no byte renews), else it is answered 408
``head_timeout`` and the connection closed — as the listener does for a first head.

**Cost per request** (issue 18; benchmarks/README.md, parts 7 and 10). h11 reads a
connection's first request (the listener's, which may be a WebSocket upgrade); a kept
connection's next request, when it is a plain one all there in the bytes read
(:func:`~exai.server.http11.parse_plain_request`: HTTP/1.1, h11's grammar, one ``Host``, one
``Content-Length`` and its whole body, no ``Transfer-Encoding``/``Expect``/``Upgrade``/
``Connection``), is read without h11 — ≈ 13 µs instead of ≈ 60-75 µs on a loaded VM — and
anything else is given, with every byte read, to a fresh h11 state as before (so chunked bodies,
bodies still arriving and malformed heads keep h11's rules and bounds). The checks above still
come before the body is taken or charged: a plain request's body is only ever one that arrived
with its head. A whole response (a JSON answer, 202, 204, 503) is built without h11
(:func:`~exai.server.http11.whole_response`: the same bytes, ≈ 1.5 µs instead of ≈ 15 µs for
h11's checks and state machine), and so is an SSE stream answering a plain request that the
connection keeps (:func:`~exai.server.http11.chunked_head`); a refusal, and a stream on a
request h11 read, are h11's (a plain request's h11 state is made from its bytes when needed,
:meth:`HttpConnection._h11`). The door keeps h11's rule of one response per request itself
(:meth:`HttpConnection._whole`). The keep-alive bound is the connection scope's deadline,
the token a connection presented is hashed once while the token table stays the same, and the
disconnect watch waits for the socket before it reads
(:meth:`~exai.server.outbox.ProgressStream.receive_when_readable`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import itertools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import h11
import trio

from exai import errors
from exai.config import Settings
from exai.logs import log_event
from exai.resilience import TokenBucket
from exai.server import protocol as p
from exai.server import session as _ws_session
from exai.server.auth import Identity, TokenTable
from exai.server.budget import InboundMeter
from exai.server.core import SessionCore, SessionShared
from exai.server.forwarded import TrustedProxies, client_address
from exai.server.http11 import (
    HEAD_TIMEOUT_MESSAGE,
    LAST_CHUNK,
    LINGER_BYTES,
    LINGER_MAX_BYTES,
    MAX_HEAD_BYTES,
    SERVED_VERSIONS,
    PlainRequest,
    chunk,
    chunked_head,
    json_body,
    linger,
    parse_plain_request,
    read_head,
    reason_phrase,
    request_host,
    route_path,
    send_response,
    skip_empty_lines,
    whole_response,
)
from exai.server.mcp_sessions import McpSession, Revocations, SessionSigner
from exai.server.origins import OriginPolicy
from exai.server.outbox import CHUNK_BYTES, Outbox, ProgressStream, send_pieces
from exai.server.pieces import Pieces, Text, encode_reply_pieces
from exai.server.sessions import SessionTable

__all__ = ["HttpDoor"]

_JSON = ("Content-Type", "application/json")
_SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache, no-transform"),
    ("X-Accel-Buffering", "no"),
]
#: an SSE stream's head on a plain request the connection keeps, as h11 writes it
_SSE_HEAD = chunked_head(200, _SSE_HEADERS)
#: bytes a client may send ahead (a pipelined request) while its call runs: beyond this the
#: door stops reading, and so stops noticing a disconnect, rather than buffer more
_READ_AHEAD_BYTES = 64 * 1024
#: a request body must keep arriving at this many bytes per EXAI_HANDSHAKE_TIMEOUT_S
_BODY_PROGRESS_BYTES = 64 * 1024
_ROUTING_HEADERS = (b"mcp-protocol-version", b"mcp-method", b"mcp-name")
_READ = 64 * 1024
#: a request as read: by h11, or whole by :func:`~exai.server.http11.parse_plain_request`
_AnyRequest = h11.Request | PlainRequest
_request_ids = itertools.count(1)


class _Refused(Exception):
    """A request refused before its body was read (the connection closes after it)."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        unread: int = LINGER_BYTES,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers
        #: how much of the body may still be on its way, read and dropped after the refusal
        self.unread = unread


@attrs.define
class _Exchange:
    """One request's answer as the core encodes it: which text is the final one (the response,
    as opposed to progress) and the error code it carries."""

    final_text: Text | None = None
    code: int | None = None
    #: the request's id (a request's; ``None`` for a notification)
    request_id: Any = None
    #: whether progress is wanted (an SSE answer): a JSON-only client's is dropped unencoded
    progress: bool = True

    def encode(self, msg: dict[str, Any]) -> str | None:
        if not self.progress and "method" in msg:
            return None
        text = p.encode_reply(msg)
        self._note(msg, text)
        return text

    async def encode_large(self, msg: dict[str, Any]) -> Text | None:
        """:meth:`encode` for a large answer: in pieces (:mod:`exai.server.pieces`)."""
        text = await encode_reply_pieces(msg)
        self._note(msg, text)
        return text

    def _note(self, msg: dict[str, Any], text: Text | None) -> None:
        if text is not None and "method" not in msg and "id" in msg:
            self.final_text = text
            err = msg.get("error")
            self.code = err.get("code") if isinstance(err, dict) else None


def _answering(core: SessionCore, exchange: _Exchange) -> bool:
    """Whether the request's call has its answer — being encoded or written (the core's
    ``answering``), or encoded and queued for the SSE stream (the exchange's final text)."""
    return core.answering > 0 or exchange.final_text is not None


def _heartbeat_s(settings: Settings) -> float:
    """How long an SSE stream may go without a write before a keep-alive comment."""
    return settings.heartbeat_interval_s if settings.heartbeat_interval_s > 0 else 15.0


def _status_for(code: int | None, modern: bool) -> int:
    """The HTTP status of a JSON answer (see the module docstring)."""
    if code in (p.PARSE_ERROR, p.INVALID_REQUEST):
        return 400
    if modern:
        if code in (p.INVALID_PARAMS, p.HEADER_MISMATCH, p.UNSUPPORTED_PROTOCOL_VERSION):
            return 400
        if code == p.METHOD_NOT_FOUND:
            return 404
    return 200


class _Headers:
    """A request's headers by (lower-case) name, read once: every check looks here."""

    __slots__ = ("_map",)

    def __init__(self, request: _AnyRequest) -> None:
        if type(request) is PlainRequest:
            self._map = request.fields  # (read once by the parser already)
            return
        self._map = {}
        for k, v in request.headers:
            self._map.setdefault(k, []).append(v.decode("latin-1"))

    def values(self, name: bytes) -> list[str]:
        return self._map.get(name, [])

    def first(self, name: bytes) -> str | None:
        found = self._map.get(name)
        return found[0] if found else None


def _media_types(values: list[str]) -> set[str]:
    out = set()
    for value in values:
        for item in value.split(","):
            out.add(item.split(";", 1)[0].strip().lower())
    return out


def _decode_header_value(value: str | None) -> str | None:
    """``Mcp-Name`` as the 2026-07-28 clients send it: verbatim, or ``=?base64?…?=``."""
    if value is None or not (value.startswith("=?base64?") and value.endswith("?=")):
        return value
    try:
        return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


class HttpDoor:
    """Serves admitted HTTP connections (see the module docstring).

    Args:
        shared: what every session core shares.
        settings: ``() -> Settings`` in force (a reload changes tokens, keys, origins).
        tokens: ``() -> TokenTable`` in force.
        sessions: the daemon's session table (each connection is kept there while it runs).
        signer: mints and verifies ``Mcp-Session-Id`` values.
        revocations: the sessions ended by ``DELETE``.
        origins: ``() -> OriginPolicy`` in force.
    """

    def __init__(
        self,
        shared: SessionShared,
        *,
        settings: Callable[[], Settings],
        tokens: Callable[[], TokenTable],
        sessions: SessionTable,
        signer: Callable[[], SessionSigner],
        revocations: Revocations,
        origins: Callable[[], OriginPolicy],
    ) -> None:
        self.shared = shared
        self.settings = settings
        self.tokens = tokens
        self.sessions = sessions
        self.signer = signer
        self.revocations = revocations
        self.origins = origins
        #: initialize-era calls running on this daemon, by (session nonce, request id as
        #: JSON): where a ``notifications/cancelled`` of the same session finds its call
        self.running: dict[tuple[str, str], SessionCore] = {}

    async def serve(
        self,
        stream: ProgressStream,
        conn: h11.Connection,
        first: h11.Request,
        ip: str,
        *,
        peer: str | None = None,
        trusted: TrustedProxies = (),
    ) -> None:
        """Serve one admitted connection until it closes, is idle too long, or is closed.

        Args:
            ip: the client the first request stands for.
            peer: the TCP peer (default ``ip``); when it is one of the ``trusted`` proxies, each
                request stands for the client its own ``X-Forwarded-For`` names.
        """
        connection = HttpConnection(self, stream, conn, ip, peer=peer, trusted=trusted)
        try:
            async with self.sessions.open(connection):
                await connection.run(first)
        finally:
            # the stream's hook is the connection's method: no reference cycle left to the
            # collector (see SessionCore.release_all)
            stream.on_progress = None


class HttpConnection:
    """One HTTP connection of the door, as the session table sees it (a :class:`Door`)."""

    def __init__(
        self,
        door: HttpDoor,
        stream: ProgressStream,
        conn: h11.Connection,
        ip: str,
        *,
        peer: str | None = None,
        trusted: TrustedProxies = (),
    ) -> None:
        self.door = door
        self.shared = door.shared
        self.stream = stream
        #: the h11 state of the request in progress; ``None`` for a plain request read whole
        #: without h11 until a response h11 writes needs one (:meth:`_h11`)
        self._conn: h11.Connection | None = conn
        #: the request in progress when it is a plain one (:func:`parse_plain_request`)
        self._plain: PlainRequest | None = None
        #: bytes the client sent past the request in progress (a pipelined request, or its
        #: start), beside what the request's h11 state holds: where the next request is read
        self._ahead = bytearray()
        #: the client of the request in progress (audit, logs, the tools' context)
        self.ip = ip
        self._peer = peer if peer is not None else ip
        self._trusted = trusted
        s = door.settings()
        #: the connection's message bucket, charged by every request on it
        self.bucket = TokenBucket(s.session_rate_per_s, s.session_burst)
        self.meter = InboundMeter(door.shared.budget)
        self._identity: Identity | None = None
        #: the last Authorization value accepted on this connection (see _authenticate)
        self._known_auth: tuple[TokenTable, str | None, Identity] | None = None
        self.closing_reason: tuple[int, str] | None = None
        self.busy = False
        self._scope = trio.CancelScope()
        self._write_scope: trio.CancelScope | None = None
        stream.on_progress = self._write_progress
        #: while a JSON-only call runs: the connection task's read of the connection (the
        #: call's end cancels it), whether the call has ended, and what became of the answer
        #: its responder wrote ("keep", "close", "failed"; "" = not written by it)
        self._watch: trio.CancelScope | None = None
        self._direct = ""
        self._call_over = False
        #: while an SSE-accepting call runs: whether its stream has begun (its head written),
        #: when the last write was (a keep-alive follows a heartbeat interval without one), the
        #: rest of a write the socket did not take at once with how many queued messages it
        #: ends (the connection's task writes it, and the stream from then on: _hand_to_stream)
        #: and, once the client half-closed, when its grace ends
        self._committed = False
        self._watching = False
        self._beat_from = 0.0
        self._rest: tuple[bytes | memoryview, int] | None = None
        self._grace_until: float | None = None
        #: the request in progress was answered with :meth:`_whole` (h11's state does
        #: not say so: see :func:`~exai.server.http11.whole_response`)
        self._responded = False
        self._head_request = False

    @property
    def identity(self) -> Identity | None:
        """Who the request in progress authenticated as (``None`` between requests)."""
        return self._identity

    async def close(self, code: int, reason: str) -> None:
        """Close now: a request in progress is abandoned (its calls detached)."""
        self.closing_reason = (code, reason)
        self._scope.cancel()

    async def hand_over(self) -> None:
        """Draining: close once the request in progress (if any) has been answered; a request
        that arrives meanwhile is refused with 503 before its body is read."""
        await self.shared.changes.wait_for(lambda: not self.busy)
        if self.closing_reason is None:
            await self.close(1012, "exai is restarting")

    def _write_progress(self) -> None:
        scope = self._write_scope
        if scope is not None:
            scope.deadline = trio.current_time() + self.door.settings().send_timeout_s

    # ---------------------------------------------------------------- the connection
    async def run(self, first: h11.Request) -> None:
        request: _AnyRequest | None = first
        with self._scope:
            while request is not None:
                self.busy = True
                try:
                    keep = await self._serve(request)
                except h11.RemoteProtocolError as exc:
                    self.shared.stats.rejections["bad_request"] += 1
                    await self._try_refuse(
                        _Refused(exc.error_status_hint, "bad_request", f"malformed HTTP: {exc}")
                    )
                    keep = False
                finally:
                    self.busy = False
                    self._identity = None
                    self.shared.changes.notify()
                conn = self._conn
                if (
                    not keep
                    or self.closing_reason is not None
                    or self.shared.readiness.draining
                    or (
                        not self._responded
                        if conn is None  # (a plain request is read to its end)
                        else not (self._responded or conn.our_state is h11.DONE)
                        or conn.their_state is not h11.DONE
                    )
                ):
                    return
                # idle for at most the keep-alive bound: the connection's own scope's deadline
                # (a scope of its own per request cost ≈ 2 µs more), lifted once a head came
                self._scope.deadline = trio.current_time() + self.door.settings().http_keepalive_s
                try:
                    request = await self._next_request()
                except h11.RemoteProtocolError as exc:
                    self.shared.stats.rejections["bad_request"] += 1
                    await self._try_refuse(
                        _Refused(exc.error_status_hint, "bad_request", f"malformed HTTP: {exc}")
                    )
                    return
                self._scope.deadline = math.inf

    async def _next_request(self) -> _AnyRequest | None:
        """The next request on a kept connection (``None``: the client closed it first, or its
        head did not come whole in time and was answered 408).

        A plain request that is all there (:func:`~exai.server.http11.parse_plain_request`:
        what a keep-alive client sends, in one read) is read without h11; anything else — a
        head or body still arriving, chunked, ``Expect``, malformed — is given to a fresh h11
        state with every byte read so far, and read (or refused) by h11 as before.

        Raises:
            h11.RemoteProtocolError: h11 refuses the request's head (400, 431, …).
        """
        self._new_cycle()
        data = bytes(self._ahead)
        self._ahead.clear()
        closed = False
        conn = self._conn
        if conn is not None:
            trailing, closed = conn.trailing_data
            if trailing:
                data = bytes(trailing) + data
        if not data and not closed:
            data = bytes(await self.stream.receive_when_readable(_READ))
            closed = not data
        if data[:1] in (b"\r", b"\n"):
            # empty lines before the request line (a stray CRLF after the last body): skipped,
            # the connection still idle (RFC 9112 §2.2; h11 refuses them)
            try:
                data = (await skip_empty_lines(self.stream, data))[0]
            except h11.RemoteProtocolError:
                self._conn = h11.Connection(h11.SERVER)  # (to refuse them: 431)
                raise
            closed = not data
        if not closed:
            parsed = parse_plain_request(data)
            if parsed is not None:
                request, stop = parsed
                if stop < len(data):
                    self._ahead += memoryview(data)[stop:]
                self._conn = None
                self._plain = request
                return request
        self._conn = conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        if data:
            conn.receive_data(data)
        if closed:
            conn.receive_data(b"")
            head = await read_head(self.stream, conn, keep_raw=False)
            return head.request if head is not None else None
        # Bytes of a head came: the connection is no longer idle, and the head must be whole
        # within handshake_timeout_s of now — a bound not renewed by each byte (a client
        # trickling a byte at a time is cut at it, as the first head and a body are) — or it
        # gets 408 (RFC 9110 §15.5.9), where an idle connection is closed without a word.
        self._scope.deadline = math.inf
        with trio.move_on_after(self.door.settings().handshake_timeout_s) as bound:
            head = await read_head(self.stream, conn, keep_raw=False, wait_first=True)
        if bound.cancelled_caught:
            self.shared.stats.rejections["head_timeout"] += 1
            await self._try_refuse(_Refused(408, "head_timeout", HEAD_TIMEOUT_MESSAGE))
            return None
        return head.request if head is not None else None

    def _h11(self) -> h11.Connection:
        """The request's h11 state, made for a plain request when a response h11 writes (a
        refusal, an SSE stream) needs it."""
        conn = self._conn
        if conn is None:
            assert self._plain is not None
            conn = self._conn = self._plain.h11_state()
        return conn

    def _ahead_bytes(self) -> int:
        """How many bytes the client sent past the request in progress (bounded by
        :data:`_READ_AHEAD_BYTES`)."""
        conn = self._conn
        return len(self._ahead) + (len(conn.trailing_data[0]) if conn is not None else 0)

    def _new_cycle(self) -> None:
        """Start the next request on this connection: every mark of the request before it
        goes (before its head is read: a head that then fails to parse is refused through this
        cycle — with the last request's "answered" mark kept, the 400/431 was taken for a
        second response and the client got none)."""
        self._plain = None
        self._responded = False
        self._head_request = False

    async def _try_refuse(self, refusal: _Refused) -> None:
        """Send ``refusal`` if the connection can still carry it (bounded)."""
        with trio.move_on_after(1.0):
            try:
                await self._refuse(refusal)
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _refuse(self, refusal: _Refused) -> bool:
        if self._responded:
            raise h11.LocalProtocolError("this request was answered already")
        hs = [_JSON, *refusal.headers]
        body = json_body(refusal.reason, refusal.message)
        await self._timed(
            send_response(
                self.stream,
                self._h11(),
                refusal.status,
                hs,
                body,
                close=True,
                head_request=self._head_request,
            )
        )
        # The connection ends after a refusal, and the request's body may still be on its way:
        # closing with it unread resets the connection and the client loses the refusal (found
        # on kept connections by the attack on issue 18's parts 8–10). Say we are done and read
        # the rest, within bounds, as the listener does for a first request's refusal.
        await linger(self.stream, max(refusal.unread, LINGER_BYTES))
        return False

    async def _serve(self, request: _AnyRequest) -> bool:
        """Answer one request; whether the connection may carry another."""
        self._head_request = request.method == b"HEAD"  # (refused: 405, its head only)
        hdrs = _Headers(request)
        if self._trusted:
            # a balancer may send several clients' requests over one kept connection (HAProxy's
            # http-reuse): each request is its own client's, not the first one's
            self.ip = client_address(self._peer, hdrs.values(b"x-forwarded-for"), self._trusted)
        try:
            checked = await self._check(request, hdrs)
        except _Refused as refusal:
            self.shared.stats.rejections[refusal.reason] += 1
            return await self._refuse(refusal)
        if checked is None:
            return False  # answered already (DELETE)
        identity, session, sse_ok = checked
        settings = self.door.settings()
        try:
            body = await self._read_body(settings)
            if body is None:
                return False
            return await self._exchange(hdrs, body, identity, session, sse_ok, settings)
        finally:
            # every byte of the body charged to the daemon's budget goes back, however the
            # request ended — a body given up on (408, 413, 503) included: its bytes were
            # kept charged, and a few such requests left the budget full for good
            self.meter.release_all()

    # ---------------------------------------------------------------- before the body
    async def _check(
        self, request: _AnyRequest, hdrs: _Headers
    ) -> tuple[Identity, McpSession | None, bool] | None:
        """The checks before the body (see the module docstring): the identity, the session
        and whether SSE is accepted; ``None`` when the request was answered here.

        Raises:
            _Refused: the request is refused.
        """
        door = self.door
        settings = door.settings()
        if request.http_version not in SERVED_VERSIONS:
            # (the listener refuses a connection's first request so; a later one is judged the
            # same, not served as HTTP/1.1)
            version = request.http_version.decode("ascii", "replace")
            raise _Refused(505, "bad_request", f"HTTP/{version} is not served; use HTTP/1.1")
        target = request.target.decode("latin-1")
        try:
            path = route_path(target)  # (absolute-form too)
        except ValueError as exc:
            raise _Refused(400, "bad_request", str(exc)) from None
        host, several = request_host(target, hdrs.values(b"host"))
        if several or not door.origins().allows_host(host):
            raise _Refused(  # (a page whose name was rebound to this address: DNS rebinding)
                421,
                "forbidden_host",
                f"this daemon does not serve the host {(host or '')[:100]!r}; allow it with "
                "EXAI_ALLOWED_HOSTS",
            )
        if path != "/mcp":
            raise _Refused(404, "not_found", "the MCP endpoint is /mcp")
        origins = hdrs.values(b"origin")
        if len(origins) > 1:
            raise _Refused(400, "bad_request", "more than one Origin header")
        if not door.origins().allows(origins[0] if origins else None):
            raise _Refused(
                403,
                "forbidden_origin",
                f"requests from the browser origin {origins[0][:100]!r} are not accepted; "
                "allow it with EXAI_ALLOWED_ORIGINS",
            )
        authorization = hdrs.values(b"authorization")
        if len(authorization) > 1:
            raise _Refused(400, "bad_request", "more than one Authorization header; send one")
        identity = self._authenticate(authorization[0] if authorization else None)
        if identity is None:
            raise _Refused(
                401,
                "unauthorized",
                "missing or invalid bearer token",
                (("WWW-Authenticate", 'Bearer realm="exai"'),),
            )
        self._identity = identity
        method = request.method
        if method not in (b"POST", b"DELETE"):
            raise _Refused(
                405,
                "method_not_allowed",
                "POST JSON-RPC messages to /mcp (exai opens no server-initiated stream; "
                "DELETE ends an initialize-era session)",
                (("Allow", "POST, DELETE"),),
            )
        readiness = self.shared.readiness
        if readiness.draining or readiness.overloaded_reason is not None:
            reason = "draining" if readiness.draining else "overloaded"
            raise _Refused(503, reason, "not accepting now; retry", (("Retry-After", "1"),))
        session = await self._session(hdrs, identity)
        if method == b"DELETE":
            if session is None:
                raise _Refused(
                    405,
                    "method_not_allowed",
                    "DELETE ends an initialize-era session: send its Mcp-Session-Id",
                    (("Allow", "POST"),),
                )
            await door.revocations.revoke(session)
            # the session's calls running here end with it, and their requests with the error
            # session_ended (_stream): a client that ends its session while a call runs (the
            # TypeScript SDK's terminateSession) rejects the call instead of waiting on it
            ended = [k for k in door.running if k[0] == session.nonce]
            for key in ended:
                running = door.running[key]
                running.session_ended = True
                running.cancel({"requestId": json.loads(key[1])})
            log_event("http.session_ended", client=identity.name, calls_cancelled=len(ended))
            # (the connection ends after it: a body a DELETE may carry is not read)
            await self._timed_send(self._whole(204, [], close=True))
            return None
        if _media_types(hdrs.values(b"content-type")) != {"application/json"}:
            raise _Refused(
                415, "unsupported_media_type", "send the JSON-RPC message as application/json"
            )
        accepted = _media_types(hdrs.values(b"accept"))
        if not accepted & {"application/json", "application/*", "*/*"}:
            raise _Refused(
                406,
                "not_acceptable",
                "the Accept header must include application/json (and text/event-stream for "
                "streamed progress)",
            )
        self._check_version_header(hdrs, session)
        lengths = hdrs.values(b"content-length")
        if lengths and hdrs.values(b"transfer-encoding"):
            # which one frames the body depends on the reader (a proxy may have used the
            # other): the request smuggling the RFC says to treat as an error
            raise _Refused(
                400, "bad_request", "both Content-Length and Transfer-Encoding; send one"
            )
        limit = settings.max_frame_bytes
        if lengths and lengths[0].strip().isdigit() and int(lengths[0]) > limit:
            # the whole declared body is still to come: a client that writes it all before
            # reading (httpx on asyncio — the official Python SDK —, Node's fetch) was cut
            # off after LINGER_BYTES, its kernel reset the connection and the 413 was lost
            raise _Refused(
                413,
                "payload_too_large",
                f"the body is larger than EXAI_MAX_FRAME_BYTES={limit}",
                unread=min(int(lengths[0]), LINGER_MAX_BYTES),
            )
        conn = self._conn  # (a plain request sends no Expect)
        if conn is not None and conn.they_are_waiting_for_100_continue:
            await self._timed_send(
                conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        return identity, session, "text/event-stream" in accepted

    def _authenticate(self, authorization: str | None) -> Identity | None:
        """The identity of an ``Authorization`` value: the token table's answer, remembered for
        the connection's next requests while the table in force is the same object (a reload
        that changes the tokens replaces it). A keep-alive client sends the same header with
        every request; hashing it each time cost ≈ 2.5 µs a request. (The remembered value is
        one this connection presented and the table accepted: comparing with it tells a client
        nothing but its own token.)"""
        tokens = self.door.tokens()
        known = self._known_auth
        if known is not None and known[0] is tokens and known[1] == authorization:
            return known[2]
        identity = tokens.authenticate(authorization)
        self._known_auth = (tokens, authorization, identity) if identity is not None else None
        return identity

    async def _session(self, hdrs: _Headers, identity: Identity) -> McpSession | None:
        """The request's initialize-era session, or ``None`` without the header.

        Raises:
            _Refused: two headers (400), or an id this daemon cannot accept for this
                identity — not signed by the deployment's key, expired, another identity's,
                or ended (404: "start a new session", as the spec says).
        """
        values = hdrs.values(b"mcp-session-id")
        if not values:
            return None
        if len(values) > 1:
            raise _Refused(400, "bad_request", "more than one Mcp-Session-Id header")
        session = self.door.signer().verify(values[0].strip())
        unknown = _Refused(
            404,
            "unknown_session",
            "this Mcp-Session-Id is not known (expired, ended, or from another deployment); "
            "start a new session with initialize",
        )
        if isinstance(session, str) or session.identity != identity.name:
            raise unknown
        if await self.door.revocations.revoked(session):
            raise unknown
        return session

    def _check_version_header(self, hdrs: _Headers, session: McpSession | None) -> None:
        for name in _ROUTING_HEADERS:
            if len(hdrs.values(name)) > 1:
                raise _Refused(400, "bad_request", f"more than one {name.decode()} header")
        version = hdrs.first(b"mcp-protocol-version")
        if version is None:
            return
        if version not in p.SUPPORTED_VERSIONS:
            raise _Refused(
                400,
                "unsupported_protocol_version",
                f"MCP-Protocol-Version {version[:40]!r} is not one exai speaks "
                f"({', '.join(p.SUPPORTED_VERSIONS)})",
            )
        if session is not None and version != session.version:
            raise _Refused(
                400,
                "bad_request",
                f"MCP-Protocol-Version {version!r} is not the version this session negotiated "
                f"({session.version})",
            )

    async def _read_body(self, settings: Settings) -> bytes | None:
        """The request body (within the cap, charged to the budget), or ``None`` after a
        refusal or when the peer went away."""
        limit = settings.max_frame_bytes
        plain = self._plain
        if plain is not None:  # read whole already: the same bounds, in one piece
            return await self._plain_body(plain.body, limit)
        bound = settings.handshake_timeout_s
        parts: list[bytes] = []
        size = 0
        conn = self._h11()
        # the body's deadline: ``bound`` from the start or from its last _BODY_PROGRESS_BYTES
        # — not from its last byte, which a client trickling a byte at a time renews forever
        deadline = trio.current_time() + bound
        since_progress = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_at(deadline) as waited:
                    data = await self.stream.receive_some(64 * 1024)
                if waited.cancelled_caught:
                    self.shared.stats.rejections["body_timeout"] += 1
                    await self._try_refuse(
                        _Refused(408, "body_timeout", "the body did not arrive in time")
                    )
                    return None
                since_progress += len(data)
                if since_progress >= _BODY_PROGRESS_BYTES:
                    since_progress = 0
                    deadline = trio.current_time() + bound
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if not await self._admit_body_part(size, len(event.data), limit):
                    return None
                parts.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                body = b"".join(parts)
                return body
            return None  # ConnectionClosed: the client went away mid-body

    async def _plain_body(self, body: bytes, limit: int) -> bytes | None:
        """A plain request's body, read with its head: within the cap (its ``Content-Length``
        was checked already) and charged to the daemon's budget, as :meth:`_read_body` does."""
        if not await self._admit_body_part(len(body), len(body), limit):
            return None
        return body

    async def _admit_body_part(self, size: int, nbytes: int, limit: int) -> bool:
        """Whether a part of ``nbytes`` of the body, ``size`` bytes with the parts before it,
        is within the cap and fits the daemon's budget (it is charged then); else the request
        is refused — 413, or 503 with ``Retry-After`` — and ``False``."""
        # (refused part-way, the rest of the body is still to come — a chunked one's of no
        # known length: read and dropped as for a length refused at the head, so a client that
        # writes its whole body before reading gets its refusal, not a reset)
        if size > limit:
            self.shared.stats.rejections["payload_too_large"] += 1
            await self._try_refuse(
                _Refused(
                    413,
                    "payload_too_large",
                    f"the body is larger than EXAI_MAX_FRAME_BYTES={limit}",
                    unread=LINGER_MAX_BYTES,
                )
            )
            return False
        if nbytes and not self.meter.take(nbytes):
            self.shared.stats.rejections["overloaded"] += 1
            await self._try_refuse(
                _Refused(
                    503,
                    "overloaded",
                    "the daemon holds as many client bytes as its budget allows",
                    (("Retry-After", "1"),),
                    unread=LINGER_MAX_BYTES,
                )
            )
            return False
        return True

    # ---------------------------------------------------------------- the exchange
    async def _exchange(
        self,
        hdrs: _Headers,
        body: bytes,
        identity: Identity,
        session: McpSession | None,
        sse_ok: bool,
        settings: Settings,
    ) -> bool:
        door, shared = self.door, self.shared
        exchange = _Exchange()
        core_id = (
            f"{shared.instance_id}-m{session.nonce}"
            if session is not None
            else f"{shared.instance_id}-h{next(_request_ids)}"
        )
        core = SessionCore(
            shared,
            settings,
            self.ip,
            identity,
            close=self._core_close,
            id=core_id,
            encode=exchange.encode,
            encode_large=exchange.encode_large,
            bucket=self.bucket,
        )
        # a stateless request's id never comes back to this core: keep no unkeyed answer
        core.ids_recur = session is not None
        running_key: tuple[str, str] | None = None
        try:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                await core.send(
                    p.error(
                        None,
                        p.PARSE_ERROR,
                        f"Parse error: the body is not valid UTF-8 (byte {exc.start})",
                        {"reason": "parse_error"},
                    )
                )
                return await self._answer(core, exchange, modern=False, extra=())
            wait = await core.pay_rate(text)
            if wait > 0:
                await core.over_rate(text, wait, core.decode)
                return await self._answer(core, exchange, modern=False, extra=())
            msg = core.decode(text)
            if isinstance(msg, p.Request):
                exchange.request_id = msg.id
            modern = False
            gate: p.EraGate | None = None
            if isinstance(msg, p.Request | p.Notification):
                try:
                    routed = self._route(msg, hdrs, session, core)
                except _Refused as refusal:
                    shared.stats.rejections[refusal.reason] += 1
                    return await self._refuse(refusal)
                if isinstance(routed, dict):  # a refusal to answer as JSON-RPC
                    await core.send(routed)
                    return await self._answer(core, exchange, modern=True, extra=())
                if routed is None:
                    return await self._accepted()
                gate = routed
                modern = gate.era == "modern"
                if session is not None and isinstance(msg, p.Request) and not modern:
                    key = (session.nonce, json.dumps(msg.id))
                    # the first request of an id keeps it: a second one sent while it runs is
                    # refused (-32600) or joins it, and must not take its place here (where a
                    # cancel or a DELETE then no longer found the running call)
                    if key not in door.running:
                        running_key = key
                        door.running[key] = core
            elif isinstance(msg, p.Response):
                return await self._accepted()  # (the daemon sends no requests to answer)
            # (no closure over the core: a cycle left every request's core, its outbox, ledger
            # and parking lots to the garbage collector instead of freeing them at once)
            # The answer is written by the call's responder itself (no hand-off), JSON — or the
            # SSE stream's last event once progress began one — while this task reads the
            # connection (see _await_answer); a JSON-only client's progress is never encoded.
            exchange.progress = sse_ok
            self._direct = ""
            self._call_over = False
            self._committed = False
            self._rest = None
            self._grace_until = None
            core.outbox.direct = functools.partial(self._direct_answer, exchange, modern)
            core.on_call_done = functools.partial(self._call_done, core.outbox)
            async with trio.open_nursery() as nursery:
                core.nursery = nursery
                handled = await core.handle_message(msg, gate)
                if handled == "call":
                    self._watching = False
                    try:
                        if sse_ok:
                            keep = await self._await_stream(
                                core, exchange, modern, settings, nursery
                            )
                        else:
                            keep = bool(await self._await_answer(core, exchange, modern, settings))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        keep = False  # the client went, or reads nothing: its calls detach
                        core.detach_all()
                    finally:
                        core.outbox.wake = None
                        if self._watching or not self._call_over:
                            # (a call whose responder has finished, its stream written without
                            # a watch task, leaves nothing in the nursery to stop: its last
                            # step was _call_done)
                            nursery.cancel_scope.cancel()
                    return keep and self.closing_reason is None
            if handled == "call":
                return False  # cancelled before its answer: the client went away
            if handled == "handed_over":
                shared.stats.rejections["draining"] += 1
                return await self._refuse(
                    _Refused(
                        503, "draining", "this daemon is restarting; retry", (("Retry-After", "1"),)
                    )
                )
            if handled == "nothing":
                return await self._accepted()
            extra: tuple[tuple[str, str], ...] = ()
            if (
                isinstance(msg, p.Request)
                and msg.method == "initialize"
                and exchange.code is None
                and gate is not None
                and gate.version is not None
            ):
                minted = door.signer().mint(identity.name, gate.version)
                extra = (("Mcp-Session-Id", minted.id),)
                log_event("http.session_started", client=identity.name, version=gate.version)
            return await self._answer(core, exchange, modern=modern, extra=extra)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            core.detach_all()
            return False
        finally:
            if running_key is not None and door.running.get(running_key) is core:
                del door.running[running_key]
            core.release_all()

    def _route(
        self,
        msg: p.Request | p.Notification,
        hdrs: _Headers,
        session: McpSession | None,
        core: SessionCore,
    ) -> p.EraGate | dict[str, Any] | None:
        """The era gate to serve ``msg`` with; a JSON-RPC error to answer instead; or ``None``
        for a notification that has been dealt with (202).

        Raises:
            _Refused: an initialize-era message without its session (400).
        """
        params = msg.params
        version_header = hdrs.first(b"mcp-protocol-version")
        if p.has_modern_envelope(params) or version_header in p.MODERN_VERSIONS:
            if isinstance(msg, p.Notification):
                if msg.method == "notifications/cancelled":
                    core.cancel(params)  # (only a keyed call can be found without a session)
                return None
            mismatch = self._header_mismatch(msg, hdrs)
            if mismatch is not None:
                return p.error(msg.id, p.HEADER_MISMATCH, mismatch, {"reason": "header_mismatch"})
            return p.EraGate(era="modern")
        if isinstance(msg, p.Request) and msg.method == "initialize":
            return p.EraGate()
        if session is None:
            raise _Refused(
                400,
                "bad_request",
                "this message needs the Mcp-Session-Id that initialize returned (or, for MCP "
                "2026-07-28, the _meta protocol-version envelope)",
            )
        if isinstance(msg, p.Notification):
            if msg.method == "notifications/cancelled":
                self._cancel_in_session(session, params, core)
            return None
        return p.EraGate(era="handshake", version=session.version)

    @staticmethod
    def _header_mismatch(msg: p.Request, hdrs: _Headers) -> str | None:
        """Why the 2026-07-28 routing headers contradict the body (each checked when sent)."""
        meta = p.request_meta(msg.params)
        version = hdrs.first(b"mcp-protocol-version")
        if version is not None and version != meta.get(p.PROTOCOL_VERSION_META_KEY):
            return "the MCP-Protocol-Version header does not match the request's _meta version"
        method = hdrs.first(b"mcp-method")
        if method is not None and method != msg.method:
            return "the Mcp-Method header does not match the request's method"
        name = hdrs.first(b"mcp-name")
        if (
            name is not None
            and msg.method == "tools/call"
            and _decode_header_value(name) != msg.params.get("name")
        ):
            return "the Mcp-Name header does not match the request's tool name"
        return None

    def _cancel_in_session(
        self, session: McpSession, params: dict[str, Any], core: SessionCore
    ) -> None:
        rid = params.get("requestId")
        target = None
        if isinstance(rid, str | int) and not isinstance(rid, bool):
            target = self.door.running.get((session.nonce, json.dumps(rid)))
        if target is None or not target.cancel(params):
            core.cancel(params)  # a bridge-style cancel naming an idempotency key

    async def _core_close(self, code: int, reason: str) -> None:
        """The core asks to close (sustained abuse): after this answer."""
        self.closing_reason = (code, reason)

    def _closing(self) -> bool:
        """Whether the connection ends after the response about to be sent: then the response
        says ``Connection: close`` (a client that sent its next request on a connection closed
        without notice gets a reset, which it cannot tell from a crash mid-request)."""
        return (
            self.closing_reason is not None
            or self.shared.readiness.draining
            or (self._conn is not None and self._conn.their_state is not h11.DONE)
            # (a body not read: DELETE; a plain request is read to its end)
            # the client half-closed (a FIN) and sent no request after this one: nothing more
            # will come (the requests it sent before its end are each answered first)
            or (self.stream.peer_ended and not self._ahead_bytes())
        )

    async def _accepted(self) -> bool:
        close = self._closing()
        # (send_all under the deadline, not handed to the socket at once: a 202 is the only
        # write of a notification's request, and a burst of notifications pipelined in one read
        # was then served in one task step — 220 of them, 10-16 ms without yielding)
        await self._timed_send(self._whole(202, [], close=close))
        return not close

    def _whole(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        close: bool,
        length: int | None = None,
    ) -> bytes:
        """The whole response to the request in progress (one write, built without h11:
        :func:`~exai.server.http11.whole_response`), which is marked answered: the one response
        it gets. The caller writes it (:meth:`_timed_write`, :meth:`_timed_send`).

        Raises:
            h11.LocalProtocolError: the request was answered already (or a stream begun).
        """
        conn = self._conn
        if self._responded or (conn is not None and conn.our_state is not h11.SEND_RESPONSE):
            raise h11.LocalProtocolError("this request was answered already")
        self._responded = True
        return whole_response(status, headers, body, close=close, length=length)

    async def _answer(
        self,
        core: SessionCore,
        exchange: _Exchange,
        *,
        modern: bool,
        extra: tuple[tuple[str, str], ...],
    ) -> bool:
        """Send the one message the core queued for a request answered at once."""
        outbox = core.outbox
        if not len(outbox):
            return await self._accepted()
        text = await outbox.get()
        status = _status_for(exchange.code, modern)
        hs = [_JSON, *extra]
        close = self._closing()
        await self._write_whole(status, hs, text, close=close)
        outbox.written()
        return not close

    async def _write_whole(
        self, status: int, headers: list[tuple[str, str]], text: Text, *, close: bool
    ) -> None:
        """The whole response with ``text`` as its body, under the writer's deadline; a large
        answer's pieces one write each (:func:`~exai.server.outbox.send_pieces`)."""
        if isinstance(text, Pieces):
            head = self._whole(status, headers, length=text.nbytes, close=close)
            await self._timed(send_pieces(self.stream, head, text.parts))
        else:
            await self._timed_write(self._whole(status, headers, text.encode("utf-8"), close=close))

    async def _timed_write(self, data: bytes) -> None:
        """Write ``data`` under the writer's deadline (``send_timeout_s`` from the last 64 KiB
        written): a peer that reads nothing is disconnected.

        A write of at most 64 KiB is first handed to a plain TCP socket at once
        (:meth:`~exai.server.outbox.ProgressStream.send_nowait`, as the WebSocket door's
        ``send_text``): it almost always takes it whole, with no deadline scope and no scheduler
        round (``send_all`` yields even when the socket takes everything, and at concurrency 1
        each round costs CPU: issue 18); only what it did not take waits, under the deadline.
        The connection has one writer at a time (the request's responder or its task).
        Always a checkpoint for cancellation (as ``send_all``).

        Raises:
            trio.BrokenResourceError: the peer went away, or read nothing in time.
            trio.ClosedResourceError: the stream was closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        sent = self.stream.send_nowait(data) if len(data) <= CHUNK_BYTES else 0
        if sent < len(data):
            await self._timed_send(memoryview(data)[sent:] if sent else data)

    async def _timed_send(self, data: bytes | memoryview) -> None:
        """``send_all(data)`` under the writer's deadline (see :meth:`_timed_write`)."""
        await self._timed(self.stream.send_all(data))

    async def _timed(self, write: Awaitable[None]) -> None:
        """Await ``write`` (the door's writes, and only those) under the writer's deadline.

        Raises:
            trio.BrokenResourceError: the peer read nothing in time (or went away).
        """
        deadline = trio.current_time() + self.door.settings().send_timeout_s
        with trio.CancelScope(deadline=deadline) as scope:
            self._write_scope = scope
            await write
        self._write_scope = None
        if scope.cancelled_caught:
            self.shared.stats.rejections["send_timeout"] += 1
            log_event("http.send_timeout", logging.WARNING, ip=self.ip)
            raise trio.BrokenResourceError("the client reads nothing")

    async def _stream(
        self,
        core: SessionCore,
        exchange: _Exchange,
        sse_ok: bool,
        modern: bool,
        settings: Settings,
    ) -> bool:
        """Write a call's answer: JSON, or an SSE stream once there is progress to send (or
        after a heartbeat interval of silence). Whether the connection may be kept."""
        outbox = core.outbox
        interval = _heartbeat_s(settings)
        committed = self._committed  # (begun by progress written at once: _await_stream)
        while True:
            text: Text | None = None
            ended = False
            try:
                if sse_ok:
                    with trio.move_on_after(interval):
                        text = await outbox.get()
                else:
                    text = await outbox.get()
            except trio.EndOfChannel:
                ended = True
            if ended:
                break
            if text is None:  # silence for a heartbeat interval: keep the stream alive
                data = b": keep-alive\n\n"
                head = b""
                if not committed:
                    head = self._commit_sse()
                    committed = True
                await self._timed_write(head + self._chunk(data))
                continue
            # Everything queued now goes out in one write: progress that piled up, and the
            # answer with the end of the stream when it is there too (one syscall, not one
            # per event). The messages stay queued, and charged, until they are written.
            texts = outbox.queued()
            final = False
            for count, text in enumerate(texts, 1):
                if text is exchange.final_text:
                    final = True
                    del texts[count:]  # (nothing follows a response: its outbox is closed)
                    break
            if not committed:
                if final and not (sse_ok and len(texts) > 1):
                    # the answer before any progress was written: JSON (progress queued before
                    # it is dropped unless the client takes SSE, which then carries it)
                    status = _status_for(exchange.code, modern)
                    close = self._closing()
                    await self._write_whole(status, [_JSON], texts[-1], close=close)
                    outbox.written(len(texts))
                    return not close
                if not sse_ok:
                    outbox.written(len(texts))  # progress the client cannot take: drop it
                    continue
            parts = [b""]
            if not committed:
                parts[0] = self._commit_sse()
                committed = True
            large = texts[-1] if isinstance(texts[-1], Pieces) else None
            for text in texts[:-1] if large is not None else texts:
                if isinstance(text, Pieces):  # (only ever an answer, the last: never here)
                    text = text.text()
                parts.append(b"event: message\ndata: " + text.encode("utf-8") + b"\n\n")
            if large is None:
                data = self._chunk(b"".join(parts[1:]), last=final)
                await self._timed_write(parts[0] + data)
            else:
                await self._timed(self._sse_pieces(parts[0], b"".join(parts[1:]), large, final))
            outbox.written(len(texts))
            if final:
                return True
        if not core.cancelled_by_client:
            # ended without an answer, and not by its client: handed over by a draining daemon
            # or stopped at shutdown — never run to its end here, so the client (or the
            # balancer) is told to send it again: 503 while nothing was sent, else a stream cut
            # before its end (a transport error the client retries on)
            self.shared.stats.rejections["draining"] += 1
            if committed:
                raise trio.BrokenResourceError("unanswered: the call must be sent again")
            await self._timed_write(
                self._whole(
                    503,
                    [_JSON, ("Retry-After", "1")],
                    json_body("draining", "this daemon is restarting; retry"),
                    close=True,
                )
            )
            return False
        if core.session_ended:
            # its session ended (DELETE) while it ran: the client still waits on this request,
            # and only an answer for its id settles it (the TypeScript SDK reconnects a POST's
            # stream only after an event id, and otherwise waits for its request's timeout)
            answer_body = p.encode(
                p.error(
                    exchange.request_id,
                    errors.SERVER_ERROR,
                    "the session was ended (DELETE) while this call ran; the call was cancelled",
                    {"reason": "session_ended"},
                )
            ).encode("utf-8")
            if committed:
                event = b"event: message\ndata: " + answer_body + b"\n\n"
                await self._timed_write(self._chunk(event, last=True))
                return True
            close = self._closing()
            await self._timed_write(self._whole(200, [_JSON], answer_body, close=close))
            return not close
        # cancelled by its client (notifications/cancelled): the request ends without an answer
        if committed:
            await self._timed_write(self._chunk(b"", last=True))
        elif sse_ok:
            head = self._commit_sse()
            await self._timed_write(head + self._chunk(b"", last=True))
        else:
            body = p.encode(
                p.error(
                    None, errors.SERVER_ERROR, "the request was cancelled", {"reason": "cancelled"}
                )
            )
            close = self._closing()
            await self._timed_write(self._whole(200, [_JSON], body.encode("utf-8"), close=close))
            return not close
        return True

    def _commit_sse(self) -> bytes:
        """The SSE stream's head: for a plain request the connection keeps, the bytes h11
        writes, built without it (the request's one response, as :meth:`_whole`); else
        h11's (``Connection: close`` when the connection ends after the stream)."""
        closing = self._closing()
        if self._conn is None and not closing:
            self._responded = True
            return _SSE_HEAD
        headers = [*_SSE_HEADERS, ("Connection", "close")] if closing else _SSE_HEADERS
        return self._h11().send(
            h11.Response(status_code=200, headers=headers, reason=reason_phrase(200))
        )

    async def _sse_pieces(self, head: bytes, before: bytes, large: Pieces, last: bool) -> None:
        """Write ``head`` and the events ``before``, then a large message's event, a piece a
        write (:func:`~exai.server.outbox.send_pieces`): one chunk for all of it on a stream
        begun without h11 (the bytes :meth:`_chunk` makes of them), a chunk a piece with h11."""
        prefix = before + b"event: message\ndata: "
        conn = self._conn
        if conn is None:
            size = len(prefix) + large.nbytes + 2
            tail = b"\n\n\r\n" + (LAST_CHUNK if last else b"")
            await send_pieces(self.stream, head + b"%x\r\n" % size + prefix, large.parts, tail)
            return

        def framed(conn: h11.Connection) -> Iterator[bytes]:
            for part in large.parts:
                yield conn.send(h11.Data(data=part))
            end = conn.send(h11.Data(data=b"\n\n"))
            yield end + conn.send(h11.EndOfMessage()) if last else end

        await send_pieces(self.stream, head + self._chunk(prefix), framed(conn))

    def _chunk(self, data: bytes, *, last: bool = False) -> bytes:
        """``data`` as the SSE stream's next chunk (and its end with ``last``): framed here
        for a stream :meth:`_commit_sse` began without h11, else by h11."""
        conn = self._conn
        if conn is None:
            return chunk(data) + LAST_CHUNK if last else chunk(data)
        out = conn.send(h11.Data(data=data))
        if last:
            out += conn.send(h11.EndOfMessage())
        return out

    async def _direct_answer(self, exchange: _Exchange, modern: bool, text: Text) -> None:
        """The responder writes its call's JSON answer itself (nothing else is queued), under
        the writer's deadline (:meth:`_timed_write`).

        Raises:
            trio.ClosedResourceError: the client went, or read nothing for ``send_timeout_s``
                (what :meth:`~exai.server.outbox.Outbox.put` raises to its responder).
        """
        try:
            if self._committed:
                # the SSE stream progress began: the answer is its last event, and its end
                if isinstance(text, Pieces):
                    await self._timed(self._sse_pieces(b"", b"", text, True))
                else:
                    event = b"event: message\ndata: " + text.encode("utf-8") + b"\n\n"
                    await self._timed_write(self._chunk(event, last=True))
                self._direct = "keep"
                return
            status = _status_for(exchange.code, modern)
            close = self._closing()
            await self._write_whole(status, [_JSON], text, close=close)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
            self._direct = "failed"
            raise trio.ClosedResourceError("the client went, or reads nothing") from None
        self._direct = "close" if close else "keep"

    def _progress_now(self, outbox: Outbox, exchange: _Exchange) -> None:
        """Progress was queued (the outbox's ``wake``, in the task that made it — the call's
        responder): everything queued goes to the socket now as the SSE stream's next events,
        the stream's head before the first (:meth:`_write_now`). No task is woken for it and
        no scheduler round taken (issue 18: each one costs CPU at concurrency 1)."""
        texts = outbox.queued()
        if exchange.final_text is not None and any(t is exchange.final_text for t in texts):
            # (never while progress goes out at once: the answer is queued only behind
            # something not yet written, and then this task writes no more — _write_now)
            self._hand_to_stream(b"", 0, outbox)
            return
        head = b""
        if not self._committed:
            head = self._commit_sse()
            self._committed = True
        events = [
            b"event: message\ndata: "
            + (t.text() if isinstance(t, Pieces) else t).encode("utf-8")
            + b"\n\n"
            for t in texts
        ]
        self._write_now(head + self._chunk(b"".join(events)), len(texts), outbox)

    def _write_now(self, data: bytes, count: int, outbox: Outbox) -> None:
        """Hand ``data`` — the first ``count`` queued messages' events, or a keep-alive — to
        the socket without waiting (:meth:`~exai.server.outbox.ProgressStream.send_nowait`).
        What it does not take (a full send buffer, a TLS stream: all of it) is written by the
        connection's task under the writer's deadline, and the rest of the stream with it, as
        a stream written by that task (:meth:`_hand_to_stream`)."""
        self._beat_from = trio.current_time()
        try:
            sent = self.stream.send_nowait(data) if len(data) <= CHUNK_BYTES else 0
        except trio.BrokenResourceError:
            # the client went: its call detaches once the connection's task sees it
            self._direct = "failed"
            outbox.written(count)
            if self._watch is not None:
                self._watch.cancel()
            return
        if sent == len(data):
            if count:
                outbox.written(count)
            return
        self._hand_to_stream(memoryview(data)[sent:] if sent else data, count, outbox)

    def _hand_to_stream(self, rest: bytes | memoryview, count: int, outbox: Outbox) -> None:
        """From now on the SSE stream is written by the connection's task (:meth:`_stream`,
        beside a disconnect watch task), starting with ``rest`` (the end of ``count`` queued
        messages' events): nothing more is written at once, nor the answer by its responder."""
        self._rest = (rest, count)
        outbox.direct = None
        outbox.wake = None
        if self._watch is not None:
            self._watch.cancel()

    async def _await_stream(
        self,
        core: SessionCore,
        exchange: _Exchange,
        modern: bool,
        settings: Settings,
        nursery: trio.Nursery,
    ) -> bool:
        """A call whose client takes SSE: its progress is written at once by the task that
        makes it (:meth:`_progress_now`) and its answer by its responder (:meth:`_direct_answer`:
        JSON while no progress was written, else the stream's last event), while this task
        reads the connection (:meth:`_await_answer`) and, after a heartbeat interval with
        nothing written, writes a keep-alive comment (beginning the stream if need be). A
        write the socket does not take at once hands the rest of the stream to this task and
        a watch task (:meth:`_hand_to_stream`, :meth:`_stream`). Whether the connection may be
        kept."""
        outbox = core.outbox
        interval = _heartbeat_s(settings)
        self._beat_from = trio.current_time()
        outbox.wake = functools.partial(self._progress_now, outbox, exchange)
        if len(outbox):
            self._progress_now(outbox, exchange)  # (queued before this task took over)
        while True:
            beat = self._beat_from + interval
            if self._rest is not None or self._direct or self._call_over:
                break
            keep = await self._await_answer(core, exchange, modern, settings, beat=beat)
            if keep is not None:
                return keep
            if self._rest is not None or self._direct or self._call_over:
                break
            # the heartbeat's time (unless something was written since): keep the stream
            # alive — not while the answer is being written, which is no silence
            if outbox.writing:
                self._beat_from = trio.current_time()
                continue
            if trio.current_time() < self._beat_from + interval:
                continue
            head = b""
            if not self._committed:
                head = self._commit_sse()
                self._committed = True
            self._write_now(head + self._chunk(b": keep-alive\n\n"), 0, outbox)
        if self._rest is not None:
            rest, count = self._rest
            self._rest = None
            self._watching = True  # (the watch task is stopped at the request's end)
            nursery.start_soon(self._watch_disconnect, core, exchange, nursery.cancel_scope)
            await self._timed_send(rest)
            outbox.written(count)
            return await self._stream(core, exchange, True, modern, settings)
        return await self._finish(core, exchange, True, modern, settings)

    def _call_done(self, outbox: Outbox) -> None:
        """A call's responder has finished (answered, refused or cancelled): the connection
        task stops reading and finishes the request."""
        outbox.close(drop=False)
        self._call_over = True
        if self._watch is not None:
            self._watch.cancel()

    async def _await_answer(
        self,
        core: SessionCore,
        exchange: _Exchange,
        modern: bool,
        settings: Settings,
        *,
        beat: float = math.inf,
    ) -> bool | None:
        """While a call runs, read the connection (its responder writes the answer,
        :meth:`_direct_answer`): a client that closes it cancels the call (a keyed call is left
        its orphan grace); bytes it sends ahead are kept for the next request (bounded).
        Whether the connection may be kept — or, with a ``beat`` (an SSE stream's next
        heartbeat, :meth:`_await_stream`), ``None`` when the wait ended without the client
        going (the call's end, the heartbeat's time, the stream handed to this task).

        (Going on reading after the answer until the next request came, instead of being
        woken at the call's end, was measured: 10-15 % more CPU per call at 64 connections.)"""
        with trio.CancelScope(deadline=beat) as watch:
            self._watch = watch
            try:
                while not self._call_over:
                    if self._grace_until is None:
                        if self._ahead_bytes() >= _READ_AHEAD_BYTES:
                            await trio.sleep_forever()  # (until the call ends: _call_done)
                        try:
                            data = await self.stream.receive_when_readable(16 * 1024)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = None  # a reset: the client has gone
                        if data:
                            self._ahead += data
                            continue
                        if data is not None:
                            # its end of stream (a FIN): it sends nothing more, but a client
                            # that half-closed reads on — the call's answer, if it comes within
                            # the grace (_call_done ends this wait), is written as any answer
                            # (a client that has gone fails that write), and the requests it
                            # sent before its end are answered too (_closing). (The grace's
                            # end is kept: a heartbeat of an SSE stream does not renew it.)
                            self._grace_until = trio.current_time() + _ws_session.PEER_CLOSE_GRACE_S
                    if self._grace_until is not None:
                        await trio.sleep_until(self._grace_until)
                        if _answering(core, exchange):
                            # the answer is being written: for as long as the client reads
                            # it, under the send deadline (_call_done ends this wait) — the
                            # grace bounds the call, not the answer's write
                            await trio.sleep_forever()
                    self.closing_reason = (1001, "the client closed the connection")
                    # detach first: a call nobody else watches is cancelled now, even one
                    # still waiting (shielded) for its slots
                    core.detach_all()
                    return False
            finally:
                self._watch = None
        if beat < math.inf:
            return None
        return await self._finish(core, exchange, False, modern, settings)

    async def _finish(
        self, core: SessionCore, exchange: _Exchange, sse_ok: bool, modern: bool, settings: Settings
    ) -> bool:
        """The call has ended (or its client went): whether the connection may be kept."""
        state = self._direct
        if state == "keep":
            return True
        if state:
            core.detach_all()
            return False
        # ended without an answer written by its responder (cancelled by its client, stopped
        # by a draining daemon, or an answer queued behind another message): written here
        return await self._stream(core, exchange, sse_ok, modern, settings)

    async def _watch_disconnect(
        self, core: SessionCore, exchange: _Exchange, scope: trio.CancelScope
    ) -> None:
        """While a call runs: a client that closes its connection cancels it (a keyed call is
        left its orphan grace). Bytes it sends ahead are kept for the next request (bounded)."""
        while self._ahead_bytes() < _READ_AHEAD_BYTES:
            reset = False
            try:
                data = await self.stream.receive_when_readable(16 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data, reset = b"", True
            if not data:
                if not reset:
                    # its end of stream (a FIN): a client that half-closed reads on — the
                    # stream goes on for the grace (its end cancels this watch; the requests
                    # sent before the end are answered next: _closing), then the call is
                    # dropped as for a client that has gone (whose writes fail sooner) —
                    # unless its answer is being written: then the stream goes on to its end
                    # (under the send deadline) as long as the client reads it
                    await trio.sleep(_ws_session.PEER_CLOSE_GRACE_S)
                    if _answering(core, exchange):
                        await trio.sleep_forever()  # (the stream's end cancels this watch)
                self.closing_reason = (1001, "the client closed the connection")
                # detach first: a call nobody else watches is cancelled now, even one still
                # waiting (shielded) for its slots
                core.detach_all()
                scope.cancel()
                return
            self._ahead += data
