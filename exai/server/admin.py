"""The admin HTTP listener: ``/healthz``, ``/readyz`` and ``/metrics``.

Loopback by default (``EXAI_ADMIN_HOST``). A deliberately small HTTP/1.1 server on h11: one
request per connection, bounded header size and time, GET and HEAD only (HEAD: GET's head, no
body). A request must arrive within
:data:`HEAD_TIMEOUT_S` of its accept, and only then takes one of the 64 slots to be answered
in: connections that never send one (a balancer's half-open checks, or a slowloris) hold no
slot — they used to, for 5 s each, and a health check queued behind them all (200 of them: a
``/readyz`` answered after 14 s). The first head is read by the MCP listener's rule
(:func:`~exai.server.http11.read_first_head`): one that began and did not come whole in time is
answered 408 ``head_timeout``, a malformed one 400 (431 for its size), and a connection that
sent nothing is closed without a word; empty lines before the request line are ignored. At
most :data:`MAX_WAITING_HEADS` connections wait for their request at once; a new one past them
closes the oldest. An HTTP version other than 1.0 and 1.1 (the HTTP/2 preface, ``PRI *
HTTP/2.0``, is read as a head) is answered 505, as on the MCP port. Every refusal — a first
head's 400/408/431/505, a connection that sent nothing in time, one closed for a newer
(``evicted``) — is counted through ``refused(reason)``: the daemon's
``exai_connections_rejected`` and ``exai_rejections`` with ``listener="admin"``. It is handed
the three things it serves and counts with: a readiness view (``() -> (ready, reason)``), the
metrics renderer (``() -> bytes``) and that counter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import h11
import trio

from exai.logs import log_event
from exai.server.http11 import (
    SERVED_VERSIONS,
    linger,
    read_first_head,
    route_path,
    send_response,
)

__all__ = ["serve_admin"]

#: a route's handler: () -> (status, content type, body)
Route = Callable[[], tuple[int, str, bytes]]

#: how long after its accept a connection's request may take to arrive (slot wait included)
HEAD_TIMEOUT_S = 2.0
#: how long writing the answer may take
SEND_TIMEOUT_S = 5.0
#: connections waiting for their request at once: a new one past it closes the oldest of them
#: (a flood of connections held open for their head's bound would otherwise hold a task and a
#: descriptor each without limit; evicting the oldest, not refusing the newest, lets a health
#: check that sends its request at once through any such flood)
MAX_WAITING_HEADS = 256
#: the 408's message (a head begun and not whole within HEAD_TIMEOUT_S)
_HEAD_TIMEOUT_MESSAGE = f"the request head did not arrive within {HEAD_TIMEOUT_S:g} s"


def _json(status: int, data: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data).encode()


def _routes(
    readiness: Callable[[], tuple[bool, str | None]], metrics: Callable[[], bytes]
) -> dict[str, Route]:
    def healthz() -> tuple[int, str, bytes]:
        return _json(200, {"status": "ok"})

    def readyz() -> tuple[int, str, bytes]:
        ready, reason = readiness()
        return _json(200 if ready else 503, {"ready": ready, "reason": reason})

    def render_metrics() -> tuple[int, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST

        return 200, CONTENT_TYPE_LATEST, metrics()

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": render_metrics}


async def _refuse(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    reason: str,
    message: str,
    *,
    head_request: bool = False,
) -> None:
    """Answer a refusal (JSON, ``Connection: close``) and read what the client still sends."""
    body = json.dumps({"error": reason, "message": message}).encode()
    await send_response(
        stream,
        conn,
        status,
        [("Content-Type", "application/json")],
        body,
        close=True,
        head_request=head_request,
    )
    await linger(stream)  # (closed with bytes unread, the answer was lost)


async def _handle(
    routes: Mapping[str, Route],
    stream: trio.SocketStream,
    limiter: trio.CapacityLimiter,
    requested: Callable[[], object],
    refused: Callable[[str], None],
) -> None:
    """Answer one connection's request; ``requested()`` once its request has come (it can no
    longer be evicted as a connection that sends none), ``refused(reason)`` for a refusal."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        # the MCP listener's rule for a first head (exai.server.http11.read_first_head): 408
        # for one begun and not whole in time, 400/431 for a malformed one, nothing for a
        # connection that sent nothing
        first = await read_first_head(
            stream, conn, HEAD_TIMEOUT_S, keep_raw=False, timeout_message=_HEAD_TIMEOUT_MESSAGE
        )
        if first.reason is not None:
            refused(first.reason)
        with trio.move_on_after(SEND_TIMEOUT_S):
            # (no slot for a refusal: it costs its few bytes, and is cut at the send bound)
            if first.head is None:
                if first.reason is not None and first.status:
                    await _refuse(stream, conn, first.status, first.reason, first.message)
                return
            request = first.head.request
            requested()
            if request.http_version not in SERVED_VERSIONS:
                # (h11 reads "PRI * HTTP/2.0", the HTTP/2 preface, as a request head: 505, as
                # the MCP listener answers it, not a 404 for the path "*")
                refused("bad_request")
                version = request.http_version.decode("ascii", "replace")
                await _refuse(
                    stream,
                    conn,
                    505,
                    "bad_request",
                    f"HTTP/{version} is not served; use HTTP/1.1",
                    head_request=request.method == b"HEAD",
                )
                return
            await limiter.acquire()  # (a slot to answer in: only once the request is here)
            try:
                await _answer(routes, stream, conn, request)
            finally:
                limiter.release()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # (a local one too: one connection's failure never ends the admin listener)


async def _answer(
    routes: Mapping[str, Route], stream: trio.SocketStream, conn: h11.Connection, event: Any
) -> None:
    try:
        # (origin-form, or absolute-form ``http://host:port/healthz``: RFC 9112 §3.2.2)
        target: str | None = route_path(event.target.decode("latin-1"))
    except ValueError:
        target = None
    handler = routes.get(target) if target is not None else None
    if target is None:
        status, ctype, body = _json(400, {"error": "the request target is malformed"})
    elif event.method not in (b"GET", b"HEAD"):
        status, ctype, body = _json(405, {"error": "only GET and HEAD are served"})
    elif handler is None:
        status, ctype, body = _json(404, {"error": "not found", "paths": sorted(routes)})
    else:
        try:
            status, ctype, body = handler()
        except Exception as exc:  # (a route's failure is this request's, never the daemon's)
            log_event(
                "admin.route_failed",
                logging.ERROR,
                path=target,
                exc_type=type(exc).__name__,
                error=str(exc)[:200],
            )
            status, ctype, body = _json(500, {"error": f"{target} failed: {type(exc).__name__}"})
    headers = [
        ("Content-Type", ctype),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))  # (RFC 9110 §15.5.6)
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    if event.method != b"HEAD":  # (h11 refuses a body after a HEAD's head: RFC 9110 §9.3.2)
        await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def serve_admin(
    host: str,
    port: int,
    *,
    readiness: Callable[[], tuple[bool, str | None]],
    metrics: Callable[[], bytes],
    refused: Callable[[str], None] = lambda reason: None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoints until cancelled; ``task_status.started(url)`` when listening.

    Args:
        host: the address to bind (``EXAI_ADMIN_HOST``).
        port: the port (``EXAI_ADMIN_PORT``; 0 = a free one).
        readiness: what ``/readyz`` reports: ``(ready, reason)``.
        metrics: what ``/metrics`` serves: the Prometheus text exposition.
        refused: called with the reason of every connection refused (``bad_request``,
            ``head_timeout``, ``handshake_timeout``, ``evicted``).
    """
    routes = _routes(readiness, metrics)
    listeners = await trio.open_tcp_listeners(port, host=host)
    host, port = listeners[0].socket.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    limiter = trio.CapacityLimiter(64)
    #: the connections still waiting for their request, oldest first (a dict keeps its order)
    waiting: dict[trio.CancelScope, None] = {}

    async def handler(stream: trio.SocketStream) -> None:
        if len(waiting) >= MAX_WAITING_HEADS:
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.cancel()  # (closed without a word, as at its head's bound)
            refused("evicted")
        scope = trio.CancelScope()
        waiting[scope] = None
        try:
            with scope:
                await _handle(
                    routes, stream, limiter, lambda: waiting.pop(scope, None), refused
                )
        finally:
            waiting.pop(scope, None)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        task_status.started(f"http://{host}:{port}")
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
