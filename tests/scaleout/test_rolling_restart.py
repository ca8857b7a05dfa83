"""A rolling restart under load: SIGTERM each daemon in turn, start it again; no client sees an
error.

Clients are real ``exai bridge`` processes (WebSocket) and the official SDK over Streamable HTTP
(``SdkHttpClient``), calling ``chat`` through HAProxy without pause. What a restart has to get
right, in order (docs/deploy.md, "Rolling restart"):

1. on SIGTERM the daemon's ``/readyz`` answers 503 and its listener closes: HAProxy stops sending
   it new sessions (a connection attempt meanwhile is refused and redispatched);
2. calls already running on it finish and are answered on their sessions;
3. a call that arrives on one of its sessions after that is not refused: the session is closed
   once its running calls are answered, so the bridge reconnects through the balancer and
   re-sends it (same id, same idempotency key) to a daemon that is not stopping;
4. an HTTP request that reaches the draining daemon is refused with 503 before its body is read,
   and sent again elsewhere — by HAProxy (``retry-on … 503``) or by the client; a call already
   running on it is answered on its own request;
5. the daemon exits 0; started again on the same ports, it is back in the rotation after two
   good health checks.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.scaleout.clients import BridgeClient, SdkHttpClient, open_bridge, open_sdk_http
from tests.scaleout.cluster import Cluster
from tests.scaleout.conftest import ClusterFactory
from tests.scaleout.test_kill import turns_by_content

pytestmark = pytest.mark.anyio

PIPELINE = 3


async def rolling_restart_under_load(
    cluster: Cluster,
    mock: MockUpstream,
    tmp_path: Path,
    *,
    bridges: int,
    http_clients: int = 0,
    rounds: int = 1,
) -> dict[str, Any]:
    mock.latency_s = 0.05
    sent: dict[str, BridgeClient | SdkHttpClient] = {}
    stop = trio.Event()
    exit_codes: list[int] = []
    clients: list[BridgeClient | SdkHttpClient] = []

    async def load(b: int, ready: trio.Event) -> None:
        opened: Any = (
            open_bridge(cluster.url, tmp_path / f"bridge{b}.log", f"b{b}")
            if b < bridges
            else open_sdk_http(cluster.http_url, f"b{b}")
        )
        async with opened as br:
            await br.initialize()
            clients.append(br)
            ready.set()
            limiter = trio.Semaphore(PIPELINE)

            async def one(prompt: str) -> None:
                try:
                    await br.call(prompt, "chat", {"prompt": prompt, "model": "mock-fast"})
                    await br.wait_answer(prompt)
                finally:
                    limiter.release()

            async with trio.open_nursery() as calls:
                i = 0
                while not stop.is_set():
                    await limiter.acquire()
                    prompt = f"roll-{b}-{i}"
                    i += 1
                    sent[prompt] = br
                    calls.start_soon(one, prompt)

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for b in range(bridges + http_clients):
                ready = trio.Event()
                nursery.start_soon(load, b, ready)
                await ready.wait()
            await trio.sleep(0.5)
            for _ in range(rounds):
                for d in cluster.daemons:
                    others = {o.name: "UP" for o in cluster.daemons if o is not d}
                    exit_codes.append(await d.stop())
                    await d.start()
                    await cluster.wait_servers({d.name: "UP", **others})
                    await trio.sleep(0.3)
            stop.set()
    answers = {p: br.answers.get(p, []) for p, br in sent.items()}
    completed = Counter(b["messages"][-1]["content"] for b in mock.completed)
    return {
        "calls": len(answers),
        "exit_codes": exit_codes,
        "answered_once": sum(1 for a in answers.values() if len(a) == 1),
        "errors": [a for lst in answers.values() for a in lst if "error" in a],
        "is_error": [
            a for lst in answers.values() for a in lst if "result" in a and a["result"]["isError"]
        ],
        "http_calls": sum(1 for br in sent.values() if isinstance(br, SdkHttpClient)),
        "completed_per_call": Counter(completed[p] for p in answers),
    }


async def test_a_rolling_restart_under_load_shows_no_client_an_error(
    cluster_factory: ClusterFactory,
    mock: MockUpstream,
    tmp_path: Path,
    pg_database: str,
    pg_schema: str,
) -> None:
    async with cluster_factory(EXAI_DRAIN_TIMEOUT_S=20) as cluster:
        got = await rolling_restart_under_load(cluster, mock, tmp_path, bridges=3, http_clients=2)
    print({k: (v if k not in ("errors",) else v[:3]) for k, v in got.items()})
    assert got["exit_codes"] == [0, 0, 0]
    assert got["errors"] == [] and got["is_error"] == []
    assert got["answered_once"] == got["calls"] > 50
    assert got["http_calls"] > 10
    assert got["completed_per_call"] == Counter({1: got["calls"]})
    turns = await trio.to_thread.run_sync(turns_by_content, pg_database, pg_schema)
    prompts = [c for (role, c) in turns if role == "user" and c.startswith("roll-")]
    assert len(prompts) == got["calls"]
    assert all(turns[("user", p)] == 1 for p in prompts)
