"""Helpers for tests that run a daemon in-process or as a subprocess and talk to it."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from exai.config import Settings
from exai.server.app import Daemon, serve
from exai.tools import ToolRegistry, default_registry

REPO = Path(__file__).resolve().parent.parent


def make_settings(tmp_path: Path | None = None, **overrides: Any) -> Settings:
    """Settings for tests: free ports, a private state dir, no ambient environment."""
    base = Settings.from_env({}, env_file="", config_file="")
    state = str(tmp_path / "state") if tmp_path is not None else ""
    values: dict[str, Any] = {
        "port": 0,
        "admin_port": 0,
        "state_dir": state,
        "heartbeat_interval_s": 0,
    }
    values.update(overrides)
    return attrs.evolve(base, **values)


def registry_with(*specs: Any) -> ToolRegistry:
    reg = default_registry()
    for s in specs:
        reg.register(s)
    return reg


@asynccontextmanager
async def running_daemon(
    settings: Settings, registry: ToolRegistry | None = None, services: dict[str, Any] | None = None
) -> AsyncIterator[Daemon]:
    """Run a daemon in this trio run; shut it down gracefully on exit."""
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(
            lambda task_status: serve(
                settings, registry, services, announce=False, task_status=task_status
            )
        )
        try:
            yield daemon
        finally:
            daemon.request_shutdown()


@asynccontextmanager
async def ws(
    daemon_or_url: Daemon | str, token: str | None = None, **kw: Any
) -> AsyncIterator[WebSocketConnection]:
    url = daemon_or_url if isinstance(daemon_or_url, str) else daemon_or_url.url
    headers = [("Authorization", f"Bearer {token}")] if token else []
    async with open_websocket_url(
        url, extra_headers=headers, subprotocols=["mcp"], max_message_size=64 * 1024 * 1024, **kw
    ) as conn:
        yield conn


class Rpc:
    """A small JSON-RPC peer over one WebSocket: requests by id, notifications kept aside."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []
        self.responses: dict[Any, dict[str, Any]] = {}

    async def send(self, msg: dict[str, Any]) -> None:
        await self.conn.send_message(json.dumps(msg))

    async def request(
        self, method: str, params: dict[str, Any] | None = None, *, id: Any = None
    ) -> dict[str, Any]:
        if id is None:
            self.next_id += 1
            id = self.next_id
        await self.send({"jsonrpc": "2.0", "id": id, "method": method, "params": params or {}})
        return await self.response(id)

    async def response(self, id: Any) -> dict[str, Any]:
        while id not in self.responses:
            msg = json.loads(await self.conn.get_message())
            if "id" in msg and "method" not in msg:
                self.responses[msg["id"]] = msg
            else:
                self.notifications.append(msg)
        return self.responses.pop(id)

    async def next_message(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self.conn.get_message())
        return result

    async def start_call(
        self, name: str, arguments: dict[str, Any] | None = None, *, id: Any, **meta: Any
    ) -> None:
        """Send a ``tools/call`` without waiting for its answer (``meta`` becomes ``_meta``)."""
        params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
        if meta:
            params["_meta"] = meta
        await self.send({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})

    async def call(
        self, name: str, arguments: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
        if "meta" in kw:
            params["_meta"] = kw.pop("meta")
        return await self.request("tools/call", params, **kw)


async def raw_upgrade(
    host: str,
    port: int,
    *,
    path: str = "/mcp",
    token: str | None = None,
    rcvbuf: int | None = None,
) -> tuple[trio.SocketStream, int, dict[str, str], bytes]:
    """Open a TCP stream and send a WebSocket upgrade by hand. ``rcvbuf``: the socket's receive
    buffer in bytes, set before it connects (a small one makes the server's writes block as
    soon as the client stops reading).

    Returns the stream, the HTTP status, the response headers and any bytes read past them.
    """
    if rcvbuf is None:
        stream = await trio.open_tcp_stream(host, port)
    else:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, port))
        stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mcp",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1]) if status_line else 0
    headers = {}
    for h in header_lines:
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    return stream, status, headers, rest


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A masked client frame with FIN set (any payload, even invalid UTF-8)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    # XOR as big integers: a per-byte Python loop over 300 KB would itself stall the loop
    full_mask = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(full_mask, "big")).to_bytes(n, "big")
    return head + mask + masked


def parse_close(data: bytes) -> int | None:
    """The close code of the first server frame in ``data`` if it is a close frame."""
    if len(data) < 4 or data[0] & 0x0F != 0x8:
        return None
    return int(struct.unpack("!H", data[2:4])[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "KIMI_", "GLM_"))}
    env.update(
        {
            "EXAI_PORT": "0",
            "EXAI_ADMIN_PORT": "0",
            "EXAI_STATE_DIR": str(tmp_path / "state"),
            "EXAI_LOG_FORMAT": "json",
            "PYTHONPATH": str(REPO),
        }
    )
    env.update(extra)
    return env


_LISTEN = re.compile(r'exai: listening on (wss?://[^\s"]+)')


@contextmanager
def daemon_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``exai serve`` as a subprocess; yield it and its URL once it is listening.

    Stderr is collected into ``proc.stderr_lines`` (a list) by a reader thread.
    """
    import threading

    cmd = [sys.executable, "-m", "exai.cli", "serve", *args]
    proc = subprocess.Popen(
        cmd,
        env=env or subprocess_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
    )
    lines: list[str] = []
    url_found = threading.Event()
    url: list[str] = []
    # cleared by a test to stop draining the daemon's stderr (a full pipe, as when nobody reads)
    gate = threading.Event()
    gate.set()

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            gate.wait()
            lines.append(line.rstrip("\n"))
            m = _LISTEN.search(line)
            if m and not url:
                url.append(m.group(1))
                url_found.set()
        url_found.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    proc.stderr_lines = lines  # type: ignore[attr-defined]
    proc.stderr_gate = gate  # type: ignore[attr-defined]
    try:
        if not url_found.wait(30) or not url:
            proc.kill()
            raise RuntimeError("exai serve did not start:\n" + "\n".join(lines))
        yield proc, url[0]
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        t.join(5)


@asynccontextmanager
async def async_daemon_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[subprocess.Popen[str], str]]:
    """:func:`daemon_process` for async tests: start-up and teardown run in a worker thread."""
    cm = daemon_process(tmp_path, *args, env=env)
    proc, url = await trio.to_thread.run_sync(cm.__enter__)
    try:
        yield proc, url
    finally:
        await trio.to_thread.run_sync(cm.__exit__, None, None, None)


async def wait_exit(proc: subprocess.Popen[str], timeout_s: float = 15) -> int:
    """Wait for a subprocess to exit without blocking the trio loop."""
    return await trio.to_thread.run_sync(proc.wait, timeout_s)


@attrs.define
class Instances:
    """What :func:`instances_of` saw: how many were made, and weak references to them."""

    made: int = 0
    refs: weakref.WeakSet[Any] = attrs.Factory(weakref.WeakSet)


@contextmanager
def instances_of(cls: type) -> Iterator[Instances]:
    """Every instance of ``cls`` made inside the block, counted and weakly referenced (its
    ``__init__`` wrapped meanwhile); :func:`live_objects` tells which a collection left alive."""
    seen = Instances()
    init = cls.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.made += 1
        seen.refs.add(self)
        init(self, *args, **kwargs)

    setattr(cls, "__init__", recording_init)  # noqa: B010 (mypy: assigning to a method)
    try:
        yield seen
    finally:
        setattr(cls, "__init__", init)  # noqa: B010


async def live_objects(seen: Instances) -> list[Any]:
    """The objects :func:`instances_of` saw made that are still alive after a full collection.

    Only the collection runs (in a worker thread; the stall check leaves garbage-collection
    pauses out): scanning ``gc.get_objects()`` for them instead walked every object of a whole
    suite's process in one C call — 123 ms on the loop, 185 ms in a worker thread holding the
    GIL the loop waited for (both failed the stall check in whole-suite runs)."""
    import gc

    await trio.to_thread.run_sync(gc.collect)
    return list(seen.refs)
