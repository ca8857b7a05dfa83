"""Issues 12.7 and 12.8: one message never ends ``exai bridge`` or ``exai.Client``, and every
refusal carries the id of the request it answers.

The bridge tests run the real ``exai bridge`` process against a real ``exai serve``; the client
tests run :class:`exai.Client` against a real ``exai serve``. After each attack the same bridge
(or client) answers an ordinary request, and the daemon serves a fresh well-behaved client.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import anyio
import pytest
import trio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from exai import Client
from exai.client.ws import ConnectionClosed
from exai.config import Settings
from exai.errors import ExaiError, InvalidParams
from tests.adversarial.bridge_process import EXAI, bridge_process
from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon
from tests.helpers import REPO, ws

pytestmark = pytest.mark.anyio

PING = {"jsonrpc": "2.0", "id": 99, "method": "ping"}
FOUR_MIB = 4 * 1024 * 1024


async def assert_bridge_still_answers(bridge) -> None:  # type: ignore[no-untyped-def]
    assert await bridge.request(PING) == {"jsonrpc": "2.0", "id": 99, "result": {}}
    assert bridge.alive()


# -- 12.7: the bridge ------------------------------------------------------------------------


async def test_a_lone_surrogate_in_a_message_does_not_end_the_bridge(tmp_path: Path) -> None:
    async with live_daemon(tmp_path) as daemon, bridge_process(tmp_path, daemon.url) as bridge:
        await bridge.initialize()
        # what the TypeScript SDK writes for a string cut in the middle of an emoji
        await bridge.send(
            b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"sleep",'
            b'"arguments":{"seconds":0},"_meta":{"note":"cut \\ud83d"}}}\n'
        )
        reply = await bridge.recv()
        assert reply["id"] == 2 and reply["result"]["isError"] is False
        # a lone surrogate in the id itself: the answer must carry that very id
        await bridge.send(b'{"jsonrpc":"2.0","id":"a\\udc00b","method":"ping"}\n')
        assert await bridge.recv() == {"jsonrpc": "2.0", "id": "a\udc00b", "result": {}}
        # and in an argument a tool sees: whatever the daemon says, it says it to id 4
        await bridge.send(
            b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"count",'
            b'"arguments":{"path":"/tmp/\\ud800"}}}\n'
        )
        assert (await bridge.recv())["id"] == 4
        await assert_bridge_still_answers(bridge)
        await daemon.assert_serves()


async def test_a_message_the_bridge_cannot_read_or_forward_gets_an_error_with_its_id(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path) as daemon, bridge_process(tmp_path, daemon.url) as bridge:
        await bridge.initialize()
        nan = b'{"jsonrpc":"2.0","id":5,"method":"ping","params":{"x":NaN}}\n'
        deep = (
            b'{"jsonrpc":"2.0","id":6,"method":"ping","params":{"x":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}}\n"
        )
        cut = b'{"jsonrpc":"2.0","id":7,"method":"ping","params":{"x":\n'
        for rid, line in ((5, nan), (6, deep), (7, cut)):
            reply = await bridge.request(line)
            assert reply["id"] == rid, reply
            assert reply["error"]["code"] == -32700
        # 1e9 is re-encoded as 1000000000.0: a line under the cap, too big once re-encoded
        line = (
            '{"jsonrpc":"2.0","id":8,"method":"ping","params":{"x":['
            + ",".join(["1e9"] * 800_000)
            + "]}}"
        )
        assert len(line) < FOUR_MIB
        reply = await bridge.request(line.encode() + b"\n")
        assert reply["id"] == 8 and reply["error"]["data"]["reason"] == "message_too_large"
        await assert_bridge_still_answers(bridge)
        await daemon.assert_serves()


async def test_a_daemon_frame_cap_below_the_bridges_answers_the_request_instead_of_looping(
    tmp_path: Path,
) -> None:
    async with (
        live_daemon(tmp_path, EXAI_MAX_FRAME_BYTES="65536") as daemon,
        bridge_process(tmp_path, daemon.url) as bridge,
    ):
        await bridge.initialize()
        big = {"jsonrpc": "2.0", "id": 3, "method": "ping", "params": {"pad": "x" * 100_000}}
        reply = await bridge.request(big)
        assert reply["id"] == 3
        assert reply["error"]["data"]["reason"] == "message_too_large"
        await assert_bridge_still_answers(bridge)
        await daemon.assert_serves()


async def test_an_answer_over_the_bridges_frame_cap_is_answered_instead_of_looping(
    tmp_path: Path,
) -> None:
    # the bridge takes at most 8 KiB per message; the daemon's tools/list answer is ~17 KB
    async with (
        live_daemon(tmp_path) as daemon,
        bridge_process(tmp_path, daemon.url, EXAI_MAX_FRAME_BYTES="8192") as bridge,
    ):
        await bridge.initialize()
        reply = await bridge.request({"jsonrpc": "2.0", "id": "list", "method": "tools/list"})
        assert reply["id"] == "list"
        assert reply["error"]["data"] == {"reason": "answer_too_large", "max_bytes": 8192}
        await assert_bridge_still_answers(bridge)
        await daemon.assert_serves()


# -- 12.8: a line over the cap ---------------------------------------------------------------


async def test_official_sdk_call_over_the_stdio_line_cap_fails_fast_through_the_bridge(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path) as daemon:
        params = StdioServerParameters(
            command=EXAI,
            args=["bridge"],
            env={"EXAI_URL": daemon.url, "PYTHONPATH": str(REPO), "EXAI_LOG_LEVEL": "info"},
            cwd=str(tmp_path),
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            with anyio.fail_after(SERVED_WITHIN_S):  # the SDK itself would wait forever
                await session.initialize()
                with pytest.raises(MCPError) as info:
                    await session.call_tool("sleep", {"seconds": 0, "pad": "x" * (5 << 20)})
                after = await session.call_tool("sleep", {"seconds": 0})
        assert f"larger than {FOUR_MIB} bytes" in info.value.error.message
        assert after.is_error is False


async def test_a_line_over_the_cap_with_its_id_at_the_end_is_answered_with_that_id(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path) as daemon, bridge_process(tmp_path, daemon.url) as bridge:
        await bridge.initialize()
        # the TypeScript SDK's member order: the id comes after the params
        line = (
            b'{"method":"tools/call","params":{"name":"sleep","arguments":{"pad":"'
            + b"x" * (5 << 20)
            + b'"}},"jsonrpc":"2.0","id":"ts-17"}\n'
        )
        reply = await bridge.request(line)
        assert reply["id"] == "ts-17"
        assert reply["error"]["data"] == {"reason": "message_too_large", "max_bytes": FOUR_MIB}
        await assert_bridge_still_answers(bridge)


async def test_a_frame_the_daemon_cannot_parse_is_answered_with_its_id(tmp_path: Path) -> None:
    async with live_daemon(tmp_path) as daemon, ws(daemon.url) as conn:
        await conn.send_message('{"jsonrpc":"2.0","id":5,"method":"ping","params":{"x":NaN}}')
        deep = '{"jsonrpc":"2.0","id":"deep","method":"ping","params":' + "[" * 100 + "]" * 100
        await conn.send_message(deep + "}")
        with trio.fail_after(SERVED_WITHIN_S):
            replies = [json.loads(await conn.get_message()) for _ in range(2)]
        assert [(r["id"], r["error"]["code"]) for r in replies] == [(5, -32700), ("deep", -32700)]
        await daemon.assert_serves()


# -- 12.7: exai.Client -----------------------------------------------------------------------


async def test_exai_client_refuses_a_call_it_cannot_send_and_keeps_serving(tmp_path: Path) -> None:
    async with live_daemon(tmp_path) as daemon:
        settings = Settings(url=daemon.url)
        async with Client(settings=settings) as client:
            with trio.fail_after(SERVED_WITHIN_S):
                with pytest.raises(InvalidParams, match="JSON cannot carry"):
                    await client.call_tool("sleep", {"seconds": math.nan})
                with pytest.raises(InvalidParams, match="EXAI_MAX_FRAME_BYTES") as info:
                    await client.call_tool("sleep", {"pad": "x" * (5 << 20)})
                assert info.value.extra["max_bytes"] == FOUR_MIB
                try:  # answered, whatever the tool makes of a path it cannot encode
                    await client.call_tool("count", {"path": "/tmp/\ud800"})
                except ExaiError as exc:
                    assert not isinstance(exc, ConnectionClosed)
                ok = await client.call_tool("sleep", {"seconds": 0})
        assert ok["isError"] is False
        await daemon.assert_serves()
