"""The old daemon's op protocol, spoken by a raw client to a real ``exai serve`` (issue 15,
must-show 6).

The client does what the old stdio shim (``run_ws_shim.py`` of Zazzles2908/EX-AI-MCP-Server)
does, frame for frame: connect to ``ws://host:port`` (path ``/``, no subprotocol, no header),
send ``hello`` with the token, read ``hello_ack``, then ``list_tools`` and ``call_tool`` reading
frames until the ``call_tool_res`` of its ``request_id`` (skipping ``call_tool_ack`` and
``progress``). A bad token gets ``hello_ack`` with ``ok: false`` and close code 4003, as the old
daemon did; the other hello failures close with 4000–4002.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio

TOKEN = "legacy-" + "t" * 40


def legacy_url(mcp_url: str) -> str:
    return mcp_url.removesuffix("/mcp") + "/"


async def send(conn: WebSocketConnection, **op: Any) -> None:
    await conn.send_message(json.dumps(op))


async def receive(conn: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(SERVED_WITHIN_S):
        result: dict[str, Any] = json.loads(await conn.get_message())
    return result


async def call_tool(
    conn: WebSocketConnection, request_id: str, name: str, arguments: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the shim does: send call_tool, read until its call_tool_res; (res, frames before)."""
    await send(conn, op="call_tool", request_id=request_id, name=name, arguments=arguments)
    seen: list[dict[str, Any]] = []
    while True:
        msg = await receive(conn)
        if msg.get("op") == "call_tool_res" and msg.get("request_id") == request_id:
            return msg, seen
        seen.append(msg)


async def closed_with(conn: WebSocketConnection) -> int | None:
    with trio.fail_after(SERVED_WITHIN_S):
        try:
            while True:
                await conn.get_message()
        except ConnectionClosed as closed:
            return closed.reason.code
    return None


async def test_an_old_shim_says_hello_lists_tools_and_calls_one_with_progress(
    tmp_path: Path,
) -> None:
    env = {"EXAI_TOKENS": f"shim:{TOKEN}", "EXAI_HEARTBEAT_INTERVAL_S": "0.5"}
    async with live_daemon(tmp_path, **env) as daemon:
        async with open_websocket_url(legacy_url(daemon.url)) as conn:
            await send(conn, op="hello", session_id="editor-1", token=TOKEN)
            ack = await receive(conn)
            assert ack["op"] == "hello_ack" and ack["ok"] is True and ack["session_id"]

            await send(conn, op="list_tools")
            listed = await receive(conn)
            assert listed["op"] == "list_tools_res"
            names = {t["name"] for t in listed["tools"]}
            assert {"chat", "version", "sleep"} <= names
            assert all("inputSchema" in t and "description" in t for t in listed["tools"])

            res, before = await call_tool(conn, "req-1", "sleep", {"seconds": 2})
            assert before[0] == {
                "op": "call_tool_ack",
                "request_id": "req-1",
                "accepted": True,
                "timeout": 300.0,
                "name": "sleep",
            }
            progress = [m for m in before if m["op"] == "progress"]
            assert progress and all(m["request_id"] == "req-1" for m in progress)
            assert any(m.get("note") == "slept 1s" for m in progress)
            assert res["outputs"] == [{"type": "text", "text": "slept"}]
            assert res["text"] == "slept" and "error" not in res

            # the old client-side suffix is accepted, as the old daemon did
            res, _ = await call_tool(conn, "req-2", "version_EXAI-WS", {})
            assert "exai" in res["text"] and "error" not in res

            res, _ = await call_tool(conn, "req-3", "no_such_tool", {})
            assert res["error"]["code"] == "TOOL_NOT_FOUND"
            res, _ = await call_tool(conn, "req-4", "sleep", {"seconds": "soon"})
            assert res["error"]["code"] == "INVALID_ARGUMENTS"
            assert "arguments.seconds" in res["error"]["message"]

            await send(conn, op="rotate_token", old=TOKEN, new="x" * 40)
            assert await receive(conn) == {"op": "error", "message": "Unknown op: rotate_token"}
            await conn.send_message("{not json")
            assert await receive(conn) == {"op": "error", "message": "invalid_json"}
        await daemon.assert_serves(token=TOKEN)


async def test_a_bad_token_gets_hello_ack_false_and_close_4003(tmp_path: Path) -> None:
    async with live_daemon(tmp_path, EXAI_TOKENS=f"shim:{TOKEN}") as daemon:
        async with open_websocket_url(legacy_url(daemon.url)) as conn:
            await send(conn, op="hello", session_id="s", token="wrong-" + "w" * 40)
            ack = await receive(conn)
            assert ack == {"op": "hello_ack", "ok": False, "error": "unauthorized"}
            assert await closed_with(conn) == 4003
        async with open_websocket_url(legacy_url(daemon.url)) as conn:
            await send(conn, op="hello", session_id="s")  # no token at all
            assert (await receive(conn))["error"] == "unauthorized"
            assert await closed_with(conn) == 4003
        await daemon.assert_serves(token=TOKEN)


async def test_hello_failures_close_with_the_old_codes(tmp_path: Path) -> None:
    async with live_daemon(tmp_path, EXAI_HANDSHAKE_TIMEOUT_S="1") as daemon:
        url = legacy_url(daemon.url)
        async with open_websocket_url(url) as conn:
            await conn.send_message("not json")
            assert (await receive(conn))["error"] == "invalid_hello"
            assert await closed_with(conn) == 4000
        async with open_websocket_url(url) as conn:
            await send(conn, op="list_tools")
            assert (await receive(conn))["error"] == "missing_hello"
            assert await closed_with(conn) == 4001
        async with open_websocket_url(url) as conn:
            assert await closed_with(conn) == 4002  # nothing sent within the bound
        await daemon.assert_serves()


@pytest.mark.parametrize("ids", ["reused", "long"])
async def test_two_calls_that_share_a_request_id_or_its_prefix_each_get_their_answer(
    tmp_path: Path, ids: str
) -> None:
    """A request_id sent again while its call runs, or two long ones alike in their first 200
    characters: each call_tool gets its call_tool_res with its answer. (The second used to be
    refused as a reused JSON-RPC id, and the first call's answer then went out as a bare
    ``{"op": "error"}`` the shim never matched: it waited until its own timeout.)"""
    first, second = ("same", "same") if ids == "reused" else ("r" * 250 + "A", "r" * 250 + "B")
    async with live_daemon(tmp_path) as daemon:
        async with open_websocket_url(legacy_url(daemon.url)) as conn:
            await send(conn, op="hello", session_id="editor-1")
            assert (await receive(conn))["ok"] is True
            await send(conn, op="call_tool", request_id=first, name="sleep", arguments={})
            await send(conn, op="call_tool", request_id=second, name="version", arguments={})
            answers: list[dict[str, Any]] = []
            while len(answers) < 2:
                msg = await receive(conn)
                assert msg["op"] != "error", msg
                if msg["op"] == "call_tool_res":
                    answers.append(msg)
        assert all("error" not in a for a in answers), answers
        by_text = sorted(answers, key=lambda a: a["text"] != "slept")
        assert by_text[0]["request_id"] == first and by_text[0]["text"] == "slept"
        assert by_text[1]["request_id"] == second and '"exai"' in by_text[1]["text"]
        await daemon.assert_serves()
