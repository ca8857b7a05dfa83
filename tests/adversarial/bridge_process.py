"""A real ``exai bridge`` process for adversarial tests: raw lines in, JSON-RPC lines out."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import trio

from tests.adversarial.harness import SERVED_WITHIN_S
from tests.helpers import REPO, subprocess_env

EXAI = str(Path(sys.executable).parent / "exai")


class BridgeProcess:
    """The MCP client's end of a running ``exai bridge``."""

    def __init__(self, proc: anyio.abc.Process) -> None:
        self.proc = proc
        self._buf = b""
        self.stderr = bytearray()

    async def send(self, msg: Any) -> None:
        """Write one message: a dict as one JSON line, or raw bytes exactly as given."""
        data = msg if isinstance(msg, bytes) else (json.dumps(msg) + "\n").encode()
        assert self.proc.stdin is not None
        await self.proc.stdin.send(data)

    async def recv(self) -> dict[str, Any]:
        """The next line the bridge writes (within ``SERVED_WITHIN_S``)."""
        assert self.proc.stdout is not None
        with trio.fail_after(SERVED_WITHIN_S):
            while b"\n" not in self._buf:
                try:
                    chunk = await self.proc.stdout.receive(65536)
                except anyio.EndOfStream:
                    raise AssertionError(
                        "the bridge closed stdout (it exited):\n" + self.stderr.decode()[-3000:]
                    ) from None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    async def request(self, msg: Any) -> dict[str, Any]:
        await self.send(msg)
        return await self.recv()

    async def initialize(self) -> None:
        reply = await self.request(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "attacker", "version": "1"},
                },
            }
        )
        assert "result" in reply, reply
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def alive(self) -> bool:
        return self.proc.returncode is None


@asynccontextmanager
async def bridge_process(tmp_path: Path, url: str, **env: str) -> AsyncIterator[BridgeProcess]:
    """``exai bridge`` to ``url``; killed on exit if still running."""
    full_env = subprocess_env(tmp_path, EXAI_URL=url, EXAI_LOG_LEVEL="info", **env)
    proc = await anyio.open_process([EXAI, "bridge"], env=full_env, cwd=str(REPO))
    bridge = BridgeProcess(proc)
    try:
        async with anyio.create_task_group() as tg:

            async def drain_stderr() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    bridge.stderr += chunk

            tg.start_soon(drain_stderr)
            yield bridge
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await proc.aclose()
