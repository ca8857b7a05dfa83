"""The admin HTTP listener: ``/healthz``, ``/readyz`` and (when wired) ``/metrics``.

Loopback by default (``EXAI_ADMIN_HOST``). A deliberately small HTTP/1.1 server on h11: one
request per connection, bounded header size and time, GET only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
import trio

if TYPE_CHECKING:
    from exai.server.app import Daemon

__all__ = ["serve_admin"]

#: route → handler(daemon) returning (status, content type, body)
Route = Callable[["Daemon"], tuple[int, str, bytes]]
ROUTES: dict[str, Route] = {}


def route(path: str) -> Callable[[Route], Route]:
    def deco(fn: Route) -> Route:
        ROUTES[path] = fn
        return fn

    return deco


def _json(status: int, data: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data).encode()


@route("/healthz")
def _healthz(daemon: Daemon) -> tuple[int, str, bytes]:
    return _json(200, {"status": "ok"})


@route("/readyz")
def _readyz(daemon: Daemon) -> tuple[int, str, bytes]:
    ready, reason = daemon.readiness()
    return _json(200 if ready else 503, {"ready": ready, "reason": reason})


@route("/metrics")
def _metrics(daemon: Daemon) -> tuple[int, str, bytes]:
    from prometheus_client import CONTENT_TYPE_LATEST

    return 200, CONTENT_TYPE_LATEST, daemon.metrics.render()


async def _handle(daemon: Daemon, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    with trio.move_on_after(5.0):
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(16 * 1024)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    break
                return
            target = event.target.decode("latin-1").split("?", 1)[0]
            handler = ROUTES.get(target)
            if event.method != b"GET":
                status, ctype, body = _json(405, {"error": "only GET is served"})
            elif handler is None:
                status, ctype, body = _json(404, {"error": "not found", "paths": sorted(ROUTES)})
            else:
                status, ctype, body = handler(daemon)
            headers = [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def serve_admin(
    daemon: Daemon, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the admin endpoints until cancelled; ``task_status.started(url)`` when listening."""
    s = daemon.settings
    listeners = await trio.open_tcp_listeners(s.admin_port, host=s.admin_host)
    host, port = listeners[0].socket.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    limiter = trio.CapacityLimiter(64)

    async def handler(stream: trio.SocketStream) -> None:
        async with limiter:
            await _handle(daemon, stream)

    async with trio.open_nursery() as nursery:
        task_status.started(f"http://{host}:{port}")
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
