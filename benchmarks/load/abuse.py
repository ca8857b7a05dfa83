"""Hostile clients, one attack per function: ``python -m benchmarks.load.abuse <json config>``.

Config: ``attack`` (a name in :data:`ATTACKS`), ``url``, ``duration_s`` and the attack's own
fields. Each attack runs for ``duration_s``, then closes what it opened and emits
``{"event": "result", ...}`` with its counters. Add an attack by writing
``async def name(cfg) -> dict`` and listing it in :data:`ATTACKS` (and in the ``abuse``
scenario's list).

The daemon must serve the test tools (``exai serve --plugin tests.daemon_tools:register``):
``blob`` answers as many bytes as asked, ``sleep`` sleeps.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, connect_websocket_url

from benchmarks.load.common import config, emit, now, outcome_of, raise_nofile

MiB = 1024 * 1024


# ---------------------------------------------------------------------------- raw sockets
def _frame(payload: bytes) -> bytes:
    """A masked client text frame (the mask is all zeros: XOR leaves the payload as is)."""
    n = len(payload)
    head = bytes([0x81])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\0\0\0\0" + payload


async def _raw_upgrade(url: str) -> trio.SocketStream:
    """A TCP stream upgraded to WebSocket by hand (so nothing reads it unless we do)."""
    u = urlsplit(url)
    stream = await trio.open_tcp_stream(u.hostname or "127.0.0.1", u.port or 80)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {u.path or '/mcp'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mcp\r\n\r\n"
    )
    await stream.send_all(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise OSError("closed during the upgrade")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        await stream.aclose()
        raise OSError("upgrade refused: " + head.split(b"\r\n", 1)[0].decode("latin-1"))
    return stream


def _call(rid: int, name: str, arguments: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": rid,
            "method": "tools/call",
            "params": {"name": name, "arguments": arguments},
        }
    ).encode()


# ---------------------------------------------------------------------------- attacks
async def slow_readers(cfg: dict[str, Any]) -> dict[str, Any]:
    """``connections`` clients each send ``calls`` calls with ``answer_bytes`` answers and
    never read a byte; they hold their sockets open for the whole duration (issue 11.1)."""
    connections = int(cfg.get("connections", 4))
    calls = int(cfg.get("calls", 64))
    answer = int(cfg.get("answer_bytes", 512 * 1024))
    counts = {"connected": 0, "refused": 0, "requested_bytes": 0}
    streams: list[trio.SocketStream] = []
    frames = b"".join(_frame(_call(i, "blob", {"bytes": answer})) for i in range(calls))
    for _ in range(connections):
        try:
            stream = await _raw_upgrade(cfg["url"])
        except OSError:
            counts["refused"] += 1
            continue
        streams.append(stream)
        counts["connected"] += 1
        with trio.move_on_after(5):  # a daemon that stops reading us is fine too
            await stream.send_all(frames)
        counts["requested_bytes"] += calls * answer
    await trio.sleep(float(cfg["duration_s"]))
    for stream in streams:
        await trio.aclose_forcefully(stream)
    return counts


async def big_answers(cfg: dict[str, Any]) -> dict[str, Any]:
    """One client asks for ``answer_bytes`` answers back to back and reads them: every one is
    kept for re-sent requests (issue 11.2)."""
    answer = int(cfg.get("answer_bytes", 2 * MiB))
    outcomes: dict[str, int] = {}
    with trio.move_on_after(float(cfg["duration_s"])):
        async with trio.open_nursery() as nursery:
            conn = await connect_websocket_url(
                nursery, cfg["url"], subprotocols=["mcp"], max_message_size=64 * MiB
            )
            rid = 0
            while True:
                rid += 1
                await conn.send_message(_call(rid, "blob", {"bytes": answer}).decode())
                msg = json.loads(await conn.get_message())
                o = outcome_of(msg)
                outcomes[o] = outcomes.get(o, 0) + 1
    return {"answers": outcomes}


def _hostile_texts() -> list[str]:
    size = 4 * MiB - 300
    group = "[" * 30 + "]" * 30
    bodies = [
        "[" + ",".join([group] * (size // 61)) + "]",
        "[" + "[]," * (size // 3) + "[]]",
        "[" + '"",' * (size // 3) + '""]',
        "[" * 100_000 + "]" * 100_000,
    ]
    head = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"version",'
    return [head + '"arguments":{"x":' + body + "}}}" for body in bodies]


async def hostile_json(cfg: dict[str, Any]) -> dict[str, Any]:
    """One client sends 4 MiB frames built to be expensive to decode (deep nesting, millions
    of tiny arrays or strings), reading each answer, reconnecting when closed (issue 11.4)."""
    texts = _hostile_texts()
    outcomes: dict[str, int] = {}
    sent = 0
    closes = 0
    with trio.move_on_after(float(cfg["duration_s"])):
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    conn = await connect_websocket_url(
                        nursery, cfg["url"], subprotocols=["mcp"], max_message_size=64 * MiB
                    )
                    while True:
                        await conn.send_message(texts[sent % len(texts)])
                        sent += 1
                        o = outcome_of(json.loads(await conn.get_message()))
                        outcomes[o] = outcomes.get(o, 0) + 1
            except* (ConnectionClosed, HandshakeError, OSError):
                closes += 1
                await trio.sleep(0.05)
    return {"sent": sent, "answers": outcomes, "reconnects": closes}


async def one_connection_burst(cfg: dict[str, Any]) -> dict[str, Any]:
    """``connections`` bridges each keep ``parallel`` slow calls in flight on one connection
    (a whole editor multiplexed), more than its slots (issue 11.10)."""
    parallel = int(cfg.get("parallel", 20))
    seconds = float(cfg.get("seconds", 1.0))
    outcomes: dict[str, int] = {}

    async def bridge() -> None:
        async with trio.open_nursery() as nursery:
            conn = await connect_websocket_url(
                nursery, cfg["url"], subprotocols=["mcp"], max_message_size=64 * MiB
            )
            rid = 0
            while True:
                for _ in range(parallel):
                    rid += 1
                    await conn.send_message(_call(rid, "sleep", {"seconds": seconds}).decode())
                for _ in range(parallel):
                    o = outcome_of(json.loads(await conn.get_message()))
                    outcomes[o] = outcomes.get(o, 0) + 1

    with trio.move_on_after(float(cfg["duration_s"])):
        async with trio.open_nursery() as nursery:
            for _ in range(int(cfg.get("connections", 2))):
                nursery.start_soon(bridge)
    return {"answers": outcomes}


ATTACKS: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "slow_readers": slow_readers,
    "big_answers": big_answers,
    "hostile_json": hostile_json,
    "one_connection_burst": one_connection_burst,
}


async def main(cfg: dict[str, Any]) -> None:
    attack = ATTACKS[cfg["attack"]]
    emit("ready")
    t0 = now()
    counters = await attack(cfg)
    emit("result", attack=cfg["attack"], elapsed_s=now() - t0, **counters)


if __name__ == "__main__":
    raise_nofile()
    trio.run(main, config())
