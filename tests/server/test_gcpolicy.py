"""The daemon's garbage-collector policy: full collections when idle, forced only when overdue."""

from __future__ import annotations

import gc

import pytest
import trio
import trio.testing

from exai.server import gcpolicy

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


async def _run_for(seconds: float, busy: list[bool], waiting: list[int]) -> list[float]:
    """(``busy[0]``: a call is running; each check while busy, another one has ended.)"""
    """Run the idle collector for ``seconds`` of (autojumping) loop time; when it collected."""
    collected: list[float] = []

    def collect(generation: int) -> int:
        assert generation == 2
        collected.append(trio.current_time())
        waiting[0] = 0
        return 0

    ended = [0]

    def activity() -> tuple[int, int]:
        if busy[0]:
            ended[0] += 1
        return (1 if busy[0] else 0, ended[0])

    with trio.move_on_after(seconds):
        await gcpolicy.collect_when_idle(
            activity, collect=collect, pending=lambda: waiting[0], force_after_s=60.0
        )
    return collected


async def test_a_full_collection_waits_for_an_idle_daemon() -> None:
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    busy, waiting = [True], [3]
    # busy for 30 s with garbage waiting: no full collection
    assert await _run_for(30.5, busy, waiting) == []
    # idle: collected after two quiet checks
    busy[0] = False
    collected = await _run_for(5.5, busy, waiting)
    assert len(collected) == 1
    # nothing waiting: nothing done, idle or not
    assert await _run_for(10.5, busy, waiting) == []


async def test_short_calls_between_the_checks_are_not_idleness() -> None:
    # No call is running at any check, but calls keep ending in between (a stream of short
    # calls): not idle, so no full collection lands in the middle of them.
    waiting = [3]
    ended = [0]

    def activity() -> tuple[int, int]:
        ended[0] += 1
        return (0, ended[0])

    collected: list[float] = []
    with trio.move_on_after(30.5):
        await gcpolicy.collect_when_idle(
            activity, collect=lambda g: collected.append(g) or 0, pending=lambda: waiting[0]
        )
    assert collected == []


async def test_a_load_that_never_pauses_gets_a_full_collection_when_overdue() -> None:
    busy, waiting = [True], [gcpolicy.FORCE_MIN_OLD_COLLECTIONS]
    collected = await _run_for(130.5, busy, waiting)
    # forced once 60 s had passed since the last; garbage then piles up again ...
    assert len(collected) == 1 and collected[0] >= 60.0
    # ... but a little garbage is not worth a forced stall
    waiting[0] = 1
    assert await _run_for(130.5, busy, waiting) == []


@pytest.mark.anyio(False)
def test_apply_freezes_and_moves_full_collections_out_of_reach() -> None:
    before = gc.get_threshold()
    try:
        gcpolicy.apply()
        young, middle, full = gc.get_threshold()
        assert young == gcpolicy.YOUNG_THRESHOLD and middle == gcpolicy.MIDDLE_THRESHOLD
        assert full >= 1 << 30
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.anyio(False)
def test_survivors_reach_the_old_generation_after_a_few_young_collections() -> None:
    # In a storm nearly every young object survives (2,000 calls alive for 2 s). With the
    # middle generation collected only every 10th young collection it held ~10 young
    # collections' survivors, and its collection walked them all at once (423 ms measured in
    # slow_upstream --full); collected every other one it walks at most two young generations'
    # worth, and the survivors move on to the old generation, which only the idle collector walks.
    before = gc.get_threshold()
    try:
        gcpolicy.apply()
        marker = [object()]  # a tracked container allocated now, alive throughout
        keep = [[i] for i in range(4 * gcpolicy.YOUNG_THRESHOLD)]
        assert any(o is marker for o in gc.get_objects(generation=2))
        del keep
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _slow_timer() -> gcpolicy.GcTimes:
    timer = gcpolicy.GcTimes(slow_s=0.0)
    gc.callbacks.append(timer)
    try:
        gc.collect(0)
        gc.collect(1)
    finally:
        gc.callbacks.remove(timer)
    return timer


@pytest.mark.anyio(False)
def test_the_timer_counts_collections_per_generation_and_keeps_the_slow_ones() -> None:
    timer = _slow_timer()
    assert timer.count[0] >= 1 and timer.count[1] >= 1
    assert timer.max_s[0] > 0 and timer.total_s[1] >= timer.max_s[1] > 0
    assert {gen for gen, _, _, _ in timer.slow} >= {0, 1}
    assert all(took > 0 and cpu >= 0 and found >= 0 for _, took, cpu, found in timer.slow)


def test_a_slow_collection_is_kept_with_its_cpu_time_beside_its_wall_time() -> None:
    # On a loaded machine the collecting thread may wait for a CPU in the middle of a
    # collection: young collections of 60-200 ms wall time that found nothing to free were
    # logged. The CPU time tells such a wait from a collection that was itself that long.
    wall, cpu = [0.0], [0.0]
    timer = gcpolicy.GcTimes(slow_s=0.05, clock=lambda: wall[0], cpu_clock=lambda: cpu[0])
    timer("start", {"generation": 1})
    wall[0], cpu[0] = 0.2, 0.004  # descheduled most of the time
    timer("stop", {"generation": 1, "collected": 0})
    timer("start", {"generation": 0})
    wall[0], cpu[0] = 0.21, 0.014  # 10 ms: not slow
    timer("stop", {"generation": 0, "collected": 5})
    assert timer.slow == [(1, pytest.approx(0.2), pytest.approx(0.004), 0)]
    assert timer.count == [1, 1, 0] and timer.max_s[1] == pytest.approx(0.2)


async def test_the_idle_collector_logs_the_slow_collections(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    timer = _slow_timer()
    slow = len(timer.slow)
    monkeypatch.setattr(gcpolicy, "times", timer)
    with caplog.at_level("INFO", logger="exai"), trio.move_on_after(1.5):
        await gcpolicy.collect_when_idle(lambda: (1, 0), pending=lambda: 0)
    logged = [r for r in caplog.records if getattr(r, "event", None) == "gc.slow_collection"]
    assert len(logged) == slow and timer.slow == []
    assert logged[0].levelname == "WARNING"
    fields = [r.fields for r in logged]  # type: ignore[attr-defined]
    assert {f["generation"] for f in fields} >= {0, 1}
    assert all(f["cpu_s"] >= 0 for f in fields)
