"""Threads across daemons: any daemon continues any thread of the same identity (PostgreSQL),
and no daemon lets another identity continue it."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.helpers import Rpc, ws
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

ALICE = "tok-alice-0123456789abcdef"
BOB = "tok-bob-0123456789abcdef"
TOKENS = f"alice:{ALICE},bob:{BOB}"


async def _chat(url: str, token: str, prompt: str, cont: str | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"prompt": prompt, "model": "mock-fast"}
    if cont:
        args["continuation_id"] = cont
    with trio.fail_after(60):
        async with ws(url, token=token) as conn:
            return await Rpc(conn).call("chat", args)


async def test_a_thread_started_on_one_daemon_is_continued_on_each_other_one_by_its_owner_only(
    cluster_factory: ClusterFactory, mock: MockUpstream
) -> None:
    async with cluster_factory(EXAI_TOKENS=TOKENS) as cluster:
        one, two, three = cluster.daemons
        first = await _chat(one.url, ALICE, "first question")
        cont = first["result"]["structuredContent"]["continuation_id"]
        second = await _chat(two.url, ALICE, "second question", cont)
        third = await _chat(three.url, ALICE, "third question", cont)
        via_lb = await _chat(cluster.url, ALICE, "fourth question", cont)
        requests_before_bob = len(mock.chat_requests)
        # another identity, on any daemon, gets what an unknown id gets
        bobs = [await _chat(d.url, BOB, "whose thread?", cont) for d in cluster.daemons]
    for reply in bobs:
        assert reply["error"]["data"]["reason"] == "continuation_not_found", reply
    assert len(mock.chat_requests) == requests_before_bob
    for reply in (second, third, via_lb):
        assert reply["result"]["isError"] is False, reply
        assert reply["result"]["structuredContent"]["continuation_id"] == cont
    # what the upstream was sent on the last call: the whole thread, whichever daemon wrote it
    sent = [m["content"] for m in mock.chat_requests[-1].json["messages"]]
    for q in ("first question", "second question", "third question", "fourth question"):
        assert any(q in text for text in sent), sent
    assert any("mock:mock-fast: third question" in text for text in sent)
