"""An upstream that sends an answer far larger than any cap cannot exhaust the daemon's memory
(issue 11, item 2: the per-answer cap). Against a real ``exai serve`` process: calls whose
upstream streams 512 MiB each fail with ``answer_too_large`` once the cap is passed, the
upstream sees the read stop, nothing is stored, the daemon's memory stays bounded and a
well-behaved client is served beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from exai.testing import Fault, MockUpstream
from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio

CAP = 1024 * 1024
HUGE = 512 * 1024 * 1024
CALLS = 4


async def test_answers_far_over_the_cap_stop_at_the_cap_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    async with MockUpstream(models=("mock-fast",)) as mock:
        env = {
            "EXAI_PROVIDER_MOCK_BASE_URL": mock.base_url,
            "EXAI_PROVIDER_MOCK_MODELS": "mock-fast",
            "EXAI_FAST_MODELS": "mock-fast",
            "EXAI_QUALITY_MODELS": "mock-fast",
            "EXAI_MAX_ANSWER_BYTES": str(CAP),
        }
        async with live_daemon(tmp_path, **env) as daemon:
            await daemon.assert_serves()
            idle_rss = daemon.rss_bytes()
            mock.push(Fault.huge_answer(HUGE, chunk_bytes=64 * 1024), times=CALLS)
            replies: list[dict] = []

            async def attack() -> None:
                async with daemon.client() as rpc:
                    with trio.fail_after(SERVED_WITHIN_S * 2):
                        replies.append(
                            await rpc.call("chat", {"prompt": "flood", "model": "mock-fast"})
                        )

            async with trio.open_nursery() as nursery:
                for _ in range(CALLS):
                    nursery.start_soon(attack)
                await daemon.assert_serves()  # served while the attack runs
            grown = daemon.rss_bytes() - idle_rss

            assert len(replies) == CALLS
            for reply in replies:
                assert reply["error"]["data"]["reason"] == "answer_too_large", reply
            # the reads stopped at the cap: far less than the 2 GiB offered was even sent
            assert mock.body_bytes_sent < CALLS * HUGE // 8
            assert grown < 128 * 1024 * 1024, f"RSS grew by {grown} bytes"
            assert len(mock.chat_requests) == CALLS  # not retried, no fallback

            good = await daemon.call("chat", {"prompt": "hello", "model": "mock-fast"})
            assert good["result"]["isError"] is False, good
