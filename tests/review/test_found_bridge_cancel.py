"""Review finding: a call the client cancels while the bridge is reconnecting keeps running."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import trio
import trio.testing

from exai.client.bridge import Bridge
from exai.config import Settings
from exai.testing.faultproxy import FaultProxy
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import make_settings, registry_with, running_daemon

pytestmark = pytest.mark.anyio

OBJ: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": True}


class Hold:
    """A tool that runs until cancelled (or released), counting what happened."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.spec = ToolSpec(name="hold", description="hold", input_schema=OBJ, handler=self.run)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


class Stdio:
    """The MCP client's end of the bridge's stdin/stdout."""

    def __init__(self) -> None:
        self.stdin_send, self.stdin_recv = trio.testing.memory_stream_one_way_pair()
        self.stdout_send, self.stdout_recv = trio.testing.memory_stream_one_way_pair()
        self._buf = b""

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stdin_send.send_all((json.dumps(msg) + "\n").encode())

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while b"\n" not in self._buf:
                self._buf += await self.stdout_recv.receive_some(65536)
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


async def test_cancel_sent_while_the_bridge_reconnects_cancels_the_call(tmp_path):
    """The client cancels call 1 while the bridge is between connections. The bridge drops
    the call from its re-send queue and forwards only the notification, which the daemon's
    new session ignores (it never saw id 1); the orphaned execution runs on for the whole
    orphan grace (30 s) instead of being cancelled."""
    hold = Hold()
    async with (
        running_daemon(make_settings(tmp_path), registry_with(hold.spec)) as d,
        FaultProxy("127.0.0.1", int(d.url.rsplit(":", 1)[1].split("/")[0])) as proxy,
        trio.open_nursery() as nursery,
    ):
        bridge = Bridge(
            Settings(url=f"ws://127.0.0.1:{proxy.port}/mcp", handshake_timeout_s=2.0),
            rng=random.Random(1),
        )
        client = Stdio()
        nursery.start_soon(bridge.run, client.stdin_recv, client.stdout_send)
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
        )
        assert "result" in await client.recv()
        await client.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        await client.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "hold", "arguments": {}},
            }
        )
        with trio.fail_after(5):
            await hold.started.wait()
        proxy.cut()
        with trio.fail_after(5):
            while bridge._connected:  # the bridge noticed the loss
                await trio.sleep(0.01)
        await client.send(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
        )
        proxy.restore()
        await client.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        assert (await client.recv())["id"] == 2  # reconnected; the cancel went out before it
        with trio.move_on_after(3):  # well inside the 30 s orphan grace
            await hold.cancelled.wait()
        cancelled = hold.cancelled.is_set()
        still_running = len(d.calls.running)
        for ex in list(d.calls.running.values()):
            ex.cancel()  # do not wait out the drain
        nursery.cancel_scope.cancel()
    assert cancelled, (
        f"the cancelled call is still running ({still_running} execution(s)) after 3 s"
    )
