"""HAProxy in front of three daemons: sessions spread, /readyz decides the rotation."""

from __future__ import annotations

import pytest
import trio

from tests.helpers import Rpc, ws
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

WITHIN_S = 60.0


async def test_sessions_through_haproxy_spread_over_the_three_daemons(
    cluster_factory: ClusterFactory,
) -> None:
    async with cluster_factory() as cluster:
        answered = 0
        with trio.fail_after(WITHIN_S):
            async with trio.open_nursery() as nursery:

                async def one_session() -> None:
                    nonlocal answered
                    async with ws(cluster.url) as conn:
                        rpc = Rpc(conn)
                        for _ in range(3):
                            reply = await rpc.call("version")
                            assert reply["result"]["isError"] is False
                            answered += 1

                for _ in range(6):
                    nursery.start_soon(one_session)
        by_daemon = await cluster.calls_by_daemon()
        stat = {r["svname"]: int(r["stot"]) for r in await cluster.lb.show_stat()}
    assert answered == 18
    assert sum(by_daemon.values()) == 18
    assert all(n > 0 for n in by_daemon.values()), by_daemon
    assert all(n > 0 for n in stat.values()), stat


async def test_a_draining_daemon_leaves_the_rotation_and_comes_back_after_a_restart(
    cluster_factory: ClusterFactory,
) -> None:
    async with cluster_factory(EXAI_DRAIN_TIMEOUT_S=30) as cluster:
        first = cluster.daemons[0]
        with trio.fail_after(WITHIN_S):
            async with ws(first.url) as conn:
                rpc = Rpc(conn)
                await rpc.start_call("status", id=1)
                assert "result" in await rpc.response(1)
            first.terminate()
            await cluster.wait_servers({"exai1": "DOWN", "exai2": "UP", "exai3": "UP"})
            assert await first.wait() == 0
            # every new session lands on the two others meanwhile
            async with ws(cluster.url) as conn:
                assert "result" in await Rpc(conn).call("version")
            await first.start()
            await cluster.wait_servers({"exai1": "UP", "exai2": "UP", "exai3": "UP"})
