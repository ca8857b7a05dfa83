"""A call refused before it begins is counted in ``exai_rejections``: one whose deadline ends
its wait (``reason="timeout"``), found by the attack on 8c7fa80, and one refused as the drain
began while it waited.

8c7fa80 ends a call's wait for its round's turn and for its identity and daemon-wide slots at
its deadline. Before it, such a call was counted: the one parked for its turn ran once its turn
came, past its deadline, and the runner counted it (``exai_calls{outcome="timeout"}``); the one
waiting for a slot was refused at ``slot_wait_s`` as ``overloaded`` and counted in
``exai_rejections``. Answered ``timeout`` at its deadline, it was counted nowhere — nor was a
call whose deadline ended its wait for one of its connection's slots, before 8c7fa80 too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from exai.server.pacing import RoundPacer
from tests.server.test_turn_after_slot import _answers, _call, _core, _GatedPacer, _setup

pytestmark = pytest.mark.anyio

_MOCK = [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]


def _metric(d: Any, name: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(d.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


@pytest.mark.parametrize("anyio_backend", _MOCK)
@pytest.mark.parametrize("key", [None, "k-1"], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("wait", ["turn", "daemon_slot", "session_slot"])
async def test_a_call_expired_before_it_began_is_counted_as_a_refusal(tmp_path, key, wait):
    overrides: dict[str, Any] = {"call_timeout_s": 5.0, "slot_wait_s": 600.0}
    if wait == "daemon_slot":
        overrides["max_inflight"] = 1
    if wait == "session_slot":
        overrides["session_max_inflight"] = 1
    pacer: RoundPacer = _GatedPacer() if wait == "turn" else RoundPacer(float("inf"))
    async with _setup(tmp_path, **overrides) as (daemon, runs), _core(daemon, pacer) as core:
        if wait == "daemon_slot":
            await daemon.slots.inflight.acquire()  # (the daemon's one slot)
        if wait == "session_slot":
            await core.handle_text(_call("held", "held", hold=True))
            await trio.testing.wait_all_tasks_blocked()
        try:
            await core.handle_text(_call(1, "a", key=key))
            with trio.fail_after(1000):
                while not any(json.loads(t).get("id") == 1 for t in core.outbox.queued()):
                    await trio.sleep(0.5)
        finally:
            if wait == "daemon_slot":
                daemon.slots.inflight.release()
            runs.release.set()
        answers = [a for a in _answers(core) if a.get("id") == 1]
        assert answers[0]["error"]["data"]["reason"] == "timeout", answers
        assert "a" not in runs.started
        assert daemon.stats.rejections["timeout"] == 1
        assert _metric(daemon, "exai_rejections_total", "timeout") == 1


async def test_an_unkeyed_call_refused_as_the_drain_began_while_it_waited_is_counted(tmp_path):
    # (the same hole: a call parked for its turn when the drain begins is refused "overloaded"
    # after its turn, ad0e88c, and nothing counted that refusal)
    async with _setup(tmp_path) as (daemon, runs), _core(daemon, _GatedPacer()) as core:
        pacer = core.shared.pacer
        assert isinstance(pacer, _GatedPacer)
        await core.handle_text(_call(1, "a"))
        await trio.testing.wait_all_tasks_blocked()
        assert pacer.parked == 1
        daemon.readiness.draining = True
        pacer.gate.set()
        with trio.fail_after(10):
            while not core.outbox.queued():
                await trio.sleep(0.01)
        (answer,) = _answers(core)
        assert answer["error"]["data"]["reason"] == "overloaded", answer
        assert runs.started == []
        assert dict(daemon.stats.rejections) == {"overloaded": 1}


@pytest.mark.parametrize("anyio_backend", _MOCK)
async def test_a_call_refused_for_want_of_a_slot_is_counted_once(tmp_path):
    overrides = {"call_timeout_s": 600.0, "slot_wait_s": 1.0, "max_inflight": 1}
    async with (
        _setup(tmp_path, **overrides) as (daemon, _runs),
        _core(daemon, RoundPacer(float("inf"))) as core,
    ):
        await daemon.slots.inflight.acquire()
        try:
            await core.handle_text(_call(1, "a"))
            with trio.fail_after(100):
                while not core.outbox.queued():
                    await trio.sleep(0.1)
        finally:
            daemon.slots.inflight.release()
        (answer,) = _answers(core)
        assert answer["error"]["data"]["reason"] == "overloaded", answer
        assert dict(daemon.stats.rejections) == {"overloaded": 1}
