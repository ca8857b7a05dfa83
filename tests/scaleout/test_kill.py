"""One daemon SIGKILLed during a burst of calls through HAProxy from clients that retry.

The clients are real ``exai bridge`` processes connected to the balancer over WebSocket, and the
official Python SDK over Streamable HTTP (``SdkHttpClient``: every call carries an idempotency
key, and a POST whose answer did not arrive whole is sent again). When their daemon dies the
bridges reconnect (HAProxy sends them to a live daemon) and re-send every unanswered call with
its original id and idempotency key; the HTTP clients' POSTs are re-sent, by HAProxy
(``retry-on``) or by the client, to a live daemon. What must hold, counted at the three places
that matter:

* the editor: every call answered exactly once, none with an error;
* the upstream: at most one *completed* answer per call (what a provider would bill);
* PostgreSQL: every turn stored exactly once.

The kill lands at a moment when no answer is half-way between the upstream and the daemon's
records: the mock upstream holds every answer before its end (``hold_answers``), the test waits
until every answer the upstream completed has reached its editor, kills, and lets the held
answers go on. The victim's calls are then all mid-answer, which is the case that must be re-run
elsewhere exactly once. (The one window no daemon can close — an upstream that finished its
answer a few milliseconds before the process died, before the daemon recorded it — makes that
call run again; docs/deploy.md says so.)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.scaleout.clients import BridgeClient, SdkHttpClient, open_bridge, open_sdk_http
from tests.scaleout.cluster import Cluster, DaemonProcess
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

WITHIN_S = 120.0
#: calls in flight per bridge (below the session's 8 slots)
PIPELINE = 4


def turns_by_content(database: str, schema: str) -> Counter[tuple[str, str]]:
    """(role, content) → how many turns hold it, in the cluster's schema."""
    import asyncpg

    async def query() -> list[Any]:
        conn = await asyncpg.connect(
            user="postgres", host="127.0.0.1", port=5432, database=database
        )
        try:
            return list(await conn.fetch(f'SELECT role, content FROM "{schema}".exai_turns'))
        finally:
            await conn.close()

    rows = asyncio.run(query())
    return Counter((r["role"], r["content"]) for r in rows)


async def _run_bridge(
    bridge: BridgeClient | SdkHttpClient,
    prompts: list[str],
    answered: list[str],
    changed: list[trio.Event],
) -> None:
    """Send ``prompts`` as ``chat`` calls, :data:`PIPELINE` at a time, in order."""
    limiter = trio.Semaphore(PIPELINE)

    async def one(prompt: str) -> None:
        try:
            await bridge.call(prompt, "chat", {"prompt": prompt, "model": "mock-fast"})
            await bridge.wait_answer(prompt)
        finally:
            limiter.release()
        answered.append(prompt)
        changed[0].set()
        changed[0] = trio.Event()

    async with trio.open_nursery() as nursery:
        for prompt in prompts:
            await limiter.acquire()
            nursery.start_soon(one, prompt)


async def _busiest(cluster: Cluster) -> tuple[DaemonProcess, float]:
    best: tuple[DaemonProcess, float] | None = None
    for d in cluster.daemons:
        n = await d.metric("exai_inflight_calls")
        if best is None or n > best[1]:
            best = (d, n)
    assert best is not None
    return best


async def kill_mid_burst(
    cluster: Cluster,
    mock: MockUpstream,
    tmp_path: Path,
    *,
    bridges: int,
    calls_per_bridge: int,
    http_clients: int = 0,
) -> dict[str, Any]:
    """The experiment; returns what was counted (the test asserts on it). Clients ``b0`` …
    are ``bridges`` bridges, then ``http_clients`` SDK clients over HTTP."""
    mock.latency_s = 0.05
    n_clients = bridges + http_clients
    prompts = {b: [f"kill-{b}-{i}" for i in range(calls_per_bridge)] for b in range(n_clients)}
    total = n_clients * calls_per_bridge
    answered: list[str] = []
    changed = [trio.Event()]
    clients: list[BridgeClient | SdkHttpClient] = []
    facts: dict[str, Any] = {}
    with trio.fail_after(WITHIN_S):
        async with trio.open_nursery() as outer:

            async def run_one(b: int, ready: trio.Event) -> None:
                opened: Any = (
                    open_bridge(cluster.url, tmp_path / f"bridge{b}.log", f"b{b}")
                    if b < bridges
                    else open_sdk_http(cluster.http_url, f"b{b}")
                )
                async with opened as br:
                    await br.initialize()
                    clients.append(br)
                    ready.set()
                    await go.wait()
                    await _run_bridge(br, prompts[b], answered, changed)

            go = trio.Event()
            for b in range(n_clients):
                ready = trio.Event()
                outer.start_soon(run_one, b, ready)
                await ready.wait()
            go.set()
            while len(answered) < total // 3:
                await changed[0].wait()
            # a moment with no answer half-way: hold every answer before its end, wait until
            # every answer the upstream completed has reached its editor, then kill
            mock.hold_answers()
            while True:
                completed = {b["messages"][-1]["content"] for b in mock.completed}
                if completed <= set(answered):
                    break
                await changed[0].wait()
            victim, inflight = await _busiest(cluster)
            facts["victim"] = victim.name
            facts["victim_inflight_at_kill"] = inflight
            facts["held_at_kill"] = mock.held
            disconnects = mock.disconnects
            victim.kill()
            assert await victim.wait() == -9
            mock.release_answers()
        facts["upstream_disconnects_at_kill"] = mock.disconnects - disconnects
    answers = {p: c.answers.get(p, []) for c in clients for p in prompts[int(c.name[1:])]}
    facts["answered_once"] = sum(1 for a in answers.values() if len(a) == 1)
    facts["errors"] = [a for lst in answers.values() for a in lst if "error" in a]
    facts["is_error"] = [
        a for lst in answers.values() for a in lst if a.get("result", {}).get("isError")
    ]
    facts["http_retries"] = sum(
        c.transport.retries for c in clients if isinstance(c, SdkHttpClient)
    )
    completed_per_call = Counter(b["messages"][-1]["content"] for b in mock.completed)
    facts["completed_per_call"] = Counter(completed_per_call[p] for p in answers)
    facts["upstream_requests"] = len(mock.chat_requests)
    facts["total"] = total
    return facts


def assert_nothing_lost_or_doubled(facts: dict[str, Any], turns: Counter[Any], n: int) -> None:
    assert facts["total"] == n
    assert facts["errors"] == [] and facts["is_error"] == []
    assert facts["answered_once"] == n  # every call answered, and once
    assert facts["completed_per_call"] == Counter({1: n}), facts  # the upstream billed each once
    prompts = [c for (role, c) in turns if role == "user" and c.startswith("kill-")]
    assert len(prompts) == n
    for prompt in prompts:
        assert turns[("user", prompt)] == 1
        assert turns[("assistant", f"mock:mock-fast: {prompt}")] == 1
    # the kill did hit calls in flight, which were re-run elsewhere
    assert facts["victim_inflight_at_kill"] >= 1
    assert facts["upstream_disconnects_at_kill"] >= 1


async def test_a_daemon_killed_during_a_burst_through_haproxy_loses_and_doubles_no_call(
    cluster_factory: ClusterFactory,
    mock: MockUpstream,
    tmp_path: Path,
    pg_database: str,
    pg_schema: str,
) -> None:
    async with cluster_factory() as cluster:
        facts = await kill_mid_burst(
            cluster, mock, tmp_path, bridges=4, http_clients=2, calls_per_bridge=10
        )
    turns = await trio.to_thread.run_sync(turns_by_content, pg_database, pg_schema)
    print(facts)
    assert_nothing_lost_or_doubled(facts, turns, 60)


@pytest.mark.slow
async def test_500_calls_and_a_daemon_killed_through_haproxy_lose_and_double_nothing(
    cluster_factory: ClusterFactory,
    mock: MockUpstream,
    tmp_path: Path,
    pg_database: str,
    pg_schema: str,
) -> None:
    async with cluster_factory() as cluster:
        facts = await kill_mid_burst(
            cluster, mock, tmp_path, bridges=6, http_clients=4, calls_per_bridge=50
        )
    turns = await trio.to_thread.run_sync(turns_by_content, pg_database, pg_schema)
    print(facts)
    assert_nothing_lost_or_doubled(facts, turns, 500)
