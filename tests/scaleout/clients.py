"""Clients of the scale-out tests: real ``exai bridge`` processes and plain WebSocket sessions.

:class:`BridgeClient` is what an editor runs: the ``exai bridge`` process speaking
newline-delimited JSON-RPC on its stdin/stdout, connected through the balancer, reconnecting and
re-sending unanswered calls with the same idempotency keys when its daemon goes away. The test
writes requests to its stdin and collects every line of its stdout, so "answered once" is
counted on what the editor would see.
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
