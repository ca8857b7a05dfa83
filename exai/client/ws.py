"""exai's one WebSocket client, over anyio and wsproto: :class:`exai.Client`, the bridge and
``exai doctor`` all connect with it.

Why this stack for the product: :class:`exai.Client` must work under asyncio as well as trio,
and trio-websocket (the daemon's server side) runs on trio only; wsproto is the sans-IO protocol
trio-websocket itself is built on, so both ends share one WebSocket implementation of the frames
and only the I/O differs. The tests and benchmarks drive the daemon with trio-websocket's client
on purpose: a second, independent client, so a fault of this one cannot hide one of the daemon's
(and this client is tested against a trio-websocket server, ``tests/client``).

It speaks exactly what the daemon's transport needs: an HTTP/1.1 upgrade to ``ws://`` or
``wss://`` with the ``mcp`` subprotocol and an optional ``Authorization: Bearer`` header, one
text message per JSON-RPC message, automatic answers to pings, a client-side :meth:`ping`, and a
bound on the size of a received message.

::

    conn = await connect_websocket("ws://127.0.0.1:8079/mcp", token=secret)
    async with conn:
        await conn.send_message('{"jsonrpc":"2.0","id":1,"method":"ping"}')
        text = await conn.receive_message()

Errors (all :class:`exai.errors.ExaiError`)::

    WebSocketError           the connection could not be made or broke (retryable)
    ├── HandshakeRejected    the server answered the upgrade with an HTTP status (401, 503, …)
    └── ConnectionClosed     the connection ended; ``code``/``close_reason`` say how

Resource handling:
    A :class:`WebSocketConnection` owns its byte stream and starts no tasks: the caller's reader
    task drives it by calling :meth:`~WebSocketConnection.receive_message` (only one task may
    receive at a time; any number may send). Leaving its ``async with`` sends a close frame
    (bounded by a short grace period) and closes the stream.

Error handling:
    Every failure of the layer below (``OSError``, ``ssl.SSLError``, anyio stream errors, wsproto
    protocol errors) is mapped to one of the classes above with ``raise … from exc``.
"""

from __future__ import annotations

import ssl
import urllib.parse
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import wsproto
import wsproto.events as wse
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from exai.config import Secret, Settings, redact_url
from exai.errors import ExaiError

__all__ = [
    "ConnectionClosed",
    "HandshakeRejected",
    "NotTheMcpDoor",
    "Unreachable",
    "WebSocketConnection",
    "WebSocketError",
    "check_url",
    "connect_websocket",
    "make_ssl_context",
]

#: How long a close handshake may take before the stream is simply dropped.
CLOSE_GRACE_S = 0.5
#: Bytes read from the socket at a time.
RECEIVE_CHUNK = 65536
#: Largest HTTP rejection body kept (for the error message).
MAX_REJECT_BODY = 4096
#: Characters of a too-large received message kept on the 1009 error (for its id).
OVERSIZED_HEAD_CHARS = 4096


class WebSocketError(ExaiError):
    """The WebSocket connection could not be made, or broke. Retrying may succeed."""

    reason = "connection_failed"
    retryable = True


class HandshakeRejected(WebSocketError):
    """The server refused the upgrade with an HTTP status before any WebSocket state existed.

    Attributes:
        status: the HTTP status (401 bad token, 503 overloaded, …).
        body: the start of the response body, decoded leniently (for the message).
        retry_after_s: from ``Retry-After`` (delta-seconds form), when the server sent one.
    """

    def __init__(self, url: str, status: int, body: str, retry_after_s: float | None) -> None:
        if status in (401, 403):
            what = "refused the client token" if status == 401 else "forbids this client"
            msg = f"exai daemon at {url} {what} (HTTP {status}); check EXAI_TOKEN"
        else:
            msg = f"exai daemon at {url} rejected the connection with HTTP {status}"
        if body:
            msg += f": {body}"
        super().__init__(msg, retry_after_s=retry_after_s, data={"status": status})
        self.url = url
        self.status = status
        self.body = body

    @property
    def reason(self) -> str:  # type: ignore[override]
        if self.status in (401, 403):
            return "unauthorized"
        if self.status in (429, 503):
            return "overloaded"
        return "connection_failed"

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """Only overload and server errors are worth retrying; a bad token or URL is not."""
        return self.status in (408, 429) or self.status >= 500


class Unreachable(WebSocketError):
    """Nothing could be reached at the URL (refused, no route, TLS failed before HTTP)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"cannot connect to the exai daemon at {url}: {cause}")
        self.url = url


class NotTheMcpDoor(WebSocketError):
    """The server upgraded the connection without the ``mcp`` subprotocol: not an MCP door —
    on an exai daemon, the old op protocol's at ``/`` (``ws://host:8079``, the URL of the
    daemon exai replaces), where the MCP door is ``/mcp``. Retrying the same URL cannot help."""

    retryable = False

    def __init__(self, url: str, subprotocol: str) -> None:
        parts = urllib.parse.urlsplit(url)
        message = f"exai daemon at {url} did not accept subprotocol {subprotocol!r}"
        if parts.path.rstrip("/") != "/mcp":
            mcp_url = urllib.parse.urlunsplit(parts._replace(path="/mcp"))
            message += (
                f" (on an exai daemon, {parts.path or '/'} is the old op protocol's door): "
                f"connect to {mcp_url} (EXAI_URL)"
            )
        super().__init__(message)
        self.url = url


class ConnectionClosed(WebSocketError):
    """The connection ended.

    Attributes:
        code: the close code (1000 normal, 1001 going away, 1008 policy, 1009 too big, 1006
            when the connection was lost without a close frame).
        close_reason: the reason text the closing side gave (may be empty).
        oversized_head: when this side closed with 1009, the first
            :data:`OVERSIZED_HEAD_CHARS` characters of the message that was too large (its
            JSON-RPC id is there, so the caller can answer the request it belonged to).
    """

    reason = "connection_closed"

    def __init__(
        self, code: int, close_reason: str = "", *, url: str = "", oversized_head: str = ""
    ) -> None:
        where = f" to {url}" if url else ""
        text = f"WebSocket connection{where} closed with code {code}"
        if close_reason:
            text += f": {close_reason}"
        super().__init__(text, data={"close_code": code})
        self.code = code
        self.close_reason = close_reason
        self.oversized_head = oversized_head


def make_ssl_context(settings: Settings | None = None) -> ssl.SSLContext:
    """A verifying TLS context: the CA bundle in ``EXAI_TLS_CA`` when set, else the system store."""
    cafile = settings.tls_ca if settings is not None and settings.tls_ca else None
    return ssl.create_default_context(cafile=cafile)


def check_url(url: str) -> None:
    """Raise :class:`WebSocketError` (its message names ``url`` redacted) unless ``url`` is a
    ``ws://`` or ``wss://`` URL with a host and, if any, a valid port: a malformed URL is a
    configuration error, never worth retrying."""
    _parse_url(url)


def _parse_url(url: str) -> tuple[bool, str, int, str]:
    try:
        parts = urllib.parse.urlsplit(url)
        given_port = parts.port  # (ValueError: not a number, or out of 0-65535)
    except ValueError:
        raise WebSocketError(f"not a valid URL (a bad port?): {redact_url(url)!r}") from None
    if parts.scheme not in ("ws", "wss"):
        raise WebSocketError(f"not a WebSocket URL (ws:// or wss://): {redact_url(url)!r}")
    if not parts.hostname:
        raise WebSocketError(f"WebSocket URL without a host: {redact_url(url)!r}")
    secure = parts.scheme == "wss"
    port = given_port or (443 if secure else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return secure, parts.hostname, port, target


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value.decode("latin-1").strip()))
            except ValueError:
                return None  # the HTTP-date form needs the wall clock; fall back to backoff
    return None


async def connect_websocket(
    url: str,
    *,
    token: Secret | str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    subprotocol: str = "mcp",
    max_message_bytes: int = 4 * 1024 * 1024,
) -> WebSocketConnection:
    """Open a WebSocket connection and complete the upgrade.

    The caller bounds the whole attempt (TCP connect, TLS, upgrade) with ``fail_after``.

    Args:
        url: ``ws://host:port/path`` or ``wss://…``.
        token: sent as ``Authorization: Bearer <token>`` when given.
        ssl_context: for ``wss://``; default :func:`make_ssl_context` (system store), built in
            a worker thread.
        subprotocol: the subprotocol offered; the server must accept it.
        max_message_bytes: a larger received message closes the connection with 1009.

    Returns:
        The open connection. Use it as an async context manager to close it.

    Raises:
        HandshakeRejected: the server answered with an HTTP status instead of upgrading.
        WebSocketError: the address cannot be reached, TLS failed, or the server's answer is
            not a valid upgrade (or lacks the subprotocol).
    """
    secure, host, port, target = _parse_url(url)
    shown = redact_url(url)  # for messages: never a password or query string
    try:
        if secure:
            if ssl_context is None:
                # loading the system store reads files: not on the event loop
                ssl_context = await anyio.to_thread.run_sync(make_ssl_context)
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                host, port, tls=True, ssl_context=ssl_context, tls_hostname=host
            )
        else:
            stream = await anyio.connect_tcp(host, port)
    except (OSError, anyio.BrokenResourceError) as exc:
        raise Unreachable(shown, exc) from exc

    conn = WebSocketConnection(stream, url=shown, max_message_bytes=max_message_bytes)
    try:
        await conn._handshake(host, port, target, token, subprotocol)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    return conn


class WebSocketConnection:
    """One client WebSocket connection (see the module docstring).

    Attributes:
        url: the URL it was opened with, for display (password and query string removed).
        subprotocol: the subprotocol the server accepted.
    """

    def __init__(self, stream: anyio.abc.ByteStream, *, url: str, max_message_bytes: int) -> None:
        self.url = url
        self.subprotocol: str | None = None
        self._stream = stream
        self._ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self._max = max_message_bytes
        self._send_lock = anyio.Lock()
        self._parts: list[str] = []
        self._size = 0
        self._closed: ConnectionClosed | None = None
        self._pongs: dict[bytes, anyio.Event] = {}
        self._ping_seq = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<WebSocketConnection {self.url} {state}>"

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection ended, or ``None`` while it is open."""
        return self._closed

    def _mark_closed(self, closed: ConnectionClosed) -> ConnectionClosed:
        """Record the first reason the connection ended and wake every ping waiting on it."""
        if self._closed is None:
            self._closed = closed
            for waiter in self._pongs.values():
                waiter.set()
            self._pongs.clear()
        return self._closed

    def _lost(self) -> ConnectionClosed:
        return self._mark_closed(ConnectionClosed(1006, "connection lost", url=self.url))

    # -- handshake -----------------------------------------------------------------------

    async def _handshake(
        self, host: str, port: int, target: str, token: Secret | str | None, subprotocol: str
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        if token:
            value = token.reveal() if isinstance(token, Secret) else token
            headers.append((b"Authorization", b"Bearer " + value.encode("latin-1")))
        default_port = port in (80, 443)
        request = wse.Request(
            host=host if default_port else f"{host}:{port}",
            target=target,
            subprotocols=[subprotocol],
            extra_headers=headers,
        )
        await self._send_bytes(self._ws.send(request))
        status: int | None = None
        reject_headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        eof = False
        while True:
            for event in self._ws.events():
                if isinstance(event, wse.AcceptConnection):
                    if event.subprotocol != subprotocol:
                        raise NotTheMcpDoor(self.url, subprotocol)
                    self.subprotocol = event.subprotocol
                    return
                if isinstance(event, wse.RejectConnection):
                    status, reject_headers = event.status_code, list(event.headers)
                    if not event.has_body:
                        self._reject(status, reject_headers, body)
                elif isinstance(event, wse.RejectData):
                    if len(body) < MAX_REJECT_BODY:
                        body += event.data[: MAX_REJECT_BODY - len(body)]
                    if event.body_finished and status is not None:
                        self._reject(status, reject_headers, body)
            if eof:
                if status is not None:
                    self._reject(status, reject_headers, body)
                raise WebSocketError(
                    f"exai daemon at {self.url} closed the connection during the upgrade"
                )
            data = await self._receive_bytes()
            eof = not data
            try:
                self._ws.receive_data(data or None)
            except RemoteProtocolError as exc:
                raise WebSocketError(
                    f"exai daemon at {self.url} sent an invalid upgrade response: {exc}"
                ) from exc

    def _reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytearray) -> None:
        text = bytes(body).decode("utf-8", "replace").strip()
        raise HandshakeRejected(self.url, status, text[:500], _retry_after(headers))

    # -- bytes ---------------------------------------------------------------------------

    async def _send_bytes(self, data: bytes) -> None:
        if not data:
            return
        try:
            await self._stream.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise self._lost() from exc

    async def _receive_bytes(self) -> bytes:
        try:
            return await self._stream.receive(RECEIVE_CHUNK)
        except anyio.EndOfStream:
            return b""
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise self._lost() from exc

    # -- messages ------------------------------------------------------------------------

    async def send_message(self, text: str) -> None:
        """Send one text message.

        Raises:
            ConnectionClosed: the connection is closed or broke.
        """
        if self._closed is not None:
            raise self._closed
        async with self._send_lock:
            try:
                data = self._ws.send(wse.TextMessage(data=text))
            except LocalProtocolError as exc:
                raise self._mark_closed(ConnectionClosed(1006, str(exc), url=self.url)) from exc
            await self._send_bytes(data)

    async def receive_message(self) -> str:
        """Wait for the next text message. Pings are answered, pongs noted, on the way.

        Only one task may receive at a time.

        Raises:
            ConnectionClosed: the server closed the connection (its code and reason), the
                connection was lost (1006), a message exceeded the size bound (1009, after
                the bridge closed its side), or a binary message arrived (1003).
        """
        while True:
            for event in self._ws.events():
                text = await self._on_event(event)
                if text is not None:
                    return text
            if self._closed is not None:
                raise self._closed
            data = await self._receive_bytes()
            try:
                self._ws.receive_data(data or None)
            except RemoteProtocolError as exc:
                await self._fail(1002, f"protocol error: {exc}")
            if not data:
                # Lost without a close frame; let wsproto flush events first, then report.
                events = list(self._ws.events())
                for event in events:
                    text = await self._on_event(event)
                    if text is not None:
                        return text
                raise self._lost()

    async def _on_event(self, event: wse.Event) -> str | None:
        if isinstance(event, wse.TextMessage):
            self._size += len(event.data.encode("utf-8", "surrogatepass")) if event.data else 0
            if self._size > self._max:
                head = "".join([*self._parts, event.data[:OVERSIZED_HEAD_CHARS]])
                self._parts.clear()
                await self._fail(
                    1009, f"message larger than {self._max} bytes", head[:OVERSIZED_HEAD_CHARS]
                )
            self._parts.append(event.data)
            if event.message_finished:
                text = "".join(self._parts)
                self._parts.clear()
                self._size = 0
                return text
            return None
        if isinstance(event, wse.BytesMessage):
            await self._fail(1003, "binary messages are not supported")
        elif isinstance(event, wse.Ping):
            async with self._send_lock:
                await self._send_bytes(self._ws.send(event.response()))
        elif isinstance(event, wse.Pong):
            waiter = self._pongs.pop(bytes(event.payload), None)
            if waiter is not None:
                waiter.set()
        elif isinstance(event, wse.CloseConnection):
            closed = self._mark_closed(
                ConnectionClosed(event.code, event.reason or "", url=self.url)
            )
            try:
                async with self._send_lock:
                    await self._send_bytes(self._ws.send(event.response()))
            except (ConnectionClosed, LocalProtocolError):
                pass
            await anyio.aclose_forcefully(self._stream)
            raise closed
        return None

    async def _fail(self, code: int, reason: str, oversized_head: str = "") -> None:
        """Close our side with ``code`` and raise it (the peer broke the contract)."""
        closed = self._mark_closed(
            ConnectionClosed(code, reason, url=self.url, oversized_head=oversized_head)
        )
        with anyio.move_on_after(CLOSE_GRACE_S, shield=True):
            try:
                async with self._send_lock:
                    await self._send_bytes(self._ws.send(wse.CloseConnection(code, reason)))
            except (ConnectionClosed, LocalProtocolError):
                pass
        await anyio.aclose_forcefully(self._stream)
        raise closed

    async def ping(self, payload: bytes | None = None) -> None:
        """Send a ping and wait for its pong (the caller bounds the wait).

        The pong is noticed by whichever task is in :meth:`receive_message`, so a reader must
        be running.

        Raises:
            ConnectionClosed: the connection is closed or broke.
        """
        if self._closed is not None:
            raise self._closed
        if payload is None:
            self._ping_seq += 1
            payload = self._ping_seq.to_bytes(8, "big")
        event = self._pongs.setdefault(payload, anyio.Event())
        async with self._send_lock:
            await self._send_bytes(self._ws.send(wse.Ping(payload=payload)))
        await event.wait()
        if self._closed is not None:
            raise self._closed

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (bounded by a short grace period) and close the stream.

        Closing an already closed connection does nothing.
        """
        if self._closed is None:
            self._mark_closed(ConnectionClosed(code, reason, url=self.url))
            with anyio.move_on_after(CLOSE_GRACE_S, shield=True):
                try:
                    async with self._send_lock:
                        await self._send_bytes(self._ws.send(wse.CloseConnection(code, reason)))
                except (ConnectionClosed, LocalProtocolError):
                    pass
        await anyio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> WebSocketConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(1000 if exc is None else 1001)

    def extra(self, attribute: Any, default: Any = None) -> Any:
        """Stream attributes (e.g. ``anyio.abc.SocketAttribute.local_port``)."""
        return self._stream.extra(attribute, default)
