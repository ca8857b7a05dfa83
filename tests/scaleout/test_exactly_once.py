"""A call re-sent through the balancer to another daemon while the first one still runs it joins
the running execution: it never runs twice (issue 16, "Exactly-once").

The bridge's connection to a live daemon is cut by the balancer (HAProxy's runtime API:
``shutdown sessions``, after taking that daemon out of the rotation with ``state drain``, as an
operator does before maintenance). The bridge reconnects to another daemon and re-sends its
unanswered calls with their idempotency keys; that daemon finds them running on the first one
(Redis) and waits for their results instead of running them again.

The calls are the test tool ``count`` (``tests/daemon_tools.py``): each execution appends a line
to its own file, so executions are counted across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.scaleout.clients import BridgeClient, open_bridge
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

PLUGIN = ("--plugin", "tests.daemon_tools:register")


def _joined(cluster: Any) -> list[int]:
    """How many calls each daemon but the first joined on another daemon, by its log."""
    return [len(d.log_events("call.joined_elsewhere")) for d in cluster.daemons[1:]]


async def test_a_call_re_sent_to_another_daemon_while_it_runs_joins_it_instead_of_running_twice(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    await trio.Path(runs).mkdir()
    async with cluster_factory(argv=PLUGIN) as cluster:
        bridges: list[BridgeClient] = []
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def bridge(b: int, ready: trio.Event) -> None:
                    async with open_bridge(cluster.url, tmp_path / f"b{b}.log", f"b{b}") as br:
                        await br.initialize()
                        bridges.append(br)
                        ready.set()
                        await done.wait()

                for b in range(3):
                    ready = trio.Event()
                    nursery.start_soon(bridge, b, ready)
                    await ready.wait()
                calls = {}
                for br in bridges:
                    for i in range(2):
                        path = runs / f"{br.name}-{i}"
                        calls[path] = br
                        await br.call(f"c{i}", "count", {"path": str(path), "seconds": 4})
                # every call is running somewhere
                while not all([await trio.Path(p).exists() for p in calls]):
                    await trio.sleep(0.05)
                # the first daemon leaves the rotation and its sessions are cut; it lives on
                await cluster.lb.command("set server exai_daemons/exai1 state drain")
                await cluster.lb.command("shutdown sessions server exai_daemons/exai1")
                for path, br in calls.items():
                    await br.wait_answer(f"c{path.name[-1]}")
                done.set()
        # the cut did move calls: another daemon joined them while the first, alive, ran them
        assert cluster.daemons[0].alive()
        # (their log lines can arrive after the answers: wait for them, bounded)
        with trio.move_on_after(60):
            while sum(joined := _joined(cluster)) < 2:
                await trio.sleep(0.05)
    answers = [br.answers[f"c{i}"] for br in bridges for i in range(2)]
    assert all(len(a) == 1 and "result" in a[0] for a in answers), answers
    starts = {p.name: p.read_text().count("started") for p in calls}
    assert starts == dict.fromkeys(starts, 1), starts  # each call ran once, in all
    assert sum(joined) >= 2, joined
