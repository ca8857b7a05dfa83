"""One provider limit shared by three daemons behind HAProxy: the upstream sees the limit.

Method (as in the ``rate_accuracy`` benchmark). Load well above the limit comes through the
balancer from many sessions, spread over the three daemons. The provider's RPM bucket holds one
minute of requests, so the first calls drain a burst; the window of measurement starts at the
first refusal any client sees (the shared bucket is empty from then on) and ends when the load
stops. The admitted rate is what **the upstream received** in that window over its length.
Limits per daemon would admit three times the limit; a shared one, the limit.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.helpers import Rpc, ws
from tests.scaleout.cluster import Cluster
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

SESSIONS = 24


async def measure_admitted_rate(
    cluster: Cluster, mock: MockUpstream, rpm: float, window_s: float
) -> dict[str, Any]:
    """Drive load through the balancer; the upstream's rate in the window and the per-daemon
    split of admitted calls."""
    first_refusal: list[float] = []
    outcomes: dict[str, int] = {}
    stop = trio.Event()

    async def session(n: int) -> None:
        async with ws(cluster.url) as conn:
            rpc = Rpc(conn)
            i = 0
            while not stop.is_set():
                i += 1
                reply = await rpc.call("chat", {"prompt": f"s{n}-{i}", "model": "mock-fast"})
                if "error" in reply:
                    reason = reply["error"].get("data", {}).get("reason", "?")
                    if reason == "rate_limited" and not first_refusal:
                        first_refusal.append(trio.current_time())
                else:
                    reason = "ok"
                outcomes[reason] = outcomes.get(reason, 0) + 1

    with trio.fail_after(window_s + 120):
        async with trio.open_nursery() as nursery:
            for n in range(SESSIONS):
                nursery.start_soon(session, n)
            while not first_refusal:
                await trio.sleep(0.05)
            t1 = first_refusal[0]
            await trio.sleep_until(t1 + window_s)
            t_end = trio.current_time()
            stop.set()
    in_window = [r for r in mock.chat_requests if t1 <= r.started_at < t_end]
    configured = rpm / 60.0
    rate = len(in_window) / (t_end - t1)
    return {
        "configured_per_s": configured,
        "admitted_per_s": rate,
        "error_pct": (rate / configured - 1) * 100,
        "admitted_in_window": len(in_window),
        "window_s": t_end - t1,
        "outcomes": outcomes,
        "ok_by_daemon": await cluster.calls_by_daemon("ok"),
        "refused_by_daemon": await cluster.calls_by_daemon("rate_limited"),
    }


def assert_within_2pct_and_spread(got: dict[str, Any]) -> None:
    assert abs(got["error_pct"]) <= 2.0, got
    ok = got["ok_by_daemon"]
    assert len(ok) == 3
    # every daemon admitted a share and refused a share: the load and the limit are spread
    assert all(n >= 0.1 * sum(ok.values()) for n in ok.values()), got
    assert all(n > 0 for n in got["refused_by_daemon"].values()), got


async def test_three_daemons_behind_haproxy_admit_one_shared_rpm_limit(
    cluster_factory: ClusterFactory, mock: MockUpstream
) -> None:
    async with cluster_factory(EXAI_PROVIDER_MOCK_RPM=600) as cluster:
        got = await measure_admitted_rate(cluster, mock, 600.0, window_s=10.0)
    print(got)
    assert_within_2pct_and_spread(got)


@pytest.mark.slow
async def test_three_daemons_behind_haproxy_admit_1200_rpm_over_60_s(
    cluster_factory: ClusterFactory, mock: MockUpstream
) -> None:
    async with cluster_factory(EXAI_PROVIDER_MOCK_RPM=1200) as cluster:
        got = await measure_admitted_rate(cluster, mock, 1200.0, window_s=60.0)
    print(got)
    assert_within_2pct_and_spread(got)
