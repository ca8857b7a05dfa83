"""The stall detector finds the task that blocked the trio loop, and only that one.

These tests block the loop on purpose with ``time.sleep``: measuring a real blocking call is
the point, so this is the one place real time is asserted on (as a lower bound only).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from exai.server import stalls
from exai.server.stalls import (
    MAX_KEPT_STALLS,
    LoopProbe,
    StallDetector,
    loop_probe,
    stall_detector,
)
from tests import stall_plugin

pytestmark = pytest.mark.anyio

# The plugin's fixture, usable here before tests/conftest.py loads the plugin.
stall_detector_fixture = stall_plugin.stall_detector

REPO = Path(__file__).resolve().parents[2]


async def _blocker() -> None:
    time.sleep(0.2)  # noqa: ASYNC251 - the blocking call under test
    await trio.lowlevel.checkpoint()


async def _polite() -> None:
    for _ in range(200):
        await trio.lowlevel.checkpoint()


async def test_a_blocking_sleep_in_a_task_is_recorded_with_the_task_name() -> None:
    with stall_detector(threshold_s=0.05) as detector:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_blocker, name="blocker")

    assert [name for _, name in detector.stalls] == ["blocker"]
    duration, _ = detector.stalls[0]
    assert duration >= 0.19
    assert detector.max_stall_s == duration
    assert detector.stall_count == 1


async def test_a_task_that_checkpoints_often_is_not_flagged() -> None:
    # the time the machine keeps the thread off the CPU left out, as the fixture does: by wall
    # time alone a polite step of a few microseconds was a 104 ms "stall" beside two busy
    # processes on the 2-core box (the test is about what the task runs, not the machine's load)
    with stall_detector(threshold_s=0.1, exclude_descheduled=True) as detector:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(_polite, name=f"polite-{i}")

    assert detector.stalls == []
    assert detector.stall_count == 0
    assert detector.steps >= 5 * 200


async def test_on_stall_is_called_with_duration_and_task_name() -> None:
    seen: list[tuple[float, str]] = []
    with stall_detector(threshold_s=0.05, on_stall=lambda d, name: seen.append((d, name))):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_blocker, name="blocker")

    assert [name for _, name in seen] == ["blocker"]
    assert seen[0][0] >= 0.19


async def test_only_the_most_recent_stalls_are_kept_but_all_are_counted() -> None:
    # A negative threshold makes every step a stall: no real blocking needed.
    with stall_detector(threshold_s=-1.0) as detector:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_polite, name="polite")

    assert detector.stall_count > MAX_KEPT_STALLS
    assert len(detector.stalls) == MAX_KEPT_STALLS


async def test_reset_forgets_what_was_measured() -> None:
    with stall_detector(threshold_s=-1.0) as detector:
        await trio.lowlevel.checkpoint()
        detector.reset()
        assert (detector.stalls, detector.stall_count, detector.max_stall_s) == ([], 0, 0.0)


async def test_the_detector_stops_watching_when_the_block_exits() -> None:
    with stall_detector(threshold_s=0.05) as detector:
        pass
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_blocker, name="blocker")

    assert detector.stalls == []


async def test_scheduler_batches_are_measured() -> None:
    with stall_detector(threshold_s=1.0) as detector:
        await trio.sleep(0.001)  # one real I/O wait, so a batch starts and ends
        await trio.sleep(0.001)

    assert detector.max_batch_s > 0.0


async def test_the_fixture_passes_a_well_behaved_test(
    stall_detector_fixture: StallDetector,
) -> None:
    await _polite()
    assert stall_detector_fixture.stall_count == 0


def test_the_report_names_the_task_and_the_duration() -> None:
    detector = StallDetector(threshold_s=0.1)
    detector._stalls.append((0.2345, "session-7"))
    detector.stall_count = 1

    report = stall_plugin.stall_report(detector)

    assert report is not None
    assert "'session-7'" in report
    assert "234.5 ms" in report


def test_no_report_when_nothing_stalled() -> None:
    assert stall_plugin.stall_report(StallDetector()) is None


_PLUGIN_USER = """
    import time

    import pytest
    import trio


    @pytest.fixture
    def anyio_backend():
        return "trio"


    async def blocker():
        time.sleep(0.2)
        await trio.lowlevel.checkpoint()


    @pytest.mark.anyio
    async def test_blocks(stall_detector):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker, name="the-blocker")


    @pytest.mark.anyio
    async def test_polite(stall_detector):
        for _ in range(100):
            await trio.lowlevel.checkpoint()


    @pytest.mark.anyio
    @pytest.mark.stall_threshold(5)
    async def test_tolerated(stall_detector):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker, name="the-blocker")
"""


@pytest.mark.anyio(False)
def test_the_plugin_fails_only_the_test_that_blocked(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(_PLUGIN_USER))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.stall_plugin", "-p", "no:cacheprovider",
         "-q", "-rE", str(tmp_path / "test_user.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr

    # A teardown error is reported next to the call's pass: 3 passed, and 1 error.
    assert "3 passed, 1 error" in out, out
    assert "ERROR test_user.py::test_blocks" in out, out
    assert "ERROR test_user.py::test_polite" not in out, out
    assert "ERROR test_user.py::test_tolerated" not in out, out
    assert "'the-blocker'" in out, out


# -- a busy machine is not a blocking call ---------------------------------------------------

_HAS_SCHEDSTAT = os.path.exists("/proc/thread-self/schedstat") and hasattr(os, "sched_setaffinity")


def _spin_cpu(seconds: float) -> None:
    """Run Python code on the CPU for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def _until_probed(*probes: LoopProbe, limit_s: float = 30.0) -> None:
    """Wait until each probe has woken once more than it had when called (the wake-up that
    measures a block that just ended), whatever the machine's load: a fixed sleep after a
    block can end first on a busy machine, and a wake-up that comes with the probe's
    cancellation counts as none. ``limit_s``: real time before the test fails."""
    marks = [p.probes for p in probes]
    deadline = time.perf_counter() + limit_s
    while any(p.probes <= m for p, m in zip(probes, marks, strict=True)):
        assert time.perf_counter() < deadline, "the probe did not wake"
        await trio.sleep(0.005)


async def _cpu_step() -> None:
    _spin_cpu(0.02)
    await trio.lowlevel.checkpoint()


@contextlib.contextmanager
def _on_one_busy_cpu(hogs: int = 4) -> Iterator[None]:
    """Run the block with this thread (and the threads it starts) on one CPU that ``hogs`` busy
    processes share, started 0.3 s before it."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(hogs)]
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)  # let the hogs start before measuring
        yield
    finally:
        os.sched_setaffinity(0, before)
        for h in procs:
            h.kill()
            h.wait()


@contextlib.contextmanager
def _wakers_on_one_busy_cpu(wakers: int = 4) -> Iterator[None]:
    """The block on one CPU with busy processes (:func:`_on_one_busy_cpu`), beside ``wakers``
    threads of this process that wake every millisecond (so ask for the GIL) at the lowest
    priority (``SCHED_IDLE``): threads the machine keeps off the CPU while the loop waits."""
    stop = threading.Event()

    def low_priority_waker() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        while not stop.is_set():
            time.sleep(0.001)

    with _on_one_busy_cpu():
        threads = [threading.Thread(target=low_priority_waker) for _ in range(wakers)]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            for thread in threads:
                thread.join()


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat and CPU affinity")
async def test_a_step_slowed_only_by_other_processes_is_not_a_stall() -> None:
    # The loop's thread shares one CPU with four busy processes: a step of 20 ms of CPU takes
    # about 100 ms of wall time. Wall time alone calls that a stall; the run-queue delay says
    # the thread was waiting for the CPU, not blocking.
    with (
        _on_one_busy_cpu(),
        stall_detector(threshold_s=0.05) as by_wall,
        stall_detector(threshold_s=0.05, exclude_descheduled=True) as by_cpu,
    ):
        for _ in range(5):
            await _cpu_step()

    assert by_wall.stall_count > 0, "the hogs did not slow the loop down; the test proves nothing"
    assert by_cpu.stall_count == 0, by_cpu.stalls
    assert by_cpu.descheduled_s > 0.05


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat and CPU affinity")
async def test_a_step_waiting_for_a_thread_the_machine_keeps_off_the_cpu_is_not_a_stall() -> None:
    # What failed `make test` on the shared CI box: 100-120 ms "stalls" of steps that used
    # under 1 ms of CPU. The loop thread slept waiting for another thread of the process that was
    # itself waiting for a CPU — Thread.start waits for the new thread to run (trio's to_thread
    # starts one when no worker is idle), and the GIL's hand-off waits for the thread that asked
    # for it to take it. Its own run-queue delay does not show that. Here: four threads that
    # wake every millisecond (so ask for the GIL) at the lowest priority (SCHED_IDLE), on one CPU
    # with four busy processes, while the loop runs steps of 10 ms of CPU (seen: up to 2 s of
    # wall time, the loop thread's own run-queue delay explaining a fraction).
    # the suite's threshold (0.1 s); steps until the old measure has been fooled twice
    # (the kernel decides when the low-priority threads run), 60 at most
    with (
        _wakers_on_one_busy_cpu(),
        stall_detector(threshold_s=0.1, exclude_descheduled=True, exclude_others=False) as own,
        stall_detector(threshold_s=0.1, exclude_descheduled=True) as all_threads,
    ):
        for _ in range(60):
            _spin_cpu(0.01)
            await trio.lowlevel.checkpoint()
            if own.stall_count >= 2:
                break

    assert own.stall_count > 0, "the other thread was not kept waiting; the test proves nothing"
    assert all_threads.stall_count == 0, all_threads.stalls
    assert all_threads.descheduled_s > own.descheduled_s


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat")
async def test_a_wait_for_a_cpu_between_the_steps_clock_and_schedstat_reads_is_no_stall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The instrument read the step's start on the clock, then the run-queue delay: between the
    # two the loop's thread can give up the GIL at a bytecode boundary (a worker thread asked
    # for it) and, woken, wait for a CPU. That wait was in the delay read at the start, so it
    # was not subtracted, and in the step's wall time: a step that only checkpoints read as a
    # 100+ ms stall on a loaded machine (the occasional failure of tests/client/test_bridge_e2e.py
    # on the 2-core CI box, whose worker-thread hand-offs ask for the GIL all the time). Here
    # the first schedstat read of one before_task_step waits 0.2 s "in the run queue" before
    # it reads: the clock runs on, and the delay it reads has grown by as much.
    delay_ns = [0]
    state = {"armed": False, "in_before": False}

    def wait_then_read() -> int:
        if state["armed"] and state["in_before"]:
            state["armed"] = False
            time.sleep(0.2)  # (stands for the wait for a CPU)
            delay_ns[0] += 200_000_000
        return delay_ns[0]

    monkeypatch.setattr(stalls, "_run_delay_ns", lambda fd: wait_then_read())
    monkeypatch.setattr(stalls, "_on_cpu_and_run_delay_ns", lambda fd: (0, wait_then_read()))
    before = StallDetector.before_task_step

    def watched_before(self: StallDetector, task: trio.lowlevel.Task) -> None:
        state["in_before"] = True
        try:
            before(self, task)
        finally:
            state["in_before"] = False

    monkeypatch.setattr(StallDetector, "before_task_step", watched_before)
    # (the other threads' delays read once, at the first step: a step that reads them again
    # reads the clock after them, which keeps such a wait out of the step either way)
    monkeypatch.setattr(stalls, "OTHERS_SNAPSHOT_EVERY_S", 1e9)
    with stall_detector(threshold_s=0.1, exclude_descheduled=True) as detector:
        await trio.lowlevel.checkpoint()
        state["armed"] = True
        for _ in range(3):
            await trio.lowlevel.checkpoint()
    assert not state["armed"], "no step began while armed; the test proves nothing"
    assert detector.stalls == [], detector.stalls


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat")
async def test_a_wait_for_a_cpu_between_the_steps_end_and_its_schedstat_read_hides_no_stall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The other end of a step: the instrument read the clock, then the run-queue delay, and a
    # wait for a CPU between the two was subtracted from a wall time it is not in — a real
    # block measured short by all of it (test_a_blocking_sleep_is_still_a_stall_when_descheduled
    # _time_is_excluded: 0.187 s for a 0.2 s sleep, two pytest workers at load 12-15). Here
    # the schedstat read at the end of the blocking step waits 0.2 s "in the run queue" before
    # it reads: the clock runs on, and the delay it reads has grown by as much.
    delay_ns = [0]
    state = {"armed": False, "in_after": False}

    def wait_then_read() -> int:
        if state["armed"] and state["in_after"]:
            state["armed"] = False
            time.sleep(0.2)  # (stands for the wait for a CPU)
            delay_ns[0] += 200_000_000
        return delay_ns[0]

    monkeypatch.setattr(stalls, "_run_delay_ns", lambda fd: wait_then_read())
    monkeypatch.setattr(stalls, "_on_cpu_and_run_delay_ns", lambda fd: (0, wait_then_read()))
    after = StallDetector.after_task_step

    def watched_after(self: StallDetector, task: trio.lowlevel.Task) -> None:
        state["in_after"] = True
        try:
            after(self, task)
        finally:
            state["in_after"] = False

    monkeypatch.setattr(StallDetector, "after_task_step", watched_after)

    async def blocker() -> None:
        state["armed"] = True
        time.sleep(0.2)  # noqa: ASYNC251 - the blocking call under test
        await trio.lowlevel.checkpoint()

    # (the other threads' correction left out: its reads would see the stand-in's delay too)
    with stall_detector(
        threshold_s=0.1, exclude_descheduled=True, exclude_others=False
    ) as detector:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocker, name="blocker")
    assert not state["armed"], "no step ended while armed; the test proves nothing"
    assert [name for _, name in detector.stalls] == ["blocker"], detector.stalls
    assert detector.stalls[0][0] >= 0.19


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat")
async def test_a_cpu_heavy_step_stays_a_stall_however_long_other_threads_waited() -> None:
    # Other threads waiting for a CPU meanwhile must not excuse a step that ran on the CPU: the
    # subtraction stops at the step's own CPU time.
    waiting = threading.Event()

    def busy_elsewhere() -> None:
        waiting.wait(5)

    others = [threading.Thread(target=busy_elsewhere) for _ in range(4)]
    for t in others:
        t.start()
    try:
        with stall_detector(threshold_s=0.05, exclude_descheduled=True) as detector:
            async with trio.open_nursery() as nursery:

                async def spin() -> None:
                    _spin_cpu(0.2)
                    await trio.lowlevel.checkpoint()

                nursery.start_soon(spin, name="spinner")
    finally:
        waiting.set()
        for t in others:
            t.join()

    assert [name for _, name in detector.stalls] == ["spinner"]
    assert detector.stalls[0][0] >= 0.19


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat")
async def test_a_blocking_sleep_is_still_a_stall_when_descheduled_time_is_excluded() -> None:
    with stall_detector(threshold_s=0.05, exclude_descheduled=True) as detector:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_blocker, name="blocker")

    assert [name for _, name in detector.stalls] == ["blocker"]
    assert detector.stalls[0][0] >= 0.19


# -- the daemon's sampled detector: LoopProbe ------------------------------------------------


async def test_the_probe_sees_a_blocking_sleep_and_names_its_task() -> None:
    seen: list[tuple[float, str]] = []
    with loop_probe(threshold_s=0.05, on_stall=lambda d, w: seen.append((d, w))) as probe:
        await trio.sleep(0.05)  # a few probes first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_blocker, name="blocker")
        await _until_probed(probe)  # the probe wakes (late) after the block

    assert probe.stall_count == 1, probe.stalls
    duration, where = probe.stalls[0]
    # the probe wakes at least 0.2 s after it went to sleep, less its own 10 ms interval — and
    # less what the machine's scheduler counts as run-queue delay in the gap: on a loaded
    # machine (three CPU hogs on two cores) that reads 10-25 ms more than the wall time shows
    assert duration >= 0.2 - probe.interval_s - 0.05, (probe.descheduled_s, probe.stalls)
    assert probe.max_stall_s == duration
    # the watchdog thread read the loop thread's stack while time.sleep held it
    assert where.startswith("blocker (_blocker test_stalls.py:"), where
    assert seen == probe.stalls


async def test_the_probe_does_not_flag_tasks_that_checkpoint_often() -> None:
    with loop_probe(threshold_s=0.1) as probe:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(_polite, name=f"polite-{i}")
        while probe.probes < 5:
            await trio.sleep(0.01)

    assert probe.stall_count == 0, probe.stalls


async def test_starting_the_probe_does_not_wait_for_its_thread_to_be_scheduled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a loaded machine a new thread may run hundreds of milliseconds after it is created
    # (seen: the probe's first step blocked the loop 0.13-1.2 s under make test's load, through
    # threading.Thread.start, which waits for the thread to run). Here every threading.Thread
    # begins 0.3 s late; the loop must not wait for that.
    bootstrap = threading.Thread._bootstrap  # type: ignore[attr-defined]

    def late_bootstrap(self: threading.Thread) -> None:
        time.sleep(0.3)
        bootstrap(self)

    monkeypatch.setattr(threading.Thread, "_bootstrap", late_bootstrap)
    with (
        stall_detector(threshold_s=0.1, exclude_descheduled=True) as detector,
        loop_probe(threshold_s=0.05) as probe,
    ):
        while probe.probes < 3:
            await trio.sleep(0.01)
    assert detector.stall_count == 0, detector.stalls


async def test_an_idle_loop_costs_the_probe_no_wake_ups() -> None:
    # An editor's daemon idles most of the day: a probe waking 100 times a second whatever the
    # loop does cost an idle `exai serve` ≈ 26 ms of CPU and ≈ 119 wake-ups per second
    # (`python -m benchmarks run idle` on a loaded 2-core VM; ≈ 2.5 ms and 13-16 after).
    # Nothing but the probe runs here for 0.3 s: it wakes once, finds the loop idle, and waits
    # for the loop's next round (the test's own wake-up) — 30 wake-ups before.
    with loop_probe(threshold_s=0.05) as probe:
        await trio.sleep(0.3)
        woken = probe.probes
    assert woken <= 3, woken
    assert probe.idled >= 1
    assert probe.stall_count == 0, probe.stalls


async def test_a_block_in_the_round_that_ends_an_idle_period_is_a_stall_named() -> None:
    # the round that wakes an idle probe is where its next gap begins: a task that blocks in
    # that round — before or after the probe's own step — is measured and named as ever
    seen: list[tuple[float, str]] = []
    with loop_probe(threshold_s=0.05, on_stall=lambda d, w: seen.append((d, w))) as probe:
        while probe.idled == 0:
            await trio.sleep(0.1)
        idled = probe.idled
        await trio.sleep(0.1)  # the probe idles; this wake-up is the next round
        was_idle = probe.idled > idled
        time.sleep(0.2)  # noqa: ASYNC251 - the blocking call under test
        await _until_probed(probe)

    assert was_idle, "the probe was not idle when the block began; the test proves nothing"

    assert probe.stall_count == 1, probe.stalls
    duration, where = probe.stalls[0]
    assert duration >= 0.2 - probe.interval_s - 0.05, (probe.descheduled_s, probe.stalls)
    # the watchdog thread was woken with the probe and read the loop's stack during the block
    assert "test_a_block_in_the_round_that_ends_an_idle_period_is_a_stall_named" in where, where
    assert seen == probe.stalls


def test_the_probe_goes_idle_only_at_the_end_of_a_round_whose_rest_ran_briefly() -> None:
    # The probe decides in its own step that its last interval was idle; other tasks of the same
    # round may still run after that step (a first version parked the probe there and then: a
    # 0.2 s CPU-heavy step in that round went unmeasured, one run in three of
    # test_the_probe_keeps_a_cpu_heavy_step_…). So it goes idle only at the round's end
    # (before_io_wait), if the round's rest ran for less than the threshold and the interval —
    # else its armed timer reports them — and never while more tasks are ready (timeout 0).
    disarmed: list[int] = []
    armed: list[float] = []
    removed: list[object] = []

    class Timer:
        def disarm(self) -> None:
            disarmed.append(1)

        def arm(self, seconds: float) -> bool:
            armed.append(seconds)
            return True

    probe = LoopProbe(threshold_s=0.05)
    watch = stalls._IdleWatch(probe, Timer(), removed.append)  # type: ignore[arg-type]
    now = time.perf_counter()

    watch.idle_by = now - 0.001  # the round's rest ran too long
    watch.before_io_wait(1.0)
    assert not watch.idle and not disarmed and probe.idled == 0
    assert removed == [watch]  # (no hook of it runs any more)

    watch.idle_by = now + 60.0
    watch.before_io_wait(0.0)  # tasks ready: the loop goes on at once
    assert not watch.idle and not disarmed and probe.idled == 0
    assert removed == [watch, watch]

    watch.before_io_wait(1.0)
    assert watch.idle and disarmed == [1] and probe.idled == 1
    assert probe._due_at == float("inf")
    watch.before_io_wait(1.0)  # (a round of its own while idle cannot come; nothing changes)
    assert disarmed == [1] and len(removed) == 2

    watch.after_io_wait(1.0)  # the next round: armed again, the gap begins here
    assert not watch.idle and armed == [probe.interval_s] and len(removed) == 3
    assert probe._resumed is not None
    assert probe._due_at == pytest.approx(probe._resumed[0] + probe.interval_s)


async def test_a_busy_loop_runs_no_hook_of_the_probe() -> None:
    # the probe's instrument is installed only from a wake-up that found the loop idle: a loop
    # that runs something in every interval (here: a task using the CPU) never has it
    installed: list[object] = []
    add = trio.lowlevel.add_instrument

    def counted(instrument: trio.abc.Instrument) -> None:
        if isinstance(instrument, stalls._IdleWatch):
            installed.append(instrument)
        add(instrument)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trio.lowlevel, "add_instrument", counted)
        with loop_probe(threshold_s=0.05) as probe:
            while probe.probes < 10:
                _spin_cpu(0.002)  # (20 % of each interval)
                await trio.lowlevel.checkpoint()
    assert installed == [], f"{len(installed)} of {probe.probes} wake-ups installed it"


async def test_a_probe_stopped_while_idle_stops_its_watchdog() -> None:
    with loop_probe(threshold_s=0.05) as probe:
        while probe.idled == 0:
            await trio.sleep(0.1)
        await trio.sleep(0.05)  # (the watchdog is asleep until the probe wakes)
        watchdogs = set(probe._not_waited_for)
    assert watchdogs, "the watchdog thread never ran"
    deadline = time.perf_counter() + 30.0  # real time before the test fails
    while not probe._stop.is_set() or watchdogs & {int(t) for t in os.listdir("/proc/self/task")}:
        assert time.perf_counter() < deadline, "the watchdog thread did not end"
        await trio.sleep(0.01)


async def test_the_probe_stops_with_its_block() -> None:
    with loop_probe(threshold_s=0.05) as probe:
        await trio.sleep(0.05)
    probes = probe.probes
    await trio.sleep(0.05)
    assert probe.probes == probes
    assert probe._stop.is_set()  # the watchdog thread was told to stop


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat and CPU affinity")
async def test_the_probe_does_not_call_waiting_for_a_thread_off_the_cpu_a_stall() -> None:
    # As for the instrument (test_a_step_waiting_for_a_thread_the_machine_keeps_off_the_cpu_…):
    # the loop asleep, waiting for the GIL held by a thread the machine keeps in its run queue.
    # (A full slow_upstream run on a 2-core VM logged 82.5 ms while the daemon's store thread,
    # the mock and the load process shared the CPUs.)
    with (
        _wakers_on_one_busy_cpu(),
        loop_probe(threshold_s=0.1, exclude_others=False) as own,
        loop_probe(threshold_s=0.1) as all_threads,
    ):
        for _ in range(60):
            _spin_cpu(0.01)
            await trio.lowlevel.checkpoint()
            if own.stall_count >= 2:
                break
        await _until_probed(own, all_threads)  # both probes wake once more

    assert own.stall_count > 0, "the other thread was not kept waiting; the test proves nothing"
    assert all_threads.stall_count == 0, all_threads.stalls
    # (what it left out: not compared with the other probe's figure — each probe has its own
    # thread and wakes at its own moments, so their windows differ: 0.77 s against 0.82 s in a
    # CI run at -n 2, with the two assertions above holding)
    assert all_threads.descheduled_s > 0


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat")
async def test_the_probe_keeps_a_cpu_heavy_step_a_stall_however_long_other_threads_waited() -> None:
    # Four threads spinning on the CPU beside the loop wait in the run queue meanwhile (2 CPUs
    # for 5 threads): their delay must not excuse what the loop ran itself.
    stop = threading.Event()

    def spin_elsewhere() -> None:
        while not stop.is_set():
            _spin_cpu(0.001)

    others = [threading.Thread(target=spin_elsewhere) for _ in range(4)]
    for t in others:
        t.start()
    try:
        with loop_probe(threshold_s=0.05) as probe:
            await trio.sleep(0.03)
            _spin_cpu(0.2)
            await _until_probed(probe)
    finally:
        stop.set()
        for t in others:
            t.join()

    assert probe.stall_count >= 1, (probe.stalls, probe.max_stall_s, probe.descheduled_s)
    assert max(d for d, _ in probe.stalls) >= 0.2 - probe.interval_s - 0.01


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat and CPU affinity")
async def test_the_probe_does_not_call_a_busy_machine_a_stall() -> None:
    # As for the instrument above: steps of 20 ms of CPU that the hogs stretch to ~100 ms of
    # wall time. A probe that does not subtract the run-queue delay calls them stalls.
    by_wall = LoopProbe(threshold_s=0.05, exclude_descheduled=False)
    with _on_one_busy_cpu():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(by_wall.run)
            with loop_probe(threshold_s=0.05) as by_cpu:
                for _ in range(5):
                    await _cpu_step()
                await _until_probed(by_wall, by_cpu)
            nursery.cancel_scope.cancel()

    assert by_wall.stall_count > 0, "the hogs did not slow the loop down; the test proves nothing"
    assert by_cpu.stall_count == 0, by_cpu.stalls
    assert by_cpu.descheduled_s > 0.05


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux timerfd")
async def test_under_trio_s_own_clock_the_probe_waits_on_a_timerfd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # trio.sleep under the system clock cost most of an idle daemon's CPU (a cancel scope, a
    # deadline and a Cancelled exception per wake-up, 100 times a second)
    waits: list[float] = []
    timer_sleep = stalls._Timer.sleep

    async def counted(self: stalls._Timer, seconds: float) -> None:
        waits.append(seconds)
        await timer_sleep(self, seconds)

    monkeypatch.setattr(stalls._Timer, "sleep", counted)
    with loop_probe(threshold_s=0.05) as probe:
        while probe.probes < 3:
            await trio.sleep(0.01)

    assert len(waits) >= probe.probes >= 3
    assert set(waits) == {probe.interval_s}


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
async def test_under_a_mock_clock_the_probe_sleeps_on_that_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_timerfd() -> None:
        raise AssertionError("a timerfd runs on the system's clock, not the test's")

    monkeypatch.setattr(stalls._Timer, "open", no_timerfd)
    with loop_probe(threshold_s=0.05) as probe:
        await trio.sleep(1.0)  # (virtual: the clock jumps from one probe wake-up to the next)

    assert probe.probes >= 90


@pytest.mark.skipif(not _HAS_SCHEDSTAT, reason="needs Linux schedstat")
async def test_the_probe_reads_the_run_queue_delay_once_per_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = 0
    read = stalls._on_cpu_and_run_delay_ns

    def counted(fd: int) -> tuple[int, int]:
        nonlocal reads
        reads += 1
        return read(fd)

    monkeypatch.setattr(stalls, "_on_cpu_and_run_delay_ns", counted)
    with loop_probe(threshold_s=0.05) as probe:
        while probe.probes < 5:
            await trio.sleep(0.01)
    probes = probe.probes

    # the loop thread's own schedstat: one read when it starts, then one per wake-up (the
    # other threads' are read every OTHERS_SNAPSHOT_EVERY_S, through _run_delay_ns, and were
    # counted here by mistake once the probe read them: 9 reads for 6 wake-ups in one run)
    # (and one more per idle period: where the gap after it begins, read at the start of the
    # round that ends it)
    assert reads <= probes + 1 + probe.idled


async def test_a_collection_another_thread_still_runs_at_the_steps_end_is_left_out() -> None:
    # tests.helpers.live_objects runs gc.collect() in a worker thread. The collection holds the
    # GIL; the loop's thread, which waits for it inside after_task_step (its schedstat read is a
    # syscall: it lets go of the GIL), gets it back at the first bytecode of the collection's
    # "stop" callback — before that callback has run — and measured the wait as its step's:
    # 0.1-0.9 s "stalls" of test_endings.py's leave-nothing-behind test in whole-suite runs.
    # Here the collection's "start" comes during the step, the sleep stands for the wait for
    # the GIL, and the "stop" comes after the step has been measured.
    with stall_detector(threshold_s=0.1, exclude_gc=True) as detector:
        await trio.lowlevel.checkpoint()
        detector._gc_callback("start", {"generation": 2})
        time.sleep(0.2)  # noqa: ASYNC251 (stands for the wait for the collection's GIL)
        await trio.lowlevel.checkpoint()
        detector._gc_callback("stop", {"generation": 2})
        await trio.lowlevel.checkpoint()
    assert detector.stalls == [], detector.stalls
    # without a collection the same step is a stall (the test can fail)
    with stall_detector(threshold_s=0.1, exclude_gc=True) as detector:
        await trio.lowlevel.checkpoint()
        time.sleep(0.2)  # noqa: ASYNC251 (a blocking call)
        await trio.lowlevel.checkpoint()
    assert len(detector.stalls) == 1, detector.stalls
