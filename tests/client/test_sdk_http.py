"""Must-show 1 of issue 15: the official Python SDK's Streamable HTTP client, straight to a real
``exai serve`` (no bridge), in each of its modes.

``mode="auto"`` probes ``server/discover`` and speaks 2026-07-28 (stateless, the ``_meta``
envelope on every POST, cancellation by closing the request's stream); ``mode="legacy"`` does
the ``initialize`` handshake (``Mcp-Session-Id``, cancellation by posting
``notifications/cancelled``). In both the client lists the tools, calls ``version``, ``chat``
(progress received while the mock upstream streams) and a two-step ``thinkdeep`` workflow,
and cancels a slow ``chat``: the mock upstream sees its request end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client

from exai.testing import MockUpstream
from tests.adversarial.harness import live_daemon
from tests.httpmcp import MODERN, http_url

pytestmark = pytest.mark.anyio

WITHIN_S = 60.0


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize(("mode", "version"), [("auto", MODERN), ("legacy", "2025-11-25")])
async def test_official_sdk_over_streamable_http_lists_calls_and_cancels(
    tmp_path: Path, mode: str, version: str
) -> None:
    async with (
        MockUpstream(models=("mock-fast",), chunk_delay_s=0.02) as mock,
        live_daemon(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
            EXAI_HEARTBEAT_INTERVAL_S="1",
        ) as daemon,
        Client(http_url(daemon.url), mode=mode) as client,
    ):
        with anyio.fail_after(WITHIN_S):
            assert client.protocol_version == version
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"version", "chat", "thinkdeep"} <= names

            result = await client.call_tool("version", {})
            assert result.is_error is False and "exai" in text_of(result)

            progress: list[tuple[float, str | None]] = []

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append((value, message))

            chat = await client.call_tool(
                "chat",
                {"prompt": "hello over http", "model": "mock-fast"},
                progress_callback=on_progress,
            )
            assert chat.is_error is False
            assert "mock:mock-fast: hello over http" in text_of(chat)
            assert progress and progress[0][1] == "asking a model"

            step1 = await client.call_tool(
                "thinkdeep",
                {
                    "step": "is the door stateless?",
                    "step_number": 1,
                    "total_steps": 2,
                    "next_step_required": True,
                    "findings": "the 2026 era needs no session",
                    "model": "mock-fast",
                },
            )
            assert step1.is_error is False
            first = step1.structured_content
            assert first["status"] == "pause_for_investigation"
            step2 = await client.call_tool(
                "thinkdeep",
                {
                    "step": "conclude",
                    "step_number": 2,
                    "total_steps": 2,
                    "next_step_required": False,
                    "findings": "a signed session id serves the initialize era",
                    "continuation_id": first["continuation_id"],
                    "model": "mock-fast",
                },
            )
            assert step2.is_error is False
            assert len(mock.chat_requests) == 2  # chat, and the final step's one expert call

            # a slow call, cancelled by the client: the upstream request ends with it
            mock.latency_s = 120.0
            disconnects = mock.disconnects
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def slow() -> None:
                        await client.call_tool(
                            "chat", {"prompt": "never mind", "model": "mock-fast"}
                        )

                    tg.start_soon(slow)
                    while len(mock.chat_requests) < 3:
                        await anyio.sleep(0.02)
                    scope.cancel()
            await mock.wait_disconnect(disconnects + 1)
            assert mock.disconnects == disconnects + 1
            mock.latency_s = 0.0

            # the client is still served after the cancellation
            again = await client.call_tool("version", {})
            assert again.is_error is False
        await daemon.assert_serves()
        cancelled = await daemon.metric("exai_calls_total", outcome="cancelled")
        assert cancelled == 1, json.dumps(await daemon.status())[:400]
