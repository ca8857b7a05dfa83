"""Raw clients that fetch one large tool answer through each door of a daemon and read it in
small pieces (no step of theirs grows with the answer: they run in the daemon's own trio run,
beside a stall detector), and the ``big`` tool that makes the answer.

Used by the ``large_answers`` scenario and by tests/server/test_large_answers.py.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from exai.tools.base import ToolContext, ToolResult, ToolSpec

#: reads of at most this many bytes
READ_BYTES = 64 * 1024
#: the 2026-07-28 per-request envelope (a sessionless HTTP request)
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
#: the answer's text: ASCII and two-byte and three-byte UTF-8 characters, a JSON escape
UNIT = 'exaï — ε "q"\n'


#: (bytes, unit) → (text, body): made once (:func:`prepare`), so the tool's own making of
#: its answer is not in the daemon's steps being measured
_MADE: dict[tuple[int, str], tuple[str, str]] = {}


def prepare(nbytes: int, unit: str = UNIT) -> tuple[str, str]:
    """The ``big`` tool's answer for ``nbytes`` (its text and its body), made once."""
    made = _MADE.get((nbytes, unit))
    if made is None:
        body = unit * (nbytes // len(unit.encode("utf-8", "surrogatepass")) + 1)
        made = _MADE[(nbytes, unit)] = (body + "\n\n---\nmodel: big", body)
    return made


async def _big(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    """About ``bytes`` of UTF-8 text, carried twice as a provider tool's answer is: in the
    text and in ``structuredContent.content``; after ``seconds``. Made ahead by
    :func:`prepare` (else in this step)."""
    await trio.sleep(float(args.get("seconds", 0.0)))
    unit = args.get("unit", UNIT) + ("\ud800" if args.get("surrogate") else "")
    text, body = prepare(int(args["bytes"]), unit)
    return ToolResult(text=text, structured={"content": body})


BIG = ToolSpec(
    name="big",
    description="Benchmark tool: answer about `bytes` bytes of text (twice) after `seconds`.",
    input_schema={
        "type": "object",
        "properties": {
            "bytes": {"type": "integer", "minimum": 0},
            "seconds": {"type": "number", "minimum": 0},
            "unit": {"type": "string", "minLength": 1},
            # (a lone surrogate after each unit: no client may send one in its arguments)
            "surrogate": {"type": "boolean"},
        },
        "required": ["bytes"],
        "additionalProperties": False,
    },
    handler=_big,
)


@attrs.define
class Answer:
    """What a raw client read: the answer's bytes (``keep``) or its length, and its ends."""

    nbytes: int = 0
    head: bytes = b""
    tail: bytes = b""
    body: bytearray | None = None
    #: HTTP: the status and content type; SSE: the events before the answer's
    status: int = 0
    content_type: str = ""

    def add(self, data: bytes | bytearray) -> None:
        if len(self.head) < 256:
            self.head += bytes(data[: 256 - len(self.head)])
        self.tail = (self.tail + bytes(data[-256:]))[-256:]
        self.nbytes += len(data)
        if self.body is not None:
            self.body += data


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class _Reader:
    def __init__(self, stream: trio.SocketStream, buf: bytes = b"") -> None:
        self.stream = stream
        self.buf = bytearray(buf)

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(READ_BYTES)
            if not data:
                raise EOFError("the daemon closed the connection")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def payload(self, n: int, into: Answer) -> None:
        """``n`` bytes into ``into``, a read at a time."""
        if self.buf:
            take = self.buf[:n]
            into.add(take)
            del self.buf[: len(take)]
            n -= len(take)
        while n > 0:
            data = await self.stream.receive_some(min(n, READ_BYTES))
            if not data:
                raise EOFError("the daemon closed the connection")
            into.add(data)
            n -= len(data)


def _client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))  # (small messages only)
    return head + mask + masked


async def _upgrade(url: str, path: str) -> _Reader:
    host, port = _host_port(url)
    stream = await trio.open_tcp_stream(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if path == "/mcp":
        lines.append("Sec-WebSocket-Protocol: mcp")
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(4096)
        if not data:
            raise EOFError("no upgrade")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"upgrade refused: {head[:200]!r}")
    return _Reader(stream, rest)


async def _frame(reader: _Reader, keep_under: int = 1 << 20) -> tuple[int, int, Answer]:
    """One server frame: its opcode, its length, and what was read of it (kept whole when
    shorter than ``keep_under``)."""
    b0, b1 = await reader.exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.exactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.exactly(8))
    answer = Answer(body=bytearray() if n < keep_under else None)
    await reader.payload(n, answer)
    return b0, n, answer


async def ws_answer(
    url: str, arguments: dict[str, Any], *, keep: bool = False, meta: dict[str, Any] | None = None
) -> Answer:
    """``tools/call big`` on the MCP WebSocket door; its response frame (the whole frame's
    bytes with ``keep``; the call's progress frames are skipped)."""
    reader = await _upgrade(url, "/mcp")
    params: dict[str, Any] = {"name": "big", "arguments": arguments}
    if meta:
        params["_meta"] = meta
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    async with reader.stream:
        await reader.stream.send_all(_client_frame(json.dumps(call).encode()))
        while True:
            b0, n, answer = await _frame(reader, keep_under=1 << 62 if keep else 1 << 16)
            if b0 != 0x81:
                raise RuntimeError(f"unexpected frame {b0:#x}")
            if answer.body is not None and b'"method"' in answer.head and n < 1 << 16:
                continue  # (progress)
            return answer


async def legacy_answer(url: str, arguments: dict[str, Any], *, keep: bool = False) -> Answer:
    """``call_tool big`` on the legacy op door (``/``); its ``call_tool_res`` frame."""
    reader = await _upgrade(url, "/")
    async with reader.stream:
        await reader.stream.send_all(_client_frame(json.dumps({"op": "hello"}).encode()))
        _, _, ack = await _frame(reader)
        if b"hello_ack" not in ack.head or b"true" not in ack.head:
            raise RuntimeError(f"legacy hello refused: {ack.head!r}")
        call = {"op": "call_tool", "request_id": "r1", "name": "big", "arguments": arguments}
        await reader.stream.send_all(_client_frame(json.dumps(call).encode()))
        while True:
            _, _, answer = await _frame(reader, keep_under=1 << 62 if keep else 1 << 16)
            if b"call_tool_res" in answer.head:
                return answer


async def http_answer(
    url: str, arguments: dict[str, Any], *, accept: str, keep: bool = False
) -> Answer:
    """``tools/call big`` on the Streamable HTTP door (sessionless, 2026-07-28); the response
    body (JSON, or the SSE stream: ``accept`` says which the client takes)."""
    host, port = _host_port(url)
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "big", "arguments": arguments, "_meta": MODERN_META},
    }
    body = json.dumps(call).encode()
    conn = h11.Connection(h11.CLIENT)
    request = conn.send(
        h11.Request(
            method="POST",
            target="/mcp",
            headers=[
                ("Host", f"{host}:{port}"),
                ("Content-Type", "application/json"),
                ("Accept", accept),
                ("Content-Length", str(len(body))),
            ],
        )
    )
    data = request + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    answer = Answer(body=bytearray() if keep else None)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_BYTES))
            elif isinstance(event, h11.Response):
                answer.status = event.status_code
                for name, value in event.headers:
                    if name == b"content-type":
                        answer.content_type = value.decode()
            elif isinstance(event, h11.Data):
                answer.add(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return answer
            else:
                raise RuntimeError(f"unexpected {event!r}")
