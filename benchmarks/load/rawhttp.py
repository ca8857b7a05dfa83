"""A keep-alive HTTP/1.1 client written by hand: the cost of an exchange without a client library.

It is the floor's HTTP side (what any gateway must do to ask the upstream: write a request, read
the response, decode its JSON) and the load generator for HTTP gateways such as the LiteLLM
proxy. One :class:`RawHttpCaller` owns one TCP connection and makes one call at a time.

Responses with ``Content-Length`` and ``Transfer-Encoding: chunked`` are read; a streamed answer
(``text/event-stream``) is decoded event by event (every ``data:`` line's JSON parsed, ``[DONE]``
required), a plain one as one JSON document. A response that says ``Connection: close`` (or a
connection the server closed) is followed by a new connection for the next call.

With ``mcp`` the answer is an MCP one (exai's Streamable HTTP door, or its echo floor): a JSON
body or an SSE stream whose last message with an ``id`` is the response; the outcome is what
:func:`benchmarks.load.common.outcome_of` makes of it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import trio

#: the largest response head or chunk-size line read (a bound, not a tuning knob)
MAX_HEAD_BYTES = 64 * 1024


class RawHttpCaller:
    """``await caller()`` sends one request and returns ``"ok"`` or ``"http_<status>"``.

    Args:
        url: the full URL to POST to (``http://host:port/v1/chat/completions``).
        body: the JSON body to send.
        headers: extra request headers (``Authorization``...).
        stream: whether the answer is SSE (``stream: true`` in ``body``).

    Raises (from a call): :class:`trio.BrokenResourceError` when the server closes mid-response,
    ``ValueError`` for a response that is not HTTP or not the expected JSON/SSE.
    """

    def __init__(
        self,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str] | None = None,
        stream: bool = False,
        mcp: bool = False,
    ) -> None:
        u = urlsplit(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.stream = stream
        self.mcp = mcp
        payload = json.dumps(body, separators=(",", ":")).encode()
        lines = [
            f"POST {u.path or '/'} HTTP/1.1",
            f"Host: {u.netloc}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        self._conn: trio.SocketStream | None = None
        self._buf = bytearray()

    async def connect(self) -> None:
        """Open the connection now (otherwise the first call opens it)."""
        if self._conn is None:
            self._conn = await trio.open_tcp_stream(self.host, self.port)
            self._buf.clear()

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.aclose()

    async def _fill(self) -> None:
        assert self._conn is not None
        chunk = await self._conn.receive_some(65536)
        if not chunk:
            raise trio.BrokenResourceError("the server closed the connection")
        self._buf += chunk

    async def _until(self, sep: bytes) -> bytes:
        start = 0
        while True:
            i = self._buf.find(sep, start)
            if i >= 0:
                out = bytes(self._buf[:i])
                del self._buf[: i + len(sep)]
                return out
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ValueError("response head or chunk line too long")
            start = max(0, len(self._buf) - len(sep) + 1)
            await self._fill()

    async def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def __call__(self) -> str:
        await self.connect()
        assert self._conn is not None
        try:
            await self._conn.send_all(self.request)
            head = await self._until(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            fields: dict[bytes, bytes] = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                fields[k.strip().lower()] = v.strip().lower()
            if fields.get(b"transfer-encoding") == b"chunked":
                parts = []
                while True:
                    size = int((await self._until(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await self._until(b"\r\n")  # end of (empty) trailers
                        break
                    parts.append(await self._exact(size))
                    await self._exact(2)
                body = b"".join(parts)
            else:
                body = await self._exact(int(fields.get(b"content-length", b"0")))
        except BaseException:
            await self.aclose()  # a half-read response leaves the connection unusable
            raise
        if fields.get(b"connection") == b"close":
            await self.aclose()
        if status != 200:
            return f"http_{status}"
        if self.mcp:
            return _mcp_outcome(
                body, sse=fields.get(b"content-type", b"").startswith(b"text/event-stream")
            )
        if not self.stream:
            json.loads(body)
            return "ok"
        done = False
        events = 0
        for line in body.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                else:
                    json.loads(data)
                    events += 1
        if not done or not events:
            raise ValueError(f"a stream of {events} events without [DONE]")
        return "ok"


def _mcp_outcome(body: bytes, *, sse: bool) -> str:
    """The outcome of an MCP answer over HTTP: a JSON body, or an SSE stream whose last
    message carries the request's ``id`` (``ok``, the error's reason, …)."""
    from benchmarks.load.common import outcome_of

    if not sse:
        return outcome_of(json.loads(body))
    last: dict[str, Any] | None = None
    for line in body.split(b"\n"):
        if line.startswith(b"data:"):
            msg = json.loads(line[5:].strip())
            if "id" in msg:
                last = msg
    if last is None:
        raise ValueError("an SSE answer without a response")
    return outcome_of(last)
