"""A scripted stand-in for the exai daemon: MCP over WebSocket with trio-websocket.

It speaks the wire contract the client side relies on (subprotocol ``mcp``, bearer token, one
JSON-RPC message per text frame, 401 / 503 + Retry-After before the upgrade) and a handful of
tools whose behaviour tests can steer:

``echo``      answers its arguments as JSON text
``progress``  sends ``steps`` progress notifications, then answers ``"done"``
``hold``      waits until the test calls :meth:`FakeDaemon.release`, then answers the number of
              executions; a re-sent call with a known idempotency key (or the same id on the
              same connection) *joins* the running one
``fail``      answers a JSON-RPC error with the given ``reason`` / ``code``
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketRequest

TOOLS = [
    {"name": n, "description": f"test tool {n}", "inputSchema": {"type": "object"}}
    for n in ("echo", "progress", "hold", "fail")
]


class FakeDaemon:
    """See the module docstring. Start it with ``await nursery.start(daemon.serve)``."""

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.port = 0
        #: (connection number, message) for every message received, in order.
        self.received: list[tuple[int, dict[str, Any]]] = []
        #: Authorization header values seen on upgrade requests.
        self.auth_headers: list[str | None] = []
        self.subprotocols: list[tuple[str, ...]] = []
        self.connections = 0
        #: when set: (status, headers) every upgrade is rejected with
        self.reject_with: tuple[int, list[tuple[bytes, bytes]]] | None = None
        #: executions of ``hold`` started, by idempotency key (or request id)
        self.hold_started: list[str] = []
        self._hold_done: dict[str, tuple[trio.Event, list[Any]]] = {}
        self._release = trio.Event()
        self.message_seen = trio.Event()
        self.hold_running = trio.Event()
        #: messages for the client, to be sent on the newest connection
        self.conns: list[trio_websocket.WebSocketConnection] = []
        self._nursery: trio.Nursery | None = None

    # -- control -------------------------------------------------------------------------

    def release(self) -> None:
        """Let every ``hold`` call (running and future) finish."""
        self._release.set()

    def methods(self, conn: int | None = None) -> list[str]:
        """Methods received (on one connection, or all), in order."""
        return [
            m.get("method", "<response>") for c, m in self.received if conn is None or c == conn
        ]

    async def wait_for(self, predicate: Any) -> None:
        """Wait until ``predicate()`` holds (re-checked after each message or upgrade)."""
        while not predicate():
            event = self.message_seen
            await event.wait()

    async def send_to_client(self, msg: dict[str, Any]) -> None:
        await self.conns[-1].send_message(json.dumps(msg))

    # -- serving -------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            server = await nursery.start(
                trio_websocket.serve_websocket, self._handle, "127.0.0.1", 0, None
            )
            self.port = server.port
            task_status.started(self.port)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/mcp"

    async def _handle(self, request: WebSocketRequest) -> None:
        auth = dict(request.headers).get(b"authorization")
        self.auth_headers.append(auth.decode() if auth else None)
        self.subprotocols.append(tuple(request.proposed_subprotocols))
        self._kick()
        if self.reject_with is not None:
            status, headers = self.reject_with
            await request.reject(status, extra_headers=headers, body=b"go away")
            return
        if self.token is not None and auth != f"Bearer {self.token}".encode():
            await request.reject(401, body=b"bad token")
            return
        ws = await request.accept(subprotocol="mcp")
        self.connections += 1
        number = self.connections
        self.conns.append(ws)
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    msg = json.loads(await ws.get_message())
                    self.received.append((number, msg))
                    self._kick()
                    if "method" in msg and "id" in msg:
                        nursery.start_soon(self._answer, ws, msg, number)
            except ConnectionClosed:
                nursery.cancel_scope.cancel()

    async def _execute_hold(self, key: str) -> None:
        done, box = self._hold_done[key]
        await self._release.wait()
        box.append(len(self.hold_started))
        done.set()

    def _kick(self) -> None:
        self.message_seen.set()
        self.message_seen = trio.Event()

    async def _answer(
        self, ws: trio_websocket.WebSocketConnection, msg: dict[str, Any], conn: int
    ) -> None:
        try:
            reply = await self._result(ws, msg, conn)
            await ws.send_message(json.dumps({"jsonrpc": "2.0", "id": msg["id"], **reply}))
        except ConnectionClosed:
            pass

    async def _result(
        self, ws: trio_websocket.WebSocketConnection, msg: dict[str, Any], conn: int
    ) -> dict[str, Any]:
        method, params = msg["method"], msg.get("params") or {}
        if method == "initialize":
            return {
                "result": {
                    "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "fake-daemon", "version": "0"},
                }
            }
        if method == "ping":
            return {"result": {}}
        if method == "tools/list":
            return {"result": {"tools": TOOLS}}
        if method != "tools/call":
            return {"error": {"code": -32601, "message": f"method not found: {method}"}}
        name, args = params.get("name"), params.get("arguments") or {}
        meta = params.get("_meta") or {}
        if name == "echo":
            return _text(json.dumps({"arguments": args, "meta": meta}, sort_keys=True))
        if name == "progress":
            token = meta.get("progressToken")
            for i in range(int(args.get("steps", 3))):
                if token is not None:
                    await ws.send_message(
                        json.dumps(
                            {
                                "jsonrpc": "2.0",
                                "method": "notifications/progress",
                                "params": {
                                    "progressToken": token,
                                    "progress": i + 1,
                                    "total": args.get("steps", 3),
                                    "message": f"step {i + 1}",
                                },
                            }
                        )
                    )
            return _text("done")
        if name == "hold":
            # like the daemon: across connections only the idempotency key identifies a call
            key = meta.get("exai/idempotencyKey") or f"{conn}:{json.dumps(msg['id'])}"
            if key not in self._hold_done:
                self._hold_done[key] = (trio.Event(), [])
                self.hold_started.append(key)
                self.hold_running.set()
                # The execution belongs to the daemon, not to the (possibly dying) connection.
                assert self._nursery is not None
                self._nursery.start_soon(self._execute_hold, key)
            done, box = self._hold_done[key]
            await done.wait()
            return _text(str(box[0]))
        if name == "fail":
            data = {"reason": args.get("reason", "tool_error")}
            if "retry_after_s" in args:
                data["retry_after_s"] = args["retry_after_s"]
            return {
                "error": {
                    "code": args.get("code", -32000),
                    "message": args.get("message", "it failed"),
                    "data": data,
                }
            }
        return {"error": {"code": -32602, "message": f"unknown tool {name}"}}


def _text(text: str) -> dict[str, Any]:
    return {"result": {"content": [{"type": "text", "text": text}], "isError": False}}


@pytest.fixture
async def daemon() -> Any:
    """A running :class:`FakeDaemon` (trio only)."""
    fake = FakeDaemon()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        yield fake
        nursery.cancel_scope.cancel()


@pytest.fixture
def threaded_daemon() -> Iterator[FakeDaemon]:
    """A :class:`FakeDaemon` on its own trio loop in a thread, for tests on asyncio."""
    fake = FakeDaemon()
    ready: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            ready.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    token, scope = ready.get(timeout=10)
    try:
        yield fake
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)
