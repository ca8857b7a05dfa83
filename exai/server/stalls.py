"""Event-loop stall detection: find the task that blocked trio's scheduler.

A *stall* is one task step — the code a task runs between two checkpoints — that takes longer
than a threshold. While it runs nothing else on the loop runs: no frame is read, no deadline
fires, no cancel is seen. That is the audit's finding #4 (``time.sleep``, file I/O or sync HTTP
inside async code), and this instrument is how the tests prove exai does not do it.

What is measured, with :func:`time.perf_counter` (the one legitimate wall clock in exai: it
measures the loop itself, which the loop's own clock cannot do, and trio's ``MockClock`` would
hide exactly the time we want to see):

* each task step, from trio's ``before_task_step`` to ``after_task_step`` hook. A step longer
  than ``threshold_s`` is recorded in :attr:`StallDetector.stalls` as ``(duration_s, task
  name)`` and reported to ``on_stall``; :attr:`StallDetector.max_stall_s` is the longest step
  seen, over the threshold or not.
* each scheduler batch, from ``after_io_wait`` (the loop wakes up) to the next
  ``before_io_wait`` (it goes back to check for I/O): :attr:`StallDetector.max_batch_s`. A long
  batch made of many short steps is load, not a bug; it is kept as a figure, not as a stall.

A busy machine is not a blocking call. When the operating system takes the CPU away from the
loop's thread in the middle of a step (another process needs it), the step's wall time grows
although the code blocked nothing. With ``exclude_descheduled=True`` (what the test fixture uses)
the detector reads the thread's run-queue delay from ``/proc/thread-self/schedstat`` (Linux; the
second field: nanoseconds spent runnable but waiting for a CPU) before and after each step and
subtracts it, so what remains is the time the step ran or blocked in a system call — exactly what
``time.sleep``, file I/O or a CPU-heavy loop cost — while a step merely descheduled by a loaded
machine is not a stall. Where the file does not exist the wall time is used unchanged.

Use :func:`stall_detector` inside a trio run, or the ``stall_detector`` pytest fixture in
``tests/stall_plugin.py``.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator

import trio

__all__ = ["StallDetector", "stall_detector"]

#: How many stalls :attr:`StallDetector.stalls` keeps (the most recent ones).
MAX_KEPT_STALLS = 100

_SCHEDSTAT = "/proc/thread-self/schedstat"


def _open_schedstat() -> int | None:
    """A descriptor on the calling thread's schedstat, or ``None`` where there is none."""
    try:
        fd = os.open(_SCHEDSTAT, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        _run_delay_ns(fd)
    except (OSError, ValueError, IndexError):
        os.close(fd)
        return None
    return fd


def _run_delay_ns(fd: int) -> int:
    """Nanoseconds this thread has spent runnable but not running (its run-queue delay)."""
    return int(os.pread(fd, 128, 0).split()[1])


class StallDetector(trio.abc.Instrument):
    """A trio instrument that records task steps longer than ``threshold_s``.

    Args:
        threshold_s: a step longer than this is a stall.
        on_stall: called as ``on_stall(duration_s, task_name)`` for each stall, from inside the
            trio run right after the step. It must be quick and must not raise: trio removes an
            instrument whose hook raises.
        exclude_gc: subtract garbage-collection pauses from each step.
        exclude_descheduled: subtract the time the operating system kept the thread off the CPU
            (run-queue delay, Linux only) from each step; costs two small reads per step.

    Attributes:
        max_stall_s: the longest single task step seen since the last :meth:`reset`.
        max_batch_s: the longest scheduler batch (loop awake without checking for I/O).
        stall_count: stalls seen since the last reset, including ones no longer kept.
        steps: task steps measured since the last reset.
    """

    def __init__(
        self,
        threshold_s: float = 0.05,
        on_stall: Callable[[float, str], None] | None = None,
        *,
        exclude_gc: bool = False,
        exclude_descheduled: bool = False,
    ) -> None:
        self.threshold_s = threshold_s
        self.on_stall = on_stall
        #: subtract garbage-collection pauses from each step: tests use it to find blocking
        #: calls in code, while the daemon's own figure keeps GC (it does block the loop)
        self.exclude_gc = exclude_gc
        self._gc_started: float | None = None
        self._gc_in_step = 0.0
        #: descriptor on the loop thread's schedstat (set by :func:`stall_detector`)
        self._schedstat: int | None = None
        self._delay_at_start = 0
        #: wall time removed from steps because the thread was descheduled, in seconds
        self.descheduled_s = 0.0
        self._stalls: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=MAX_KEPT_STALLS
        )
        self._step_started: float | None = None
        self._batch_started: float | None = None
        self.max_stall_s = 0.0
        self.max_batch_s = 0.0
        self.stall_count = 0
        self.steps = 0

    @property
    def stalls(self) -> list[tuple[float, str]]:
        """``(duration_s, task name)`` of the most recent stalls, oldest first (at most 100)."""
        return list(self._stalls)

    def reset(self) -> None:
        """Forget everything measured so far (a step in progress is still measured)."""
        self._stalls.clear()
        self.max_stall_s = 0.0
        self.max_batch_s = 0.0
        self.stall_count = 0
        self.steps = 0

    # trio.abc.Instrument hooks -------------------------------------------------------------

    def _gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self._gc_in_step += time.perf_counter() - self._gc_started
            self._gc_started = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._gc_in_step = 0.0
        if self._schedstat is not None:
            self._delay_at_start = _run_delay_ns(self._schedstat)
        self._step_started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        started = self._step_started
        if started is None:
            return
        self._step_started = None
        duration = time.perf_counter() - started
        if self.exclude_gc:
            duration -= self._gc_in_step
        if self._schedstat is not None:
            off_cpu = (_run_delay_ns(self._schedstat) - self._delay_at_start) / 1e9
            if off_cpu > 0:
                self.descheduled_s += off_cpu
                duration -= off_cpu
        self.steps += 1
        if duration > self.max_stall_s:
            self.max_stall_s = duration
        if duration > self.threshold_s:
            self.stall_count += 1
            self._stalls.append((duration, task.name))
            if self.on_stall is not None:
                self.on_stall(duration, task.name)

    def after_io_wait(self, timeout: float) -> None:
        self._batch_started = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        started = self._batch_started
        if started is None:
            return
        self._batch_started = None
        duration = time.perf_counter() - started
        if duration > self.max_batch_s:
            self.max_batch_s = duration

    def __repr__(self) -> str:
        return (
            f"<StallDetector threshold_s={self.threshold_s} stalls={self.stall_count} "
            f"max_stall_s={self.max_stall_s:.4f} max_batch_s={self.max_batch_s:.4f}>"
        )


@contextlib.contextmanager
def stall_detector(
    threshold_s: float = 0.05,
    on_stall: Callable[[float, str], None] | None = None,
    *,
    exclude_gc: bool = False,
    exclude_descheduled: bool = False,
) -> Iterator[StallDetector]:
    """Install a :class:`StallDetector` in the current trio run for the ``with`` block.

    Must be entered inside a trio run, on the loop's thread (``trio.lowlevel.add_instrument``
    needs one; the run-queue delay is read for the thread that enters). The instrument is removed
    on exit, also when the block raises.
    """
    detector = StallDetector(
        threshold_s, on_stall, exclude_gc=exclude_gc, exclude_descheduled=exclude_descheduled
    )
    if exclude_descheduled:
        detector._schedstat = _open_schedstat()
    trio.lowlevel.add_instrument(detector)
    if exclude_gc:
        gc.callbacks.append(detector._gc_callback)
    try:
        yield detector
    finally:
        if exclude_gc:
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(detector._gc_callback)
        with contextlib.suppress(KeyError):
            # Already gone if one of its hooks raised (trio drops such an instrument).
            trio.lowlevel.remove_instrument(detector)
        if detector._schedstat is not None:
            fd, detector._schedstat = detector._schedstat, None
            os.close(fd)
