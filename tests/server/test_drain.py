"""Draining (SIGTERM) hands sessions over instead of refusing their calls (rolling restarts).

A keyed call (the idempotency key every ``exai bridge`` call carries) that reaches a draining
daemon is left unanswered, and the session is closed with 1012 (service restart) as soon as the
calls already admitted on it are answered: the client reconnects through the balancer to a
daemon that is not stopping and re-sends it. A call without a key cannot be re-sent by its
client, so it still gets a clear error.
"""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed

from exai.server.app import serve
from tests.helpers import Rpc, make_settings, registry_with, ws
from tests.server.test_daemon import Probe

pytestmark = pytest.mark.anyio


async def test_a_keyed_call_on_a_draining_daemon_is_handed_over_not_refused(tmp_path) -> None:
    probe = Probe()
    settings = make_settings(tmp_path, drain_timeout_s=10)
    messages: list[dict] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            d = await nursery.start(
                lambda task_status: serve(
                    settings, registry_with(probe.spec), announce=False, task_status=task_status
                )
            )
            async with ws(d) as conn:
                rpc = Rpc(conn)
                await rpc.start_call("probe", id=1, **{"exai/idempotencyKey": "bridge:1"})
                await probe.started_event.wait()
                d.request_shutdown()
                await d.changes.wait_for(lambda: d.draining)
                await rpc.start_call("probe", id=2, **{"exai/idempotencyKey": "bridge:2"})
                await rpc.start_call("probe", id=3)  # no key: its client would not re-send it
                probe.release.set()
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        messages.append(json.loads(await conn.get_message()))
    answers = {m["id"]: m for m in messages if "id" in m}
    assert answers[1]["result"]["content"][0]["text"] == "done 1"  # the running call finished
    assert 2 not in answers  # handed over: the client re-sends it elsewhere
    assert answers[3]["error"]["data"]["reason"] == "overloaded"
    assert closed.value.reason.code == 1012
    assert probe.started == 1
    assert d.stats.rejections["handed_over"] == 1


async def test_an_idle_session_of_a_draining_daemon_is_closed_at_once(tmp_path) -> None:
    settings = make_settings(tmp_path, drain_timeout_s=30)
    probe = Probe()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            d = await nursery.start(
                lambda task_status: serve(
                    settings, registry_with(probe.spec), announce=False, task_status=task_status
                )
            )
            async with ws(d) as busy, ws(d) as idle:
                await Rpc(busy).start_call("probe", id=1)
                await probe.started_event.wait()
                d.request_shutdown()
                # the idle one goes now, while the busy one's call still runs
                with pytest.raises(ConnectionClosed) as closed:
                    await idle.get_message()
                assert closed.value.reason.code == 1012
                assert probe.finished == 0
                probe.release.set()
