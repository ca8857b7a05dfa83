"""Redis or PostgreSQL cut under three daemons behind HAProxy (docs/deploy.md, "Outages").

The daemons reach the server through a :class:`~exai.testing.FaultProxy` in this test's process;
cutting it is the outage, for every daemon at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import FaultProxy, MockUpstream
from tests.helpers import Rpc, ws
from tests.scaleout.cluster import Cluster
from tests.scaleout.conftest import ClusterFactory
from tests.scaleout.test_kill import turns_by_content
from tests.storage.conftest import PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT

pytestmark = pytest.mark.anyio

WITHIN_S = 90.0


async def _calls(cluster: Cluster, prompts: list[str], sessions: int = 6) -> dict[str, Any]:
    """``chat`` for each prompt over ``sessions`` sessions through the balancer; the replies."""
    replies: dict[str, Any] = {}
    queue = list(prompts)

    async def session() -> None:
        async with ws(cluster.url) as conn:
            rpc = Rpc(conn)
            while queue:
                prompt = queue.pop()
                replies[prompt] = await rpc.call("chat", {"prompt": prompt, "model": "mock-fast"})

    with trio.fail_after(WITHIN_S):
        async with trio.open_nursery() as nursery:
            for _ in range(sessions):
                nursery.start_soon(session)
    return replies


def _reason(reply: dict[str, Any]) -> str:
    if "error" in reply:
        return str(reply["error"].get("data", {}).get("reason"))
    return "error_result" if reply["result"]["isError"] else "ok"


async def test_with_redis_cut_the_daemons_keep_serving_and_admit_only_their_local_share(
    cluster_factory: ClusterFactory, mock: MockUpstream
) -> None:
    rpm = 30.0
    # 30 requests a minute for the deployment: 10 (+ a third of the refill) for each daemon
    # while Redis is away; a short call deadline keeps refused calls from waiting for refills
    proxy = FaultProxy(REDIS_HOST, REDIS_PORT)
    async with (
        proxy,
        cluster_factory(
            redis_port=proxy.port,
            EXAI_PROVIDER_MOCK_RPM=int(rpm),
            EXAI_RATE_LIMIT_REPLICAS=3,
            EXAI_RATE_LIMIT_ON_REDIS_ERROR="local_share",
            EXAI_CALL_TIMEOUT_S=2,
        ) as cluster,
    ):
        proxy.cut()
        t0 = trio.current_time()
        replies = await _calls(cluster, [f"cut-{i}" for i in range(90)], sessions=9)
        elapsed = trio.current_time() - t0
        by_daemon = await cluster.calls_by_daemon("ok")
    outcomes = [_reason(r) for r in replies.values()]
    assert set(outcomes) <= {"ok", "rate_limited", "timeout"}, outcomes
    ok = outcomes.count("ok")
    # never 3 × the limit: each daemon admits at most its share — a third of the burst and of
    # the refill over the time the calls took — and together at most the deployment's limit
    share = rpm / 3 + rpm / 60 / 3 * elapsed
    assert all(n <= share + 1 for n in by_daemon.values()), (by_daemon, elapsed)
    assert 0 < ok <= rpm + rpm / 60 * elapsed + 1
    assert len(mock.chat_requests) == ok
    # every daemon kept answering (the balancer spread the sessions over the three)
    assert all(n > 0 for n in by_daemon.values()), by_daemon


async def test_with_postgres_cut_calls_are_answered_and_every_turn_lands_once_when_it_is_back(
    cluster_factory: ClusterFactory,
    mock: MockUpstream,
    pg_database: str,
    pg_schema: str,
    tmp_path: Path,
) -> None:
    proxy = FaultProxy(PG_HOST, PG_PORT)
    async with proxy, cluster_factory(pg_port=proxy.port, EXAI_STORE_TIMEOUT_S=1) as cluster:
        before = await _calls(cluster, [f"pg-before-{i}" for i in range(12)])
        proxy.cut()
        during = await _calls(cluster, [f"pg-during-{i}" for i in range(30)])
        spooled = [await d.metric("exai_spool_writes_total") for d in cluster.daemons]
        proxy.restore()
        # each daemon replays its own spool once the store answers again
        with trio.fail_after(WITHIN_S):
            while any([await d.metric("exai_spool_depth") for d in cluster.daemons]):
                await trio.sleep(0.2)
        after = await _calls(cluster, [f"pg-after-{i}" for i in range(12)])
    assert sum(spooled) >= 30 and all(n > 0 for n in spooled), spooled  # each one spooled
    for replies in (before, during, after):
        assert {_reason(r) for r in replies.values()} == {"ok"}, replies
    turns = await trio.to_thread.run_sync(turns_by_content, pg_database, pg_schema)
    for prompt in [*before, *during, *after]:
        assert turns[("user", prompt)] == 1, prompt
        assert turns[("assistant", f"mock:mock-fast: {prompt}")] == 1, prompt
