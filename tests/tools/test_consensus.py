"""``consensus`` against three real mock upstreams: concurrency, shares of the deadline, failures.

Providers ``a``, ``b`` and ``c`` serve ``mock-a``, ``mock-b`` and ``mock-c``; ``mock-a`` is the
quality model the synthesis goes to under ``auto``. The consensus tool runs with a short
deadline (:data:`DEADLINE_S`), so "slow beyond its share" is real time on real sockets; "returned
before the deadline" is the call answering with a result instead of a timeout error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from exai.testing import Fault, MockUpstream
from exai.tools.consensus import STANCE_PROMPTS, make_consensus_tool
from tests.tools.suite import Env, error_of, suite_env, suite_registry

pytestmark = pytest.mark.anyio

#: The consensus tool's deadline in these tests; each consultation gets 80 % of it.
DEADLINE_S = 2.0
#: Latency of a "slow" provider: well beyond a consultation's share (1.6 s).
SLOW_S = 30.0
#: A bound on waits that should end at once: only a hang reaches it.
HANG_GUARD_S = 30.0


@pytest.fixture
async def mocks() -> AsyncIterator[dict[str, MockUpstream]]:
    async with (
        MockUpstream(models=("mock-a",)) as a,
        MockUpstream(models=("mock-b",)) as b,
        MockUpstream(models=("mock-c",)) as c,
    ):
        yield {"a": a, "b": b, "c": c}


@asynccontextmanager
async def consensus_env(tmp_path, mocks, deadline_s: float = DEADLINE_S) -> AsyncIterator[Env]:
    registry = suite_registry(make_consensus_tool(timeout_s=deadline_s))
    async with suite_env(
        tmp_path,
        mocks,
        fast=("mock-b", "mock-c"),
        quality=("mock-a",),
        registry=registry,
    ) as env:
        yield env


def three(prompt: str = "Should we adopt Redis Streams?") -> dict[str, Any]:
    return {
        "prompt": prompt,
        "models": [
            {"model": "mock-a", "stance": "for"},
            {"model": "mock-b", "stance": "against"},
            {"model": "mock-c", "stance": "neutral"},
        ],
    }


def outcomes(result: dict[str, Any]) -> dict[str, str]:
    return {c["model"]: c["outcome"] for c in result["consultations"]}


async def test_one_provider_down_and_one_slow_returns_in_time_with_both_failures_marked(
    tmp_path, mocks
):
    # The must-show case, read literally: with three models of which one is down and one slow,
    # exactly one can answer. The call must still return before its deadline, with that answer
    # and each failure marked for what it was (see docs/tools.md, "consensus").
    mocks["b"].set_fault(Fault.status(503))
    mocks["c"].latency_s = SLOW_S
    async with consensus_env(tmp_path, mocks) as env:
        res = await env.ok("consensus", three())
    assert outcomes(res) == {"mock-a": "answered", "mock-b": "failed", "mock-c": "timed_out"}
    by_model = {c["model"]: c for c in res["consultations"]}
    assert by_model["mock-b"]["reason"] == "upstream_unavailable"
    assert "share of the deadline" in by_model["mock-c"]["detail"]
    assert by_model["mock-a"]["content"].startswith("mock:mock-a:")
    assert res["status"] == "partial"
    assert res["synthesis"] is None and "only one model answered" in res["synthesis_skipped"]
    assert "mock-b (against): failed" in res["_text"]
    assert "mock-c (neutral): timed out" in res["_text"]
    assert len(mocks["c"].chat_requests) == 1  # it was asked, and given up on
    assert mocks["c"].disconnects == 1


async def test_two_answers_with_one_provider_down_are_synthesised_with_the_failure_marked(
    tmp_path, mocks
):
    mocks["c"].set_fault(Fault.status(503))
    async with consensus_env(tmp_path, mocks) as env:
        res = await env.ok("consensus", three("PROPOSAL-X"))
    assert outcomes(res) == {"mock-a": "answered", "mock-b": "answered", "mock-c": "failed"}
    assert res["answered"] == 2
    # the synthesis is one more call, to the quality model, carrying both answers
    synth = mocks["a"].chat_requests[-1].json["messages"][-1]["content"]
    assert "mock:mock-a:" in synth and "mock:mock-b:" in synth
    assert "no answer: failed" in synth
    assert res["synthesis"]["model"] == "mock-a"
    assert "mock-c (neutral): failed — upstream_unavailable" in res["_text"]


async def test_two_answers_with_one_provider_slow_beyond_its_share_are_returned_in_time(
    tmp_path, mocks
):
    mocks["c"].latency_s = SLOW_S
    async with consensus_env(tmp_path, mocks) as env:
        res = await env.ok("consensus", three())
    assert outcomes(res) == {"mock-a": "answered", "mock-b": "answered", "mock-c": "timed_out"}
    assert res["synthesis"] is not None


async def test_all_models_failing_is_a_clear_error_naming_each(tmp_path, mocks):
    mocks["a"].set_fault(Fault.status(503))
    mocks["b"].set_fault(Fault.status(503))
    mocks["c"].latency_s = SLOW_S
    async with consensus_env(tmp_path, mocks) as env:
        err = error_of(await env.call("consensus", three()))
    assert err["data"]["reason"] == "upstream_error"
    assert "none of the 3 models answered" in err["message"]
    for label in ("mock-a (for)", "mock-b (against)", "mock-c (neutral): timed out"):
        assert label in err["message"]
    assert [c["outcome"] for c in err["data"]["consultations"]] == [
        "failed",
        "failed",
        "timed_out",
    ]


async def test_consultations_run_concurrently(tmp_path, mocks):
    # b and c hold their answers until the test sees both requests waiting at the same time:
    # one after the other, c would not be asked before b had answered (or run out of its
    # share), so both never wait together and the hang guard fails the test. No wall-clock
    # figure is involved: the deadline is far away and only the order of events counts.
    mocks["b"].hold_answers()
    mocks["c"].hold_answers()
    both_waiting = False

    async def release_when_both_wait() -> None:
        nonlocal both_waiting
        with anyio.fail_after(HANG_GUARD_S):
            while not (mocks["b"].held and mocks["c"].held):
                await anyio.sleep(0.01)
        both_waiting = True
        mocks["b"].release_answers()
        mocks["c"].release_answers()

    async with (
        consensus_env(tmp_path, mocks, deadline_s=HANG_GUARD_S * 2) as env,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(release_when_both_wait)
        res = await env.ok("consensus", three())
    assert both_waiting
    assert res["answered"] == 3
    assert res["synthesis"]["model"] == "mock-a"


async def test_each_model_is_asked_with_its_stance_and_no_fallback(tmp_path, mocks):
    args = three()
    args["models"][2]["stance_prompt"] = "CUSTOM-STANCE: answer as the on-call engineer"
    async with consensus_env(tmp_path, mocks) as env:
        await env.ok("consensus", args)
    asked = {
        name: [r.json for r in m.chat_requests if "Your stance" in str(r.json["messages"])]
        for name, m in mocks.items()
    }
    assert [r["model"] for r in asked["a"]] == ["mock-a"]
    system_a = asked["a"][0]["messages"][0]["content"]
    assert STANCE_PROMPTS["for"] in system_a
    system_b = mocks["b"].chat_requests[0].json["messages"][0]["content"]
    assert STANCE_PROMPTS["against"] in system_b
    system_c = mocks["c"].chat_requests[0].json["messages"][0]["content"]
    assert "CUSTOM-STANCE" in system_c and STANCE_PROMPTS["neutral"] not in system_c


async def test_a_failing_model_is_not_replaced_by_another(tmp_path, mocks):
    mocks["b"].set_fault(Fault.status(503))
    async with consensus_env(tmp_path, mocks) as env:
        await env.ok("consensus", three())
    served = [r.json["model"] for m in mocks.values() for r in m.chat_requests]
    # mock-b was tried (and retried) on b only; nobody else was asked for mock-b
    assert all(r.json["model"] == "mock-b" for r in mocks["b"].chat_requests)
    assert served.count("mock-c") == 1


async def test_duplicate_model_and_stance_pairs_are_rejected_naming_the_entry(tmp_path, mocks):
    args = {
        "prompt": "p",
        "models": [
            {"model": "mock-a", "stance": "for"},
            {"model": "mock-a", "stance": "against"},
            {"model": "mock-a", "stance": "for"},
        ],
    }
    async with consensus_env(tmp_path, mocks) as env:
        err = error_of(await env.call("consensus", args))
    assert err["code"] == -32602
    assert err["data"]["field"] == "arguments.models[2]"
    assert "arguments.models[0]" in err["message"]
    assert all(m.chat_requests == [] for m in mocks.values())


async def test_an_unknown_model_is_rejected_before_any_call(tmp_path, mocks):
    args = {"prompt": "p", "models": [{"model": "nope-1"}, {"model": "mock-a"}]}
    async with consensus_env(tmp_path, mocks) as env:
        err = error_of(await env.call("consensus", args))
    assert err["code"] == -32602
    assert err["data"]["field"] == "arguments.models[0].model"
    assert all(m.chat_requests == [] for m in mocks.values())


async def test_consensus_can_be_continued(tmp_path, mocks):
    async with consensus_env(tmp_path, mocks) as env:
        res = await env.ok("consensus", three("FIRST-QUESTION"))
        cid = res["continuation_id"]
        follow = await env.ok("chat", {"prompt": "and now?", "continuation_id": cid})
    assert follow["continuation_id"] == cid
    last = max((r for m in mocks.values() for r in m.chat_requests), key=lambda r: r.started_at)
    history = "\n".join(str(m["content"]) for m in last.json["messages"])
    assert "FIRST-QUESTION" in history
