"""What every load generator shares: the JSON-lines protocol and a small MCP client.

Times are ``time.monotonic()``: on Linux it is the system-wide CLOCK_MONOTONIC, so timestamps
from the load processes and the orchestrating process line up (trio's clock has a random
offset per run and would not).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

now = time.monotonic


def emit(event: str, **fields: Any) -> None:
    """Write one JSON line on stdout for the orchestrator."""
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def config() -> dict[str, Any]:
    """The JSON config given as the first argument."""
    raw = sys.argv[1] if len(sys.argv) > 1 else "{}"
    cfg: dict[str, Any] = json.loads(raw)
    return cfg


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def stdin_lines() -> Any:
    """Yield command lines from stdin (read in a worker thread; stdin is a pipe)."""
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        yield line.strip()


def chat_request(rid: int, prompt: str, model: str = "mock-fast") -> str:
    """A ``tools/call chat`` request as the text frame a client sends."""
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": "chat", "arguments": {"prompt": prompt, "model": model}},
        }
    )


def outcome_of(msg: dict[str, Any]) -> str:
    """``ok``, the error's ``data.reason``, ``tool_error`` (isError result) or ``error``."""
    if "error" in msg:
        err = msg["error"] or {}
        data = err.get("data") or {}
        return str(data.get("reason") or f"jsonrpc_{err.get('code')}")
    result = msg.get("result") or {}
    if result.get("isError"):
        sc = result.get("structuredContent") or {}
        return str(sc.get("reason") or "tool_error") if isinstance(sc, dict) else "tool_error"
    return "ok"


class McpConn:
    """One MCP session over WebSocket with any number of requests in flight.

    A reader task routes each response to its waiter by id. With ``echo=True`` any message
    with an ``id`` counts as the response (the floor's echo server sends the request back).
    """

    def __init__(self, conn: WebSocketConnection, echo: bool = False) -> None:
        self.conn = conn
        self.echo = echo
        self.next_id = 0
        self.waiting: dict[int, trio.Event] = {}
        self.responses: dict[int, dict[str, Any]] = {}
        self.closed = False

    @classmethod
    async def open(
        cls,
        nursery: trio.Nursery,
        url: str,
        *,
        echo: bool = False,
        initialize: bool = True,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> McpConn:
        conn = await connect_websocket_url(
            nursery,
            url,
            subprotocols=["mcp"],
            max_message_size=64 * 1024 * 1024,
            extra_headers=extra_headers,
        )
        self = cls(conn, echo)
        nursery.start_soon(self._reader)
        if initialize and not echo:
            await self.request(
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "exai-bench", "version": "0"},
                },
            )
            await self.conn.send_message(
                json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
            )
        return self

    async def _reader(self) -> None:
        try:
            while True:
                text = await self.conn.get_message()
                msg = json.loads(text)
                rid = msg.get("id")
                if rid is None or ("method" in msg and not self.echo):
                    continue  # a notification (progress) or a server request
                ev = self.waiting.pop(rid, None)
                if ev is not None:
                    self.responses[rid] = msg
                    ev.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            for ev in self.waiting.values():
                ev.set()

    async def send_text(self, rid: int, text: str) -> dict[str, Any]:
        """Send a request frame whose id is ``rid``; wait for its response."""
        ev = trio.Event()
        self.waiting[rid] = ev
        await self.conn.send_message(text)
        await ev.wait()
        return self.responses.pop(rid, {"error": {"data": {"reason": "connection_closed"}}})

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        text = json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return await self.send_text(rid, text)

    async def chat(self, prompt: str, model: str = "mock-fast") -> dict[str, Any]:
        self.next_id += 1
        return await self.send_text(self.next_id, chat_request(self.next_id, prompt, model))

    async def aclose(self) -> None:
        await self.conn.aclose()


class Records:
    """Per-call records kept as parallel lists: send time, latency, outcome."""

    def __init__(self) -> None:
        self.t: list[float] = []
        self.lat: list[float] = []
        self.outcome: list[str] = []

    def add(self, t: float, lat: float, outcome: str) -> None:
        self.t.append(round(t, 6))
        self.lat.append(round(lat, 7))
        self.outcome.append(outcome)

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "lat": self.lat, "outcome": self.outcome}
