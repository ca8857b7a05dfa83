"""Every size limit is checked before any upstream call (issue 12, finding 9).

A 3.9 MB prompt with no ``continuation_id`` was sent upstream, answered and billed, and only
then refused with "conversation would exceed its limit … omit continuation_id" (it had none).
Now the call is refused before the provider sees it, naming the argument that is too big; so is
a call on a thread that has too few turns left for what the call stores.

Against a real ``exai serve`` process with the mock provider; the mock records every request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.helpers import Rpc, async_daemon_process, subprocess_env, ws

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def daemon(tmp_path: Path, **env: str) -> AsyncIterator[tuple[str, MockUpstream]]:
    async with MockUpstream(models=("mock-fast",)) as mock:
        full = subprocess_env(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
            EXAI_FAST_MODELS="mock-fast",
            EXAI_QUALITY_MODELS="mock-fast",
            **env,
        )
        async with async_daemon_process(tmp_path, env=full) as (_proc, url):
            yield url, mock


async def call(url: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    async with ws(url) as conn:
        with trio.fail_after(60):
            return await Rpc(conn).call(name, args)


async def test_a_prompt_too_big_for_any_conversation_is_refused_before_the_upstream_call(
    tmp_path: Path,
) -> None:
    prompt = "p" * 3_900_000  # under the 4 MiB frame cap, over the 2 MB a thread holds
    async with daemon(tmp_path) as (url, mock):
        reply = await call(url, "chat", {"prompt": prompt, "model": "mock-fast"})
        upstream_calls = len(mock.chat_requests)
    error = reply["error"]
    assert upstream_calls == 0, "the prompt was sent (and billed) before being refused"
    assert error["code"] == -32602
    assert error["data"]["field"] == "arguments.prompt"
    assert "arguments.prompt" in error["message"] and "3900000" in error["message"]
    assert "omit continuation_id" not in error["message"]


async def test_a_thread_without_room_for_the_calls_turns_is_refused_before_the_upstream_call(
    tmp_path: Path,
) -> None:
    async with daemon(tmp_path, EXAI_CONVERSATION_MAX_TURNS="3") as (url, mock):
        first = await call(url, "chat", {"prompt": "one", "model": "mock-fast"})
        cid = first["result"]["structuredContent"]["continuation_id"]
        before = len(mock.chat_requests)
        # 2 of 3 turns used: a chat stores 2 more
        reply = await call(
            url, "chat", {"prompt": "two", "model": "mock-fast", "continuation_id": cid}
        )
        upstream_calls = len(mock.chat_requests) - before
    assert upstream_calls == 0
    assert reply["error"]["data"]["field"] == "arguments.continuation_id"
    assert "1 of its 3 turns left" in reply["error"]["message"]


async def test_a_workflows_final_step_without_room_for_the_expert_answer_is_refused_first(
    tmp_path: Path,
) -> None:
    def step(n: int, more: bool, cid: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {
            "step": f"step {n}",
            "step_number": n,
            "total_steps": 3,
            "next_step_required": more,
            "findings": f"finding {n}",
            "model": "mock-fast",
        }
        if cid:
            args["continuation_id"] = cid
        return args

    async with daemon(tmp_path, EXAI_CONVERSATION_MAX_TURNS="3") as (url, mock):
        one = await call(url, "thinkdeep", step(1, True))
        cid = one["result"]["structuredContent"]["continuation_id"]
        await call(url, "thinkdeep", step(2, True, cid))
        final = await call(url, "thinkdeep", step(3, False, cid))  # step + answer: 4 > 3
        upstream_calls = len(mock.chat_requests)
    assert upstream_calls == 0
    assert final["error"]["data"]["field"] == "arguments.continuation_id"
