"""Issue 11.10: a bridge multiplexes a whole editor over one connection.

Before: calls beyond the connection's 8 slots waited at most ``EXAI_SLOT_WAIT_S`` (1 s):
20 parallel slow calls from one client got 12 refusals. Now they wait in the connection's FIFO
(at most ``EXAI_SESSION_QUEUE_MAX`` calls, each until its own deadline); beyond the FIFO a call
is refused at once with ``overloaded``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon
from tests.helpers import Rpc

pytestmark = pytest.mark.anyio


async def _start_sleeps(rpc: Rpc, n: int, seconds: float) -> None:
    for i in range(n):
        await rpc.start_call("sleep", {"seconds": seconds}, id=i)


async def _answers(rpc: Rpc, n: int) -> list[dict[str, Any]]:
    with trio.fail_after(SERVED_WITHIN_S * 2):
        return [await rpc.response(i) for i in range(n)]


async def test_twenty_parallel_slow_calls_on_one_connection_with_eight_slots_all_succeed(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon:
        async with daemon.client() as bridge:
            await _start_sleeps(bridge, 20, 2.0)
            await daemon.assert_serves()  # another connection is served meanwhile
            replies = await _answers(bridge, 20)
        assert [r.get("result", r.get("error")) for r in replies] == [
            {"content": [{"type": "text", "text": "slept"}], "isError": False}
        ] * 20
        await daemon.assert_serves()


async def test_calls_beyond_the_slots_and_the_fifo_are_refused_at_once_as_overloaded(
    tmp_path: Path,
) -> None:
    async with live_daemon(
        tmp_path, EXAI_SESSION_QUEUE_MAX="4", EXAI_LOG_LEVEL="warning"
    ) as daemon:
        async with daemon.client() as bridge:
            await _start_sleeps(bridge, 20, 2.0)
            replies = await _answers(bridge, 20)
        served = [r for r in replies if "result" in r]
        refused = [r for r in replies if "error" in r]
        assert len(served) == 8 + 4
        assert {r["error"]["data"]["reason"] for r in refused} == {"overloaded"}
        assert "EXAI_SESSION_QUEUE_MAX=4" in refused[0]["error"]["message"]
