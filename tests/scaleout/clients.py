"""Clients of the scale-out tests: real ``exai bridge`` processes, and the official SDK over
Streamable HTTP.

:class:`BridgeClient` is what an editor runs: the ``exai bridge`` process speaking
newline-delimited JSON-RPC on its stdin/stdout, connected through the balancer, reconnecting and
re-sending unanswered calls with the same idempotency keys when its daemon goes away. The test
writes requests to its stdin and collects every line of its stdout, so "answered once" is
counted on what the editor would see.

:class:`SdkHttpClient` is the official Python SDK's ``Client`` over Streamable HTTP through the
balancer (``cluster.http_url``), with a transport that re-sends a POST whose answer did not
arrive whole (:class:`RetryingTransport`) — what an HTTP client of a balanced deployment does —
and an idempotency key on every call, so that a re-sent call is the same execution.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import trio

from tests.scaleout.cluster import base_env

INIT = {
    "protocolVersion": "2025-11-25",
    "capabilities": {},
    "clientInfo": {"name": "scaleout-test", "version": "1"},
}


class BridgeClient:
    """One ``exai bridge`` process; see the module docstring."""

    def __init__(self, proc: trio.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        #: every answer received, by request id (a list: "answered once" is its length)
        self.answers: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.notifications: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self._write = trio.Lock()

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        async with self._write:  # one line at a time on the pipe
            await self.proc.stdin.send_all((json.dumps(msg) + "\n").encode())

    async def request(self, id: Any, method: str, params: dict[str, Any] | None = None) -> None:
        await self.send({"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}})

    async def call(self, id: Any, tool: str, arguments: dict[str, Any]) -> None:
        """Send a ``tools/call`` (the answer arrives in :attr:`answers`)."""
        await self.request(id, "tools/call", {"name": tool, "arguments": arguments})

    async def wait_answer(self, id: Any) -> dict[str, Any]:
        while not self.answers.get(id):
            await self._changed.wait()
        return self.answers[id][0]

    async def wait_answers(self, ids: list[Any]) -> None:
        while not all(self.answers.get(i) for i in ids):
            await self._changed.wait()

    async def initialize(self) -> None:
        await self.request("init", "initialize", INIT)
        answer = await self.wait_answer("init")
        assert "result" in answer, answer
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = await self.proc.stdout.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "id" in msg and "method" not in msg:
                    self.answers[msg["id"]].append(msg)
                else:
                    self.notifications.append(msg)
            self._changed.set()
            self._changed = trio.Event()


@asynccontextmanager
async def open_bridge(url: str, log: Path, name: str = "bridge") -> AsyncIterator[BridgeClient]:
    """Start ``exai bridge`` to ``url`` (its stderr in ``log``); closes its stdin on exit and
    waits for it to go (killed if it does not within 10 s)."""
    env = base_env(EXAI_URL=url, EXAI_LOG_LEVEL="info", EXAI_LOG_FORMAT="json")
    with log.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "exai.cli", "bridge"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    client = BridgeClient(proc, name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    assert proc.stdin is not None
                    await proc.stdin.aclose()
                    with trio.move_on_after(10):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()


class RetryingTransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport for the official SDK that re-sends a POST whose answer did not
    arrive whole — connection refused or reset, 502/503/504 (a daemon killed or draining), an
    SSE stream cut mid-way — byte for byte (the same request id and idempotency key), with
    backoff, and buffers each answer whole before the SDK reads it (so a cut stream is a retry,
    not an error the SDK would report).

    What a client of a balanced deployment does; the SDK itself retries nothing.
    """

    def __init__(self, inner: httpx2.AsyncBaseTransport, *, within_s: float = 120.0) -> None:
        self.inner = inner
        self.within_s = within_s
        #: POSTs sent again
        self.retries = 0
        #: the last ``Mcp-Session-Id`` a request carried (initialize era)
        self.session_id: str | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        delay = 0.05
        deadline = trio.current_time() + self.within_s
        self.session_id = request.headers.get("mcp-session-id") or self.session_id
        while True:
            try:
                response = await self.inner.handle_async_request(request)
                try:
                    if request.method == "POST" and response.status_code in (502, 503, 504):
                        raise _Again(f"HTTP {response.status_code}")
                    content = await response.aread()
                finally:
                    await response.aclose()
                headers = [
                    (k, v)
                    for k, v in response.headers.multi_items()
                    if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
                ]
                return httpx2.Response(
                    response.status_code, headers=headers, content=content, request=request
                )
            except (httpx2.TransportError, _Again):
                if request.method != "POST" or trio.current_time() + delay > deadline:
                    raise
                self.retries += 1
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Again(Exception):
    """An answer that says: send the request again (elsewhere)."""


class SdkHttpClient:
    """The official Python SDK's ``Client`` over Streamable HTTP, with
    :class:`RetryingTransport`; its calls carry an idempotency key (``<name>:<id>``), so a
    re-sent call joins or gets the one execution. The same interface as :class:`BridgeClient`
    (``call``, ``answers``, ``wait_answer``) for the scale-out experiments."""

    def __init__(self, client: Any, transport: RetryingTransport, name: str, nursery: Any) -> None:
        self.client = client
        self.transport = transport
        self.name = name
        self._nursery = nursery
        self.answers: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.notifications: list[dict[str, Any]] = []
        self._changed = trio.Event()

    def transport_session_id(self) -> str | None:
        """The ``Mcp-Session-Id`` the client's requests carry (initialize era)."""
        return self.transport.session_id

    async def initialize(self) -> None:
        """Reach the daemon once (the handshake already happened when the client opened)."""
        await self.client.list_tools()

    async def call(self, id: Any, tool: str, arguments: dict[str, Any]) -> None:
        """Start a ``tools/call`` (the answer arrives in :attr:`answers`)."""
        self._nursery.start_soon(self._call, id, tool, arguments)

    async def _call(self, id: Any, tool: str, arguments: dict[str, Any]) -> None:
        from mcp.shared.exceptions import MCPError

        try:
            result = await self.client.call_tool(
                tool, arguments, meta={"exai/idempotencyKey": f"{self.name}:{id}"}
            )
            answer: dict[str, Any] = {
                "id": id,
                "result": result.model_dump(by_alias=True, mode="json", exclude_none=True),
            }
        except MCPError as exc:
            answer = {"id": id, "error": {"code": exc.code, "message": str(exc)}}
        self.answers[id].append(answer)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_answer(self, id: Any) -> dict[str, Any]:
        while not self.answers.get(id):
            await self._changed.wait()
        return self.answers[id][0]


@asynccontextmanager
async def open_sdk_http(
    url: str, name: str = "http", *, mode: str = "auto"
) -> AsyncIterator[SdkHttpClient]:
    """The official SDK's client at ``url`` (Streamable HTTP) in ``mode`` (``"auto"``: the
    2026-07-28 era when the server speaks it; ``"legacy"``: the initialize era)."""
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    transport = RetryingTransport(httpx2.AsyncHTTPTransport())
    http = httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(30.0, read=300.0))
    async with (
        http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
        trio.open_nursery() as nursery,
    ):
        yield SdkHttpClient(client, transport, name, nursery)
