"""Issue 12.1: a request id reused for another question gets that question's answer.

Before: the exactly-once key was session + request id, so on one connection ``chat "apple"``,
then ``chat "banana"`` and ``version`` with the same id (each after the previous finished) all
returned "apple". Now the key covers a digest of the method and params: the same question
re-sent joins the running call or gets its stored answer; another question after the first
finished is a new call; while the first is still running it is -32600 naming the id.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def test_one_id_reused_for_other_questions_gets_each_its_own_answer(tmp_path: Path) -> None:
    apple, banana = tmp_path / "apple", tmp_path / "banana"
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon, daemon.client() as rpc:
        with trio.fail_after(SERVED_WITHIN_S):
            first = await rpc.call("count", {"path": str(apple)}, id=7)
            second = await rpc.call("count", {"path": str(banana)}, id=7)
            third = await rpc.call("version", {}, id=7)
            again = await rpc.call("count", {"path": str(banana)}, id=7)
        assert first["result"]["content"][0]["text"] == "1"
        assert second["result"]["content"][0]["text"] == "1"
        assert "exai" in third["result"]["structuredContent"]
        # banana again: a new call too (the id last asked for version), which ran banana twice
        assert again["result"]["content"][0]["text"] == "2"
        assert _lines(apple) == 1 and _lines(banana) == 2


async def test_the_same_question_re_sent_joins_or_gets_the_stored_answer(tmp_path: Path) -> None:
    path = tmp_path / "runs"
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon, daemon.client() as rpc:
        args = {"path": str(path), "seconds": 1.0}
        await rpc.start_call("count", args, id="q")
        await rpc.start_call("count", args, id="q")  # while it runs: joins it
        with trio.fail_after(SERVED_WITHIN_S):
            one, two = await rpc.response("q"), await rpc.response("q")
            three = await rpc.call("count", args, id="q")  # after: the stored answer
        assert one["result"] == two["result"] == three["result"]
        assert _lines(path) == 1


async def test_another_question_under_an_id_still_running_is_invalid_request_naming_it(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon, daemon.client() as rpc:
        await rpc.start_call("sleep", {"seconds": 2.0}, id=42)
        await rpc.start_call("version", {}, id=42)
        with trio.fail_after(SERVED_WITHIN_S):
            refusal = await rpc.response(42)
            finished = await rpc.response(42)
        assert refusal["error"]["code"] == -32600
        assert "request id 42 is already in use" in refusal["error"]["message"]
        assert refusal["error"]["data"]["field"] == "id"
        assert finished["result"]["content"][0]["text"] == "slept"
