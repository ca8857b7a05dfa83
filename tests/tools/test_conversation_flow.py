"""One conversation carried across tools: ``chat`` → ``codereview`` → ``chat`` on one
``continuation_id``, each model call seeing the earlier turns (as the mock recorded them)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from exai.testing import MockUpstream
from tests.tools.suite import prompts, suite_env

pytestmark = pytest.mark.anyio


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    async with MockUpstream(models=("mock-fast", "mock-pro")) as m:
        yield m


async def test_chat_then_codereview_then_chat_share_one_conversation(tmp_path, mock):
    async with suite_env(tmp_path, {"a": mock}, fast=("mock-fast",), quality=("mock-pro",)) as env:
        code = env.root / "auth.py"
        code.write_text("def login(user, pw):\n    return pw == 'hunter2'  # AUTH-CODE\n")

        opened = await env.ok("chat", {"prompt": "CHAT-ONE: is our login safe?"})
        cid = opened["continuation_id"]

        step1 = await env.ok(
            "codereview",
            {
                "step": "review the login",
                "step_number": 1,
                "total_steps": 2,
                "next_step_required": True,
                "findings": "REVIEW-FINDING: password compared in plain text",
                "relevant_files": [str(code)],
                "issues_found": [{"severity": "critical", "description": "hard-coded password"}],
                "continuation_id": cid,
            },
        )
        assert step1["continuation_id"] == cid
        final = await env.ok(
            "codereview",
            {
                "step": "conclude",
                "step_number": 2,
                "total_steps": 2,
                "next_step_required": False,
                "findings": "no hashing anywhere",
                "confidence": "high",
                "continuation_id": cid,
            },
        )
        assert final["continuation_id"] == cid
        review_answer = final["expert_analysis"]["content"]

        closing = await env.ok("chat", {"prompt": "CHAT-TWO: fix it", "continuation_id": cid})
        assert closing["continuation_id"] == cid
        # every turn was stored in the one thread, in order, each with its tool
        thread = await env.services["conversations"].start_or_continue(cid, "chat")

    assert len(mock.chat_requests) == 3  # chat, the review's one expert call, chat
    first_chat, review, last_chat = prompts(mock)
    # the expert review sees the chat that came before it, and the code
    assert "CHAT-ONE" in review and opened["content"] in review
    assert "REVIEW-FINDING" in review and "AUTH-CODE" in review
    # the closing chat sees the first chat, the review's steps and its expert answer
    assert "CHAT-ONE" in last_chat and opened["content"] in last_chat
    assert "REVIEW-FINDING" in last_chat
    assert review_answer in last_chat
    assert "REVIEW-FINDING" not in first_chat
    assert [(t.role, t.tool) for t in thread.turns] == [
        ("user", "chat"),
        ("assistant", "chat"),
        ("user", "codereview"),
        ("user", "codereview"),
        ("assistant", "codereview"),
        ("user", "chat"),
        ("assistant", "chat"),
    ]
