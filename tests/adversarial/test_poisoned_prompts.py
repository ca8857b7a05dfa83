"""A client's bad input never takes a shared provider away from everyone (issue 12, item 6).

A lone surrogate (``"\\ud800"``) in a prompt once raised ``UnicodeEncodeError`` inside the
provider layer, which counted as a provider failure: about 20 such calls opened the provider's
breaker and every other client's chat failed. Against a real ``exai serve`` process: 100
poisoned calls, then the breaker is still closed, the upstream saw no request, and another
client's chat is served.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from exai.testing import MockUpstream
from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio


async def test_a_hundred_poisoned_prompts_leave_the_breaker_closed_and_others_served(
    tmp_path: Path,
) -> None:
    async with MockUpstream(models=("mock-fast",)) as mock:
        env = {
            "EXAI_PROVIDER_MOCK_BASE_URL": mock.base_url,
            "EXAI_PROVIDER_MOCK_MODELS": "mock-fast",
            "EXAI_PROVIDER_MOCK_BREAKER_MINIMUM_CALLS": "5",
            "EXAI_FAST_MODELS": "mock-fast",
            "EXAI_QUALITY_MODELS": "mock-fast",
        }
        async with live_daemon(tmp_path, **env) as daemon:
            async with daemon.client() as attacker:
                for _ in range(100):
                    with trio.fail_after(SERVED_WITHIN_S):
                        reply = await attacker.call(
                            "chat", {"prompt": "summarise \ud800 this", "model": "mock-fast"}
                        )
                    refused = "error" in reply or reply["result"]["isError"] is True
                    assert refused, reply
                    assert "circuit" not in str(reply)
            status = await daemon.status()
            breaker = status["providers"]["providers"]["mock"]["breaker"]
            assert breaker["state"] == "closed", breaker
            assert breaker["failures"] == 0, breaker
            assert mock.chat_requests == []  # refused before any upstream call

            other = await daemon.call("chat", {"prompt": "hello", "model": "mock-fast"})
            assert other["result"]["isError"] is False, other
            assert "mock:mock-fast: hello" in other["result"]["content"][0]["text"]
            await daemon.assert_serves()
