"""Many idle MCP sessions, held open with as little client state as possible.

Each session is a raw TCP stream: a hand-written WebSocket upgrade, one ``initialize`` request
and its response, then nothing (no reader task, no WebSocket library), so this process stays
small while it holds ten thousand of them.

Config: ``host``, ``port``, ``n`` (sessions to hold), ``parallel`` (upgrades in flight at once).

Commands on stdin after ``held``:

``probe N``  open N more connections one after another and time each from ``connect()`` to the
             HTTP status line (the daemon is at its cap, so these should be 503s);
``close``    close every session and write the result.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

import trio

from benchmarks.load.common import config, emit, now, raise_nofile, stdin_lines

INIT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "exai-bench-idle", "version": "0"},
        },
    }
).encode()
INITIALIZED = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame with FIN set."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def upgrade_request(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /mcp HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: mcp\r\n\r\n"
    ).encode()


async def read_head(stream: trio.SocketStream) -> tuple[int, bytes]:
    """The HTTP status of the response and the bytes read past its headers."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 else 0), rest


async def read_frame(stream: trio.SocketStream, buf: bytes) -> bytes:
    """One unmasked server frame's payload (``buf`` holds bytes already read)."""
    while True:
        if len(buf) >= 2:
            n = buf[1] & 0x7F
            off = 2
            if n == 126 and len(buf) >= 4:
                n, off = struct.unpack("!H", buf[2:4])[0], 4
            elif n == 127 and len(buf) >= 10:
                n, off = struct.unpack("!Q", buf[2:10])[0], 10
            if (n < 126 or off > 2) and len(buf) >= off + n:
                return buf[off : off + n]
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise trio.BrokenResourceError("closed before the initialize response")
        buf += chunk


async def open_session(host: str, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port)
    try:
        await stream.send_all(upgrade_request(host, port))
        status, rest = await read_head(stream)
        if status != 101:
            raise RuntimeError(f"http_{status}")
        await stream.send_all(frame(INIT))
        reply = json.loads(await read_frame(stream, rest))
        if "result" not in reply:
            raise RuntimeError("initialize_failed")
        await stream.send_all(frame(INITIALIZED))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def main(cfg: dict[str, Any]) -> None:
    host, port = cfg["host"], int(cfg["port"])
    n = int(cfg["n"])
    parallel = int(cfg.get("parallel", 128))
    held: list[trio.SocketStream] = []
    failures: dict[str, int] = {}
    sem = trio.Semaphore(parallel)
    emit("ready")
    t_start = now()

    async def one() -> None:
        try:
            with trio.fail_after(30):
                held.append(await open_session(host, port))
            if len(held) % 250 == 0:
                emit("progress", n=len(held), t=now())
        except (OSError, RuntimeError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            key = str(exc) if isinstance(exc, RuntimeError) else type(exc).__name__
            failures[key] = failures.get(key, 0) + 1
        finally:
            sem.release()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            await sem.acquire()
            nursery.start_soon(one)
    t_held = now()
    emit(
        "held",
        n=len(held),
        failures=failures,
        t_start=t_start,
        t_end=t_held,
        accept_rate_per_s=len(held) / max(t_held - t_start, 1e-9),
    )

    probes: list[dict[str, Any]] = []
    async for line in stdin_lines():
        if line.startswith("probe"):
            count = int(line.split()[1]) if len(line.split()) > 1 else 100
            for _ in range(count):
                t0 = now()
                status = 0
                try:
                    with trio.fail_after(10):
                        stream = await trio.open_tcp_stream(host, port)
                        try:
                            await stream.send_all(upgrade_request(host, port))
                            status, _ = await read_head(stream)
                        finally:
                            await trio.aclose_forcefully(stream)
                except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                    status = -1
                    failures[f"probe_{type(exc).__name__}"] = (
                        failures.get(f"probe_{type(exc).__name__}", 0) + 1
                    )
                probes.append({"t": t0, "lat": now() - t0, "status": status})
            emit("probed", probes=probes)
        elif line == "close":
            break
    alive = len(held)
    for stream in held:
        await trio.aclose_forcefully(stream)
    emit("result", held=alive, failures=failures, probes=probes)


if __name__ == "__main__":
    raise_nofile()
    trio.run(main, config())
