"""Helpers for tests of the Streamable HTTP door: a small MCP-over-HTTP client on httpx, and
raw HTTP/1.1 exchanges (h11 on the client side) for requests no library would send."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx
import trio

MODERN = "2026-07-28"
ACCEPT_BOTH = "application/json, text/event-stream"


def http_url(url: str) -> str:
    """The HTTP URL of a daemon's MCP endpoint, from its ``ws://`` URL."""
    return url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


def envelope(version: str = MODERN) -> dict[str, Any]:
    """The 2026-07-28 per-request ``_meta`` envelope."""
    return {
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": {},
    }


def sse_messages(text: str) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an SSE body (``data:`` lines of ``message`` events)."""
    out = []
    for block in text.split("\n\n"):
        data = [ln[5:].strip() for ln in block.splitlines() if ln.startswith("data:")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


class McpHttp:
    """One MCP client over Streamable HTTP (an httpx client it owns or is given).

    ``await mcp.initialize(version)`` starts an initialize-era session (kept in
    :attr:`session_id`); without it requests are sent in the 2026-07-28 era (the envelope is
    added to ``params._meta``).
    """

    def __init__(self, client: httpx.AsyncClient, url: str, *, token: str | None = None) -> None:
        self.client = client
        self.url = http_url(url)
        self.token = token
        self.session_id: str | None = None
        self.version: str | None = None
        self.next_id = 0

    def headers(self, **extra: str) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": ACCEPT_BOTH}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if self.session_id:
            h["Mcp-Session-Id"] = self.session_id
            assert self.version is not None
            h["MCP-Protocol-Version"] = self.version
        h.update(extra)
        return h

    def message(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        id: Any = None,
        notify: bool = False,
    ) -> dict[str, Any]:
        params = dict(params or {})
        if self.session_id is None and method != "initialize":
            params["_meta"] = {**envelope(), **params.get("_meta", {})}
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notify:
            if id is None:
                self.next_id += 1
                id = self.next_id
            msg["id"] = id
        return msg

    async def post(self, msg: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.client.post(self.url, json=msg, headers=self.headers(**headers))

    async def request(
        self, method: str, params: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        """One request; its JSON-RPC response (from a JSON or an SSE body)."""
        response = await self.post(self.message(method, params, **kw))
        return answer_of(response)

    async def call(self, name: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
        if "meta" in kw:
            params["_meta"] = kw.pop("meta")
        return await self.request("tools/call", params, **kw)

    async def initialize(self, version: str = "2025-11-25") -> dict[str, Any]:
        response = await self.post(
            self.message(
                "initialize",
                {
                    "protocolVersion": version,
                    "capabilities": {},
                    "clientInfo": {"name": "http-test", "version": "1"},
                },
            )
        )
        assert response.status_code == 200, response.text
        self.session_id = response.headers["mcp-session-id"]
        reply = response.json()
        self.version = reply["result"]["protocolVersion"]
        await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return dict(reply)


def answer_of(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response in an HTTP response (JSON body, or the last SSE message)."""
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        messages = sse_messages(response.text)
        final = [m for m in messages if "id" in m and "method" not in m]
        assert final, response.text
        return final[-1]
    result: dict[str, Any] = response.json()
    return result


@asynccontextmanager
async def mcp_http(
    url: str, *, token: str | None = None, timeout: float = 60
) -> AsyncIterator[McpHttp]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        yield McpHttp(client, url, token=token)


async def raw_exchange(
    url: str, data: bytes, *, read_body: bool = True, bound_s: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` (a whole request, written by the test) on a new connection; the status,
    headers (lower-case names, last value wins) and body of the response (h11 reads it)."""
    parts = urlsplit(http_url(url))
    stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    conn = h11.Connection(h11.CLIENT)
    # the request went out as written by the test; tell h11 one was sent, so it reads the answer
    method = data.split(b" ", 1)[0]
    if not method.isalpha():
        method = b"POST"  # (not HTTP at all: any method will do to read the refusal)
    conn.send(
        h11.Request(method=method, target="/", headers=[("Host", "x"), ("Content-Length", "0")])
    )
    conn.send(h11.EndOfMessage())
    async with stream:
        with trio.fail_after(bound_s):
            await stream.send_all(data)
            status, headers, body = 0, {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    chunk = await stream.receive_some(65536)
                    conn.receive_data(chunk)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    if not read_body:
                        break
                    continue
                if isinstance(event, h11.Data):
                    body += bytes(event.data)
                    continue
                break
    return status, headers, body


def request_bytes(
    url: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    headers: list[tuple[str, str]] | None = None,
    content_length: int | None = None,
) -> bytes:
    """A request written by hand, exactly as given (for headers no client library sends)."""
    parts = urlsplit(http_url(url))
    lines = [f"{method} {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}"]
    for k, v in headers or []:
        lines.append(f"{k}: {v}")
    chunked = any(k.lower() == "transfer-encoding" for k, _ in headers or [])
    if content_length is None and method in ("POST", "PUT") and not chunked:
        content_length = len(body)
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
