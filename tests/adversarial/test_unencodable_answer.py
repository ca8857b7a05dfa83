"""Issue 12.7 (the daemon's writer): one message that cannot be encoded never ends a session.

Before: a tool answer holding something JSON has no form for (NaN, for one) raised in the
session's send path, which took the whole connection down. Now such an answer becomes a
JSON-RPC error carrying the request's id (``data.reason = "unencodable_result"``) and the
session carries on; a lone surrogate is escaped as ``\\ud800``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio


async def test_an_answer_json_cannot_hold_is_an_error_with_its_id_and_the_session_lives(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon, daemon.client() as rpc:
        with trio.fail_after(SERVED_WITHIN_S):
            nan = await rpc.call("unencodable", {"what": "nan"}, id="n")
            surrogate = await rpc.call("unencodable", {"what": "surrogate"}, id="s")
            after = await rpc.call("version", {}, id="v")
        assert nan["id"] == "n"
        assert nan["error"]["code"] == -32603
        assert nan["error"]["data"]["reason"] == "unencodable_result"
        assert surrogate["result"]["content"][0]["text"] == "half a pair: \ud800"
        assert after["result"]["isError"] is False  # the same connection goes on
        await daemon.assert_serves()


async def test_the_escaped_surrogate_reaches_the_client_as_valid_utf8(tmp_path: Path) -> None:
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon, daemon.client() as rpc:
        await rpc.start_call("unencodable", {"what": "surrogate"}, id=1)
        with trio.fail_after(SERVED_WITHIN_S):
            raw = await rpc.conn.get_message()
        assert "\\ud800" in raw  # escaped on the wire, so the frame is valid UTF-8
        assert json.loads(raw)["id"] == 1
