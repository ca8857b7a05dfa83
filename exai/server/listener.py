"""The front door: accept, bound the handshake, read the first request head, pick the door.

Data path of a connection::

    accept (bounded handshakes) → first request head read with h11 within handshake_timeout_s
      (400/431 when it is not HTTP/1.x; 408 when it began and did not come whole in time, a
      connection that sent nothing is closed without a word) → the client's address
      (X-Forwarded-For of a trusted proxy) → a WebSocket upgrade?
        yes: the head read is replayed into trio-websocket (the bytes past it held back until
             the upgrade is answered: ProgressStream.hold), then
             400 malformed upgrade → 421 foreign Host → 403 foreign Origin
             → 503 draining/overloaded
             → per-IP cap → global cap (503) → per-IP cap of the deployment (Redis, 503)
             → path /: the old op protocol's door (its token is in its first message)
             → bearer token (401) → path /mcp (404) → upgrade → serve_session(...)
        no:  503 draining/overloaded → per-IP cap → global cap → per-IP cap of the deployment
             → the Streamable HTTP door (exai.server.httpdoor), which checks each request
             (path, Origin, token, method, headers, body size) before reading its body

Every refusal is an HTTP status with a JSON body (``{"error": reason, "message": …}``) sent
before any WebSocket or JSON-RPC state exists; then the connection lingers (FIN, and what the
client still sends — a body, frames behind an upgrade — read within ``http11.linger``'s bounds)
before it closes, so no reset drops the refusal. A connection's failure never takes the daemon
down: it is counted (``session_error``) and logged, and its admission slot is given back in
``finally``. A connection admitted to a door takes a turn of :attr:`Listener.endings` once its
peer has gone and gives it back in that ``finally``, after the stream is closed: thousands of
peers going at once are torn down a few at a time (:mod:`exai.server.endings`).

The listener is handed what it decides with — the settings, the connection counts, the token
table (replaced as a whole on reload: :attr:`Listener.tokens`), the readiness view, the allowed
origins and the counters — one callback, ``serve_session(conn, ip, identity, stream)``, that
runs an admitted MCP WebSocket until it ends, and the two other doors.
"""

from __future__ import annotations

import itertools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from exai import errors
from exai.config import Settings
from exai.logs import log_event
from exai.server.admission import Admission
from exai.server.auth import Identity, TokenTable
from exai.server.endings import Endings
from exai.server.forwarded import client_address, parse_trusted_proxies
from exai.server.http11 import (
    MAX_HEAD_BYTES,
    SERVED_VERSIONS,
    Head,
    header_values,
    is_websocket_upgrade,
    json_body,
    linger,
    read_first_head,
    request_host,
    route_path,
    send_response,
)
from exai.server.origins import OriginPolicy
from exai.server.outbox import ProgressStream
from exai.server.readiness import Readiness
from exai.server.shared_limits import SharedLimits
from exai.server.stats import DaemonStats
from exai.server.wsconn import accept_request, http_version

if TYPE_CHECKING:
    from exai.server.httpdoor import HttpDoor
    from exai.server.legacy import LegacyDoor

__all__ = ["Listener", "SessionRunner", "load_ssl_context"]

#: runs one admitted connection until it ends: (connection, peer address, identity, stream)
SessionRunner = Callable[[WebSocketConnection, str, Identity, ProgressStream], Awaitable[None]]
#: a refusal before any protocol state: (status, headers, JSON body)
_Refusal = tuple[int, list[tuple[bytes, bytes]], bytes]
_JSON_BYTES = (b"Content-Type", b"application/json")


@attrs.define
class _Slots:
    """What one connection holds, given back in ``finally`` by the listener."""

    handshake: bool = True
    admitted: bool = False
    shared: bool = False


_DISCONNECTS = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)
_connection_ids = itertools.count(1)


class Listener:
    """Accepts and admits connections (see the module docstring).

    Args:
        settings: ``handshake_timeout_s``, ``max_frame_bytes`` and the connection caps.
        admission: the connection counts; a slot is taken before the upgrade.
        tokens: the client tokens (a reload replaces :attr:`tokens`).
        readiness: refuses connections while draining or overloaded.
        stats: counts refusals and session errors.
        serve_session: runs an admitted connection until it ends.
        shared_limits: the per-address cap held for the whole deployment (Redis), checked
            after the local one admitted the connection; ``None`` without Redis.
        http_door: serves a connection whose first request is not a WebSocket upgrade
            (Streamable HTTP); ``None``: such connections get 404.
        legacy_door: serves a WebSocket upgrade on ``/`` (the old op protocol); ``None``: 404.
        origins: the browser origins and ``Host`` values allowed (default: from
            ``settings``: :meth:`OriginPolicy.from_settings`).

    Behind a balancer in ``EXAI_TRUSTED_PROXIES`` the connection's address is the client's,
    from ``X-Forwarded-For`` (:mod:`exai.server.forwarded`): the caps, the session and the
    audit log see it, not the balancer's.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        admission: Admission,
        tokens: TokenTable,
        readiness: Readiness,
        stats: DaemonStats,
        serve_session: SessionRunner,
        shared_limits: SharedLimits | None = None,
        http_door: HttpDoor | None = None,
        legacy_door: LegacyDoor | None = None,
        origins: OriginPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.admission = admission
        self.tokens = tokens
        self.readiness = readiness
        self.stats = stats
        self.serve_session = serve_session
        self.shared_limits = shared_limits
        self.http_door = http_door
        self.legacy_door = legacy_door
        self.origins = origins or OriginPolicy.from_settings(settings)
        self.trusted_proxies = parse_trusted_proxies(settings.trusted_proxies)
        self._handshakes = trio.Semaphore(max(64, min(1024, settings.max_connections)))
        #: connections whose peers went at once are torn down a few at a time
        self.endings = Endings()

    async def accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        """Accept until ``listener`` closes; each connection runs in ``nursery``. At most
        64–1024 connections (per ``max_connections``) may be in their handshake at once."""
        while True:
            await self._handshakes.acquire()
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._handshakes.release()
                return
            except OSError as exc:
                self._handshakes.release()
                log_event("listener.accept_error", logging.WARNING, error=exc.strerror)
                await trio.sleep(0.05)  # EMFILE and friends: back off instead of spinning
                continue
            except BaseException:
                self._handshakes.release()
                raise
            nursery.start_soon(self._handle_stream, stream)

    async def _handle_stream(self, raw_stream: trio.abc.Stream) -> None:
        ip = peer = _peer_ip(raw_stream)
        # the writer's deadline follows the bytes actually written (see exai.server.outbox)
        stream = ProgressStream(raw_stream)
        slots = _Slots()
        conn_id = f"c{next(_connection_ids)}"
        try:
            http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            first = await read_first_head(stream, http, self.settings.handshake_timeout_s)
            self._release_handshake(slots)
            head = first.head
            if head is None:
                # malformed (400/431), begun and not whole in time (408, RFC 9110 §15.5.9), or
                # nothing sent in time (closed without a word), or the peer closed first
                reason = first.reason
                if reason is not None:
                    self.stats.refuse_connection(reason)
                if reason is not None and first.status:
                    # (after the read's bound, within its own, as the 505 below: a refusal
                    # lingering when the read's bound ran out was taken for a head timeout,
                    # counted again and answered twice; it lingers like every refusal: a
                    # client still sending reads its answer)
                    await self._refuse(
                        stream,
                        http,
                        (first.status, [_JSON_BYTES], json_body(reason, first.message)),
                    )
                return
            request = head.request
            if request.http_version not in SERVED_VERSIONS:
                # (h11 reads "PRI * HTTP/2.0", the HTTP/2 preface, as a request head)
                self.stats.refuse_connection("bad_request")
                version = request.http_version.decode("ascii", "replace")
                await self._refuse(
                    stream,
                    http,
                    (
                        505,
                        [_JSON_BYTES],
                        json_body("bad_request", f"HTTP/{version} is not served; use HTTP/1.1"),
                    ),
                    head_request=request.method == b"HEAD",
                )
                return
            # behind a trusted balancer, the client is who X-Forwarded-For names
            ip = client_address(
                peer, header_values(request, b"x-forwarded-for"), self.trusted_proxies
            )
            if is_websocket_upgrade(request):
                # The WebSocket door reads the head again (wsproto); what came past it in the
                # same reads (a client's first frames, sent right behind its upgrade) is held
                # back until the upgrade is answered — wsproto's handshake would keep it to
                # itself and the connection would start without it — and every read after the
                # head waits meanwhile (ProgressStream.hold; ServerConnection._accept releases)
                # (its Host judged as sent — wsproto keeps it apart, decoded from IDNA —
                # and only the verdict kept: memory per session)
                host, several = request_host(
                    request.target.decode("latin-1"), header_values(request, b"host")
                )
                foreign_host = several or not self.origins.allows_host(host)
                host = None
                rest = http.trailing_data[0]
                stream.unread(head.raw[: len(head.raw) - len(rest)] if rest else head.raw)
                stream.hold(rest)
                # (the WebSocket door reads the head again: this task's h11 state and parsed
                # head, ≈ 2.7 KB, are not kept for the connection's life — memory per session)
                http = first = head = request = None  # type: ignore[assignment]
                if await self._websocket(stream, ip, conn_id, slots, foreign_host):
                    # refused: what the client sent behind its upgrade (frames, a body) is
                    # unread, and closing now would reset the connection and drop the refusal
                    # (tests/server/test_refused_upgrade_linger.py): it lingers as every
                    # refusal does, once trio-websocket's reader is gone
                    stream.release()
                    await linger(stream)
            else:
                await self._http(stream, head, ip, conn_id, slots, peer)
        except _DISCONNECTS:
            pass
        except Exception as exc:  # one connection's failure never takes the daemon down
            if not _only_disconnects(exc):
                self.stats.rejections["session_error"] += 1
                unwrapped = errors.unwrap_exception(exc)
                log_event(
                    "session.error",
                    logging.ERROR,
                    ip=ip,
                    exc_type=type(unwrapped).__name__,
                    error=str(unwrapped)[:200],
                )
        finally:
            self._release_handshake(slots)
            if slots.admitted:
                self.admission.release(ip)
            if slots.shared and self.shared_limits is not None:
                self.shared_limits.release_connection(ip, conn_id)
            try:
                await trio.aclose_forcefully(stream)
            finally:
                if stream.turn is not None:
                    stream.turn.give_back()

    def _release_handshake(self, slots: _Slots) -> None:
        if slots.handshake:
            slots.handshake = False
            self._handshakes.release()

    async def _http(
        self,
        stream: ProgressStream,
        head: Head,
        ip: str,
        conn_id: str,
        slots: _Slots,
        peer: str,
    ) -> None:
        """A connection for the Streamable HTTP door: admitted here (readiness, the caps, the
        deployment's per-IP cap: ``ip``, the client its first request names), then served
        request by request by the door (each naming its own client behind a trusted proxy,
        ``peer``)."""
        refusal = self._admit_connection(ip)
        if refusal is None:
            slots.admitted = True
            refusal = await self._admit_shared(ip, conn_id)
            slots.shared = refusal is None and self.shared_limits is not None
        if refusal is None and self.http_door is None:
            self.stats.refuse_connection("not_found")
            refusal = (
                404,
                [(b"Content-Type", b"application/json")],
                _body("not_found", "the MCP endpoint is ws://…/mcp"),
            )
        if refusal is not None:
            await self._refuse(
                stream, head.conn, refusal, head_request=head.request.method == b"HEAD"
            )
            return
        assert self.http_door is not None
        stream.turn = self.endings.turn()
        await self.http_door.serve(
            stream, head.conn, head.request, ip, peer=peer, trusted=self.trusted_proxies
        )

    async def _refuse(
        self,
        stream: ProgressStream,
        conn: h11.Connection,
        refusal: _Refusal,
        *,
        head_request: bool = False,
    ) -> None:
        """Send ``refusal`` (JSON, ``Connection: close``) on a connection no door has taken,
        then read what the client is still sending (:func:`~exai.server.http11.linger`: the
        request's body may still be on its way, and closing with it unread resets the
        connection and loses the answer), all within ``handshake_timeout_s``."""
        status, headers, body = refusal
        with trio.move_on_after(self.settings.handshake_timeout_s):
            await send_response(
                stream,
                conn,
                status,
                [(k.decode(), v.decode()) for k, v in headers],
                body,
                close=True,
                head_request=head_request,
            )
            await linger(stream)

    async def _websocket(
        self, stream: ProgressStream, ip: str, conn_id: str, slots: _Slots, foreign_host: bool
    ) -> bool:
        """A WebSocket upgrade: decided before any WebSocket state exists, then the MCP door
        (``/mcp``) or the old op protocol's (``/``). Whether it was refused with a status (the
        caller lingers: the client may still be sending)."""
        async with trio.open_nursery() as nursery:
            request: WebSocketRequest | None = None
            with trio.move_on_after(self.settings.handshake_timeout_s) as bound:
                request = await accept_request(
                    nursery, stream, max_message_size=self.settings.max_frame_bytes
                )
            if request is None:
                # refused by wsproto (answered 400/426: lingers) or, its bound passed, not read
                timed_out = bound.cancelled_caught
                self.stats.refuse_connection("handshake_timeout" if timed_out else "bad_request")
                nursery.cancel_scope.cancel()
                return not timed_out
            refusal, door = self._admit(request, ip, foreign_host)
            if refusal is None:
                slots.admitted = True
                refusal = await self._admit_shared(ip, conn_id)
                slots.shared = refusal is None and self.shared_limits is not None
            if refusal is not None:
                status, headers, body = refusal
                with trio.move_on_after(self.settings.handshake_timeout_s):
                    await request.reject(status, extra_headers=headers, body=body)
                nursery.cancel_scope.cancel()
                return True
            if door == "legacy":
                conn = await request.accept()
                stream.turn = self.endings.turn()
                try:
                    assert self.legacy_door is not None
                    await self.legacy_door.serve(conn, ip, stream)
                finally:
                    with trio.move_on_after(1.0) as closing:
                        closing.shield = True
                        await conn.aclose()
                    nursery.cancel_scope.cancel()
                return False
            identity = self.tokens.authenticate(_header(request, b"authorization"))
            assert identity is not None  # checked in _admit
            subprotocol = "mcp" if "mcp" in request.proposed_subprotocols else None
            conn = await request.accept(subprotocol=subprotocol)
            request = None  # (its headers are not needed by the session: memory per session)
            stream.turn = self.endings.turn()
            try:
                await self.serve_session(conn, ip, identity, stream)
            finally:
                with trio.move_on_after(1.0) as closing:
                    closing.shield = True
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        return False

    async def _admit_shared(self, ip: str, conn_id: str) -> _Refusal | None:
        """The deployment-wide connection cap of ``ip`` (Redis), after the local one admitted
        the connection. Returns (status, headers, body) to refuse, or None."""
        if self.shared_limits is None:
            return None
        limit = self.settings.max_connections_per_ip
        try:
            ok = await self.shared_limits.connection(ip, conn_id)
        except errors.RateLimiterUnavailableError:
            ok = False  # fail-closed while Redis is unreachable
        if ok:
            return None
        self.admission.rejected["max_connections_per_ip"] += 1
        self.stats.rejections["max_connections_per_ip"] += 1
        return (
            503,
            [(b"Content-Type", b"application/json"), (b"Retry-After", b"1")],
            _body(
                "max_connections_per_ip",
                f"connection limit reached across the deployment (max_connections_per_ip="
                f"{limit}); retry later",
            ),
        )

    def _admit_connection(self, ip: str) -> _Refusal | None:
        """Readiness and the connection caps: (status, headers, body) to refuse, or None after
        taking an admission slot (the caller releases it)."""
        json_ct = (b"Content-Type", b"application/json")
        draining = self.readiness.draining
        if draining or self.readiness.overloaded_reason is not None:
            reason = "draining" if draining else "overloaded"
            self.stats.refuse_connection(reason)
            return 503, [json_ct, (b"Retry-After", b"1")], _body(reason, "not accepting now")
        refused = self.admission.try_admit(ip)
        if refused is not None:
            # (Admission counts it for exai_connections_rejected; exai_rejections has every
            # refusal, as it has the deployment-wide cap's in _admit_shared)
            self.stats.rejections[refused] += 1
            limit = (
                self.settings.max_connections
                if refused == "max_connections"
                else self.settings.max_connections_per_ip
            )
            return (
                503,
                [json_ct, (b"Retry-After", b"1")],
                _body(refused, f"connection limit reached ({refused}={limit}); retry later"),
            )
        return None

    def _admit(
        self, request: WebSocketRequest, ip: str, foreign_host: bool
    ) -> tuple[_Refusal | None, str]:
        """Decide before the upgrade: (status, headers, body) to refuse, or None after taking
        an admission slot (the caller releases it); and the door (``"mcp"``, ``"legacy"``).
        ``foreign_host``: the request names a ``Host`` not served (:mod:`~exai.server.origins`)."""
        json_ct = (b"Content-Type", b"application/json")
        malformed = _malformed_upgrade(request)
        if malformed is not None:
            self.stats.refuse_connection("bad_request")
            return (400, [json_ct], _body("bad_request", malformed)), ""
        if foreign_host:
            # a page whose name was rebound to this address (DNS rebinding)
            self.stats.refuse_connection("forbidden_host")
            return (
                421,
                [json_ct],
                _body(
                    "forbidden_host",
                    "this daemon does not serve the host the request names; allow it with "
                    "EXAI_ALLOWED_HOSTS",
                ),
            ), ""
        origins = _headers(request, b"origin")
        if len(origins) > 1 or not self.origins.allows(origins[0] if origins else None):
            self.stats.refuse_connection("forbidden_origin")
            return (
                403,
                [json_ct],
                _body(
                    "forbidden_origin",
                    "upgrades from this browser origin are not accepted; allow it with "
                    "EXAI_ALLOWED_ORIGINS",
                ),
            ), ""
        refusal = self._admit_connection(ip)
        if refusal is not None:
            return refusal, ""
        ok = False
        try:
            path = route_path(request.path)  # (absolute-form too: checked by _malformed_upgrade)
            if path in ("/", "") and self.legacy_door is not None:
                ok = True  # the old op protocol authenticates in its first message
                return None, "legacy"
            if self.tokens.authenticate(_header(request, b"authorization")) is None:
                self.stats.refuse_connection("unauthorized")
                return (
                    401,
                    [json_ct, (b"WWW-Authenticate", b'Bearer realm="exai"')],
                    _body("unauthorized", "missing or invalid bearer token"),
                ), ""
            if path != "/mcp":
                self.stats.refuse_connection("not_found")
                return (404, [json_ct], _body("not_found", "the MCP endpoint is /mcp")), ""
            ok = True
            return None, "mcp"
        finally:
            if not ok:
                self.admission.release(ip)


def _only_disconnects(exc: BaseException) -> bool:
    """True when ``exc`` (or every leaf of an exception group) is a peer going away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(e) for e in exc.exceptions)
    return isinstance(exc, _DISCONNECTS)


def _body(reason: str, message: str) -> bytes:
    return json.dumps({"error": reason, "message": message}).encode()


def _malformed_upgrade(request: WebSocketRequest) -> str | None:
    """Why the upgrade request is refused with 400 before anything else, or ``None``.

    An HTTP/1.0 upgrade (RFC 6455 needs 1.1), more than one ``Authorization`` header
    (which one counts would depend on the reader; a proxy may have checked the other), and an
    absolute-form target whose authority is not one (:func:`~exai.server.http11.route_path`).
    """
    try:
        route_path(request.path)
    except ValueError as exc:
        return str(exc)
    version = http_version(request)
    if version is not None and version != b"1.1":
        return f"a WebSocket upgrade needs HTTP/1.1 (got HTTP/{version.decode('ascii', 'replace')})"
    if sum(1 for k, _ in request.headers if k.lower() == b"authorization") > 1:
        return "more than one Authorization header; send exactly one"
    return None


def _headers(request: WebSocketRequest, name: bytes) -> list[str]:
    """Every value of header ``name`` (lower-case), in order."""
    return [v.decode("latin-1") for k, v in request.headers if k.lower() == name]


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for k, v in request.headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _peer_ip(stream: trio.abc.Stream) -> str:
    sock_stream: Any = stream
    if isinstance(stream, trio.SSLStream):
        sock_stream = stream.transport_stream
    try:
        return str(sock_stream.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "unknown"


def load_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context from ``EXAI_TLS_CERT``/``EXAI_TLS_KEY``, or ``None`` without
    them. Blocking (reads the files): call it from a worker thread.

    Raises:
        ConfigError: the files do not load.
    """
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"cannot load EXAI_TLS_CERT/EXAI_TLS_KEY: {exc}") from exc
    return ctx
