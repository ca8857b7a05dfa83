"""Review findings: idempotency keys of conversation turns that collide where they must not,
or differ where they must be equal."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest

from exai.providers import ProviderRouter
from exai.storage.service import ConversationService
from exai.testing import MockUpstream
from exai.tools.sandbox import FileSandbox
from tests.helpers import Rpc, running_daemon, ws
from tests.tools.suite import suite_env, suite_registry, suite_settings

pytestmark = pytest.mark.anyio


async def test_chat_re_run_under_the_same_key_after_a_restart_keeps_its_turns(tmp_path):
    """A bridge re-sends a chat (same idempotency key) to a restarted daemon: the first
    daemon committed the turns, then died before its answer got out. The re-run answers with
    a continuation_id; that thread must hold the conversation. Today the re-run starts a new
    thread (a fresh uuid), its turns' keys (``chat:k:<key>#0/#1``) are already taken by the
    first run's thread, so the store drops them and the answer names an empty thread."""
    meta = {"exai/idempotencyKey": "bridge-r:1"}
    params = {
        "name": "chat",
        "arguments": {"prompt": "remember the word PELICAN", "model": "mock-fast"},
        "_meta": meta,
    }
    async with MockUpstream(models=("mock-fast",)) as mock:
        settings = suite_settings(
            tmp_path, {"a": mock}, fast=("mock-fast",), quality=("mock-fast",)
        )
        answers: list[dict[str, Any]] = []
        for _run in range(2):  # the daemon, then the same daemon restarted
            async with AsyncExitStack() as stack:
                services: dict[str, Any] = {
                    "providers": await stack.enter_async_context(ProviderRouter(settings)),
                    "files": FileSandbox(settings),
                    "conversations": await stack.enter_async_context(
                        ConversationService.open(settings)
                    ),
                }
                d = await stack.enter_async_context(
                    running_daemon(settings, suite_registry(), services)
                )
                conn = await stack.enter_async_context(ws(d))
                res = await Rpc(conn).request("tools/call", params, id=1)
                assert res["result"]["isError"] is False, res
                answers.append(res["result"]["structuredContent"])
                if _run == 1:
                    cid = answers[-1]["continuation_id"]
                    thread = await services["conversations"].get_thread(cid)
        assert thread is not None, "the answer names a thread that does not exist"
        assert [t.role for t in thread.turns] == ["user", "assistant"], (
            f"thread {cid} named by the re-run's answer holds {len(thread.turns)} turns; "
            f"the turns are in thread {answers[0]['continuation_id']}"
        )


def _step(n: int, total: int, more: bool, **extra: Any) -> dict[str, Any]:
    return {
        "step": f"step {n}",
        "step_number": n,
        "total_steps": total,
        "next_step_required": more,
        "findings": f"finding {n}",
        **extra,
    }


async def test_a_second_workflow_session_in_a_thread_starts_fresh(tmp_path):
    """A thread where thinkdeep ran once; the agent starts thinkdeep again on it with the
    same first step (same text). The new step 1 must be recorded and start a new session.
    Today its key ``thinkdeep:<thread>:1:<hash of content>`` equals the first session's, so
    it is dropped: the new session silently continues the old one (its final step included)."""
    async with (
        MockUpstream(models=("mock-fast",)) as mock,
        suite_env(tmp_path, {"a": mock}, fast=("mock-fast",), quality=("mock-fast",)) as env,
    ):
        first = await env.ok("thinkdeep", _step(1, 2, True))
        cid = first["continuation_id"]
        await env.ok("thinkdeep", _step(2, 2, False, confidence="certain", continuation_id=cid))
        again = await env.ok("thinkdeep", _step(1, 2, True, continuation_id=cid))
        thread = await env.services["conversations"].get_thread(cid)
    steps = [t for t in thread.turns if t.tool == "thinkdeep" and t.role == "user"]
    assert len(steps) == 3, "the second session's step 1 was not stored"
    assert again["steps_recorded"] == 1, "the new session carries the old session's steps"


async def test_a_workflow_step_reverted_to_an_earlier_text_is_the_active_one(tmp_path):
    """Step 2 sent as B, corrected to C, then reverted to B: the engine says a step sent again
    with the same number replaces the earlier one, so B must be active. Today B's second
    send has the key of its first and is dropped; C stays active and goes to the expert."""
    async with (
        MockUpstream(models=("mock-fast",)) as mock,
        suite_env(tmp_path, {"a": mock}, fast=("mock-fast",), quality=("mock-fast",)) as env,
    ):
        first = await env.ok("thinkdeep", _step(1, 3, True))
        cid = first["continuation_id"]
        b = _step(2, 3, True, continuation_id=cid, findings="B: the cache is stale")
        c = _step(2, 3, True, continuation_id=cid, findings="C: the lock is missing")
        await env.ok("thinkdeep", b)
        await env.ok("thinkdeep", c)
        await env.ok("thinkdeep", b)
        await env.ok("thinkdeep", _step(3, 3, False, continuation_id=cid, confidence="high"))
    expert_prompt = "\n".join(
        str(m.get("content") or "") for m in mock.chat_requests[-1].json["messages"]
    )
    assert "B: the cache is stale" in expert_prompt
    assert "C: the lock is missing" not in expert_prompt, "the reverted step was dropped"
