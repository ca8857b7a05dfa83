"""Issue 11.2 (server part): the exactly-once result store is bounded in bytes, not only count.

Before: up to 10,000 results of any size were kept for 600 s, each with its answer text twice:
300 calls with 3 MB answers left 2.7 GB resident after the client had gone. Now the store holds
at most ``EXAI_RESULT_CACHE_MAX_BYTES`` (oldest out first) and keeps each answer's text once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


async def test_finished_results_are_kept_within_their_byte_budget_and_their_text_once(
    tmp_path: Path,
) -> None:
    async with live_daemon(
        tmp_path, EXAI_RESULT_CACHE_MAX_BYTES=str(8 * MiB), EXAI_LOG_LEVEL="warning"
    ) as daemon:
        await daemon.call("blob", {"bytes": MiB})
        await daemon.assert_serves()
        idle = daemon.rss_bytes()
        one = (await daemon.status())["daemon"]["stored_results_bytes"]
        # a 1 MiB answer carried in the text and in structuredContent is stored once
        assert MiB <= one < 1.25 * MiB, one
        async with daemon.client() as rpc:
            for i in range(40):
                with trio.fail_after(SERVED_WITHIN_S):
                    reply = await rpc.call("blob", {"bytes": MiB}, id=i + 10)
                text = reply["result"]["content"][0]["text"]
                assert len(text) > MiB and reply["result"]["structuredContent"]["content"] in text
        st = (await daemon.status())["daemon"]
        assert st["stored_results_bytes"] <= 8 * MiB
        assert 4 <= st["stored_results"] < 20
        await daemon.assert_serves()
        settled = daemon.rss_bytes()
        # 40 MiB of answers (80 MiB of text) went through; what stays is about the budget
        assert settled - idle < 8 * MiB + 24 * MiB, f"{(settled - idle) / MiB:.0f} MiB kept"


async def test_a_result_re_sent_after_its_request_finished_comes_from_the_store_whole(
    tmp_path: Path,
) -> None:
    async with live_daemon(tmp_path, EXAI_LOG_LEVEL="warning") as daemon, daemon.client() as rpc:
        first = await rpc.call("blob", {"bytes": 200_000}, id="same")
        again = await rpc.call("blob", {"bytes": 200_000}, id="same")
        assert again == first  # rebuilt from the stored form: the same text, byte for byte
