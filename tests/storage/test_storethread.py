"""The store's worker thread (``exai/storage/storethread.py``): one long-lived thread, one job at
a time in arrival order, a caller that leaves never frees the thread before its job ended, and a
bounded close.

Jobs that must wait block on a :class:`threading.Event` the test sets; every wait on the loop
has a hang guard (``fail_after``), none measures time.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import anyio
import pytest
import trio

from exai.errors import StoreUnavailableError
from exai.storage.storethread import StoreThread

pytestmark = pytest.mark.anyio

GUARD_S = 10


def _alive(ident: int) -> bool:
    return ident in sys._current_frames()


async def _until(predicate: Any) -> None:
    with anyio.fail_after(GUARD_S):
        while not predicate():
            await anyio.sleep(0.005)


async def test_a_job_runs_in_the_thread_and_returns_its_result_or_raises_its_error() -> None:
    async with StoreThread() as thread:
        ident = await thread.run(threading.get_ident)
        assert ident != threading.get_ident()
        assert await thread.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(KeyError, match="nope"):
            await thread.run({}.__getitem__, "nope")
        # one long-lived thread for every job
        assert {await thread.run(threading.get_ident) for _ in range(20)} == {ident}
        assert thread.jobs == 23


async def test_jobs_run_one_at_a_time_in_the_order_their_callers_came() -> None:
    running = 0
    overlaps = 0
    order: list[int] = []
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal running, overlaps
        with lock:
            running += 1
            overlaps += running > 1
        order.append(i)
        threading.Event().wait(0.001)  # (a blocking call: the GIL is let go)
        with lock:
            running -= 1
        return i

    results: dict[int, int] = {}
    arrived: list[int] = []
    async with StoreThread() as thread:

        async def call(i: int) -> None:
            arrived.append(i)  # (the same task step as queueing up in run())
            results[i] = await thread.run(job, i)

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(call, i)
    assert overlaps == 0
    assert order == arrived
    assert results == {i: i for i in range(30)}


async def test_a_caller_that_leaves_mid_job_returns_at_once_and_the_next_job_waits_for_it() -> None:
    gate, entered = threading.Event(), threading.Event()
    events: list[str] = []

    def slow() -> str:
        entered.set()
        gate.wait(GUARD_S)
        events.append("slow ended")
        return "slow"

    def after() -> str:
        events.append("next ran")
        return "next"

    async with StoreThread() as thread:
        leaving = anyio.CancelScope()

        async def leaves() -> None:
            with leaving:
                await thread.run(slow)

        next_result: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(leaves)
            await anyio.to_thread.run_sync(entered.wait, GUARD_S)
            leaving.cancel()  # the caller's deadline passed: it leaves, the job runs on
            await _until(lambda: not thread._held)
            assert leaving.cancelled_caught and thread.in_use  # (still busy: the job runs)

            async def then() -> None:
                next_result.append(await thread.run(after))

            tg.start_soon(then)
            await _until(lambda: thread._held)
            assert events == []  # the next job waits for the abandoned one
            gate.set()
        assert events == ["slow ended", "next ran"] and next_result == ["next"]
        assert not thread.in_use


async def test_a_caller_that_leaves_while_queued_never_runs_its_job() -> None:
    ran: list[str] = []
    async with StoreThread() as thread:
        leaving = anyio.CancelScope()

        async def queued() -> None:
            with leaving:
                await thread.run(ran.append, "queued")

        async with anyio.create_task_group() as tg, thread.hold():
            tg.start_soon(queued)
            await _until(lambda: thread.waiting == 1)
            leaving.cancel()
            await _until(lambda: thread.waiting == 0)
        await thread.run(ran.append, "later")
    assert ran == ["later"]


async def test_a_caller_cancelled_just_after_it_is_given_the_turn_hands_no_job_in() -> None:
    """(The turn came while it was queued and its scope was cancelled before it ran again: it
    handed its job in anyway — the job ran, for a write a write its caller was told was
    cancelled — and its ``on_abandon`` was called on it.)"""
    ran: list[str] = []
    abandoned: list[str] = []
    async with StoreThread() as thread:
        leaving = anyio.CancelScope()

        async def queued() -> None:
            with leaving:
                await thread.run(ran.append, "queued", on_abandon=lambda: abandoned.append("x"))

        async with anyio.create_task_group() as tg:
            async with thread.hold():
                tg.start_soon(queued)
                await _until(lambda: thread.waiting == 1)
            # (no checkpoint since the hold ended: the caller has the turn but has not run yet)
            leaving.cancel()
        with anyio.fail_after(GUARD_S):
            await thread.run(ran.append, "later")  # (after any job handed in has ended)
        assert not thread.in_use
    assert leaving.cancelled_caught
    assert ran == ["later"] and abandoned == []


async def test_hold_keeps_jobs_waiting_until_it_ends() -> None:
    ran: list[str] = []
    async with StoreThread() as thread:
        async with anyio.create_task_group() as tg, thread.hold():
            tg.start_soon(thread.run, ran.append, "job")
            await _until(lambda: thread.waiting == 1)
            assert ran == [] and thread.busy
            # (the job runs once the hold ends)
        assert ran == ["job"] and not thread.busy


async def test_closing_stops_the_thread_and_later_calls_are_refused() -> None:
    thread = StoreThread()
    async with thread:
        ident = await thread.run(threading.get_ident)
        assert _alive(ident)
    await _until(lambda: not _alive(ident))
    with pytest.raises(StoreUnavailableError):
        await thread.run(int)


async def test_closing_while_a_job_hangs_is_bounded_and_the_thread_ends_with_its_job() -> None:
    gate, entered = threading.Event(), threading.Event()
    idents: list[int] = []

    def hung() -> None:
        idents.append(threading.get_ident())
        entered.set()
        gate.wait(GUARD_S)

    thread = StoreThread(close_timeout_s=0.05)
    outcomes: list[BaseException] = []
    try:
        await thread.__aenter__()
        fd = thread._wakeup.fd  # type: ignore[union-attr]
        async with anyio.create_task_group() as tg:

            async def waits() -> None:
                try:
                    await thread.run(hung)
                except StoreUnavailableError as exc:
                    outcomes.append(exc)

            tg.start_soon(waits)
            await anyio.to_thread.run_sync(entered.wait, GUARD_S)
            with anyio.fail_after(GUARD_S):
                await thread.__aexit__(None, None, None)  # gives up waiting for the job
        # the caller still waiting is told the store is closing, not left hanging
        assert len(outcomes) == 1
        with pytest.raises(OSError):
            os.fstat(fd)  # closed: the thread no longer writes to it
        assert _alive(idents[0])
    finally:
        gate.set()
    await _until(lambda: not _alive(idents[0]))  # it stops when its job returns


async def test_a_caller_already_cancelled_hands_no_job_in_and_leaves_the_thread_free() -> None:
    """(to_thread checked for cancellation before starting the job; the thread ran it anyway and
    told the caller it was cancelled: the job's effects without its caller.)"""
    ran: list[int] = []
    async with StoreThread() as thread:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await thread.run(ran.append, 1)
        assert scope.cancelled_caught
        assert ran == []
        assert not thread.in_use
        with anyio.fail_after(GUARD_S):
            await thread.run(ran.append, 2)
        assert ran == [2]


async def test_on_abandon_is_called_only_for_the_callers_own_running_job() -> None:
    """A caller cancelled while it waits behind another job has nothing in the thread: its
    ``on_abandon`` (the SQLite store interrupts the connection) must not hit that job."""
    release = threading.Event()
    started = threading.Event()
    calls: list[str] = []

    def blocking() -> str:
        started.set()
        release.wait(GUARD_S)
        return "first"

    async with StoreThread() as thread, anyio.create_task_group() as tg:
        results: list[str] = []

        async def first() -> None:
            results.append(await thread.run(blocking))

        tg.start_soon(first)
        with anyio.fail_after(GUARD_S):
            await anyio.to_thread.run_sync(started.wait)
        with anyio.CancelScope() as waiter:
            tg.start_soon(_cancel_soon, waiter, thread)
            await thread.run(calls.append, "queued", on_abandon=lambda: calls.append("abandon"))
        assert waiter.cancelled_caught and calls == []
        release.set()
        await _until(lambda: results == ["first"])
        # the caller's own running job, abandoned: on_abandon is called
        started.clear()
        release.clear()
        with anyio.CancelScope() as own:
            tg.start_soon(_cancel_when_started, own, started)
            await thread.run(blocking, on_abandon=lambda: calls.append("own"))
        assert own.cancelled_caught and calls == ["own"]
        release.set()


async def _cancel_when_started(scope: anyio.CancelScope, started: threading.Event) -> None:
    with anyio.fail_after(GUARD_S):
        await anyio.to_thread.run_sync(started.wait)
    scope.cancel()


async def _cancel_soon(scope: anyio.CancelScope, thread: StoreThread) -> None:
    await _until(lambda: thread.waiting == 1)
    scope.cancel()


class _CountingGo:
    """The thread's ``_go`` lock, recording at each hand-in (``release`` on the loop) how many
    tasks wait for a descriptor to be readable (trio's public I/O statistics)."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.waiting_at_hand_in: list[int] = []

    def acquire(self, *args: Any) -> bool:
        return bool(self._lock.acquire(*args))

    def release(self) -> None:
        stats = trio.lowlevel.current_statistics().io_statistics
        self.waiting_at_hand_in.append(stats.tasks_waiting_read)  # type: ignore[attr-defined]
        self._lock.release()


async def test_a_job_is_handed_in_once_the_wait_for_its_end_is_registered() -> None:
    # Before: the job went to the thread first and the wait was registered after it; the thread,
    # woken, took the GIL at the registration's epoll_ctl and the loop waited for it to come back
    # (issue 18, part 8). Now the wait (on the thread's descriptor) is registered first.
    async with StoreThread() as thread:
        assert await thread.run(int, "1") == 1  # (the thread is running)
        go = _CountingGo(thread._go)
        thread._go = go  # type: ignore[assignment]
        before = trio.lowlevel.current_statistics().io_statistics.tasks_waiting_read  # type: ignore[attr-defined]
        for i in range(5):
            assert await thread.run(str, i) == str(i)
        with pytest.raises(ValueError):
            await thread.run(int, "x")
        thread._go = go._lock  # (closing releases it once more, outside any task's wait)

    assert go.waiting_at_hand_in == [before + 1] * 6
