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
machine is not a stall. The step's start on the clock and the delay are read as one instant (a
pair further apart than ``SAME_INSTANT_S`` is read again, as the probe does), and so are its end
and the delay then: the loop's thread can give up the GIL between the two reads and wait for a
CPU, which read the other way round counted as the step's own time at its start, and was
subtracted from a wall time it is not in at its end (a block measured short). Where the file
does not exist the wall time is used unchanged.

The loop's thread can also wait, asleep, for *another* thread of the process that is waiting for
a CPU: ``threading.Thread.start`` (trio's ``to_thread`` starting a worker when its cache has none
idle) sleeps until the new thread has run, and CPython's GIL hand-off (every 5 ms when another
thread asks for it) sleeps until that thread has taken the GIL. On a loaded machine that thread
waits in the run queue, and the loop thread's own run-queue delay does not show it: seen in
``make test`` on a shared 2-core VM as 100–120 ms "stalls" of steps that used under 1 ms of CPU
while a worker thread was being started. So a step over the threshold is looked at once more: the
run-queue delay the process's *other* threads accumulated meanwhile is subtracted as well, down to
no less than the CPU time the step itself used (a CPU-heavy step stays a stall, whoever else
waited). The other threads are read from ``/proc/self/task`` only then, against a snapshot taken
at most ``OTHERS_SNAPSHOT_EVERY_S`` before the step began — so at most that much of their delay
before the step is also subtracted; per step the cost is one read of the thread's CPU clock.

Use :func:`stall_detector` inside a trio run, or the ``stall_detector`` pytest fixture in
``tests/stall_plugin.py``.

The daemon's own detector: :class:`LoopProbe` (:func:`loop_probe`)
--------------------------------------------------------------------
An instrument's two hooks run around *every* task step — on a busy daemon tens of thousands of
times a second, 3–5 % of the loop thread (issue 18's profiles). The daemon instead runs a probe:
one task that waits ``interval_s`` (10 ms) again and again and measures how late it wakes.
Nothing runs on the loop while a step blocks it, so a step that blocks for ``B`` seconds makes
the probe's next wake-up at least ``B`` after its previous one: its lateness (the gap minus the
interval) is at least ``B - interval_s``, and no step longer than ``threshold_s + interval_s``
goes unseen. The run-queue delay of the loop's thread over the same gap is subtracted (as with
``exclude_descheduled``), so a loaded machine is not a stall; and, for a wake-up late by more
than the threshold, the run-queue delay of the process's other threads too, down to no less
than the CPU time the loop thread used in the gap (as for a step, above: the loop asleep
waiting for the GIL of a thread the machine keeps off the CPU; a full slow_upstream run logged
82.5 ms with the store thread, the mock and the load process sharing two CPUs). Their delays
are read every ``OTHERS_SNAPSHOT_EVERY_S`` from descriptors kept open (a ``pread`` per thread;
an idle probe's CPU unchanged within noise: 16–20 ms/s with and without, on a slower VM). What
it also sees, and an instrument did not: a scheduler batch of many short steps that kept the
loop from its timers that long — which is loop latency all the same.

Which code stalled: a watchdog thread (:mod:`threading`, never on the loop) wakes every
``threshold_s / 2``; when the probe is overdue it reads the loop thread's stack
(:func:`sys._current_frames`) and takes the running trio task's name (the ``task`` local of
trio's scheduler frame) and the innermost frame. A stall inside C code that holds the GIL (a
garbage collection, a huge JSON parse) cannot be sampled while it lasts: then the name is the
first code seen after it, or ``"?"``. Cost, while the loop runs something: 100 wake-ups a
second of one task and about 20 of the thread — measured on the shared 2-vCPU benchmark VM at
5–12 ms of CPU per second (0.5–1.2 % of a core), against 3–5 % of the loop thread for the
instrument under load.

An idle loop costs the probe nothing (issue 18). After a wake-up that finds the loop thread
used under ``IDLE_CPU_SHARE`` (5 %) of the interval's CPU — read from the same schedstat as
the run-queue delay — the probe may go idle at that round's end (``before_io_wait``: nothing
more runs in it), if the round's tasks after the probe's step ran for less than the threshold
and the interval and no task is ready: its timer is disarmed and the watchdog sleeps until
woken. Nothing can block a loop that runs nothing; the start of the next round (whatever wakes
the loop: a socket, a timer) arms the timer again for an interval and is where the probe's
next gap begins — the clock and the run-queue delay are read in the hook — so a step that
blocks in that round is measured and named as any other. The two hooks (``_IdleWatch``) are
installed only from such a wake-up until the idle period ends: a busy loop runs none. An idle
``exai serve`` spent ≈ 26 ms of CPU and ≈ 119 wake-ups a second on the probe's 100 a second;
2.5 ms and 13–16 idle (``python -m benchmarks run idle``, load 5–12 on 2 cores).

How the probe waits (issue 18): under trio's own clock it arms a one-shot ``timerfd`` (Linux,
through :mod:`ctypes`, loaded with this module) for the interval and waits for it with
``wait_readable``, instead of ``trio.sleep`` — whose cancel scope, deadline and ``Cancelled``
exception per wake-up were most of an idle daemon's CPU — and it reads the run-queue delay once
per wake-up (the value read as it woke starts the next gap), not twice. An idle ``exai serve``,
three builds side by side, 5 × 30 s from ``/proc/<pid>/stat`` (load 2.7–5.4): 14.0–16.3 ms of
CPU per second before, 12.3–16.3 with the one read, 10.0–12.7 with the timerfd as well. Under
any other clock (a test's ``MockClock``) the probe sleeps on that clock with ``trio.sleep``, and
where there is no timerfd it does so too.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import ctypes
import gc
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

import trio

__all__ = ["LoopProbe", "StallDetector", "loop_probe", "stall_detector"]

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


def _on_cpu_and_run_delay_ns(fd: int) -> tuple[int, int]:
    """Nanoseconds this thread has spent on a CPU, and runnable but not running (one read)."""
    fields = os.pread(fd, 128, 0).split()
    return int(fields[0]), int(fields[1])


#: How far apart (seconds) a clock read and a schedstat read may be to count as one instant.
SAME_INSTANT_S = 0.0005


def _clock_and_schedstat(fd: int) -> tuple[float, int, int]:
    """``time.perf_counter()`` and this thread's (on-CPU ns, run-queue delay ns), read as one
    instant: run-queue delay between the two reads (the thread preempted, or made to give up
    the GIL between bytecodes and waiting to get it back) would count as off the CPU in a gap
    whose wall time it is not in — a stall measured short by all of it (seen: a 200 ms block
    measured 48 ms beside four threads wanting the GIL on a loaded machine). A pair of reads
    further apart than :data:`SAME_INSTANT_S` is taken again, up to three times."""
    perf = time.perf_counter
    for _ in range(3):
        now = perf()
        cpu, delay = _on_cpu_and_run_delay_ns(fd)
        if perf() - now < SAME_INSTANT_S:
            break
    return now, cpu, delay


#: How old the snapshot of the other threads' run-queue delays may be when a step begins.
OTHERS_SNAPSHOT_EVERY_S = 0.02


def _other_threads_run_delay_ns(own_tid: int) -> dict[int, int]:
    """``{thread id: run-queue delay in ns}`` of every thread of this process but ``own_tid``
    (threads that end while being read are left out; ``{}`` without ``/proc``)."""
    delays: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/task")
    except OSError:
        return delays
    for name in names:
        tid = int(name)
        if tid == own_tid:
            continue
        try:
            fd = os.open(f"/proc/self/task/{name}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            delays[tid] = _run_delay_ns(fd)
        except (OSError, ValueError, IndexError):
            pass
        finally:
            os.close(fd)
    return delays


class _OtherThreads:
    """The run-queue delays of the process's other threads, for :class:`LoopProbe`: each
    thread's ``schedstat`` is kept open and read with one ``pread``; the list of threads is
    read again at most every :data:`OTHERS_RELIST_EVERY_S` (and before every look at a stall),
    so a snapshot costs a read per thread rather than a directory listing and an open, a read
    and a close per thread."""

    def __init__(self, own_tid: int, skip: set[int]) -> None:
        self._own = own_tid
        #: threads never waited for (the probe's watchdog adds itself once it runs)
        self._skip = skip
        self._fds: dict[int, int] = {}
        self._listed_at = -math.inf

    def delays(self, now: float, *, relist: bool = False) -> dict[int, int]:
        """``{thread id: run-queue delay in ns}`` (``now``: ``time.perf_counter()``)."""
        if relist or now - self._listed_at >= OTHERS_RELIST_EVERY_S:
            self._listed_at = now
            self._relist()
        delays: dict[int, int] = {}
        for tid, fd in list(self._fds.items()):
            try:
                delays[tid] = _run_delay_ns(fd)
            except (OSError, ValueError, IndexError):  # (the thread ended)
                del self._fds[tid]
                os.close(fd)
        return delays

    def _relist(self) -> None:
        try:
            tids = {int(name) for name in os.listdir("/proc/self/task")}
        except OSError:
            tids = set()
        tids.discard(self._own)
        tids -= self._skip
        for tid in self._fds.keys() - tids:
            os.close(self._fds.pop(tid))
        for tid in tids - self._fds.keys():
            try:
                self._fds[tid] = os.open(
                    f"/proc/self/task/{tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC
                )
            except OSError:
                continue

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


#: How often :class:`LoopProbe` looks for threads begun or ended since.
OTHERS_RELIST_EVERY_S = 1.0


def _load_timerfd() -> tuple[Callable[..., int], Callable[..., int]] | None:
    """libc's ``timerfd_create`` and ``timerfd_settime`` (Linux), or ``None``. Loaded with the
    module, never on the loop."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    create.restype = ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


_TIMERFD = _load_timerfd()
_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Timer:
    """A one-shot ``timerfd`` the probe waits on (see :class:`LoopProbe`): armed for the
    interval, then waited for with ``wait_readable``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._spec = _Itimerspec()
        self._ref = ctypes.byref(self._spec)

    @classmethod
    def open(cls) -> _Timer | None:
        """A new timer, or ``None`` where there is no timerfd."""
        if _TIMERFD is None:
            return None
        fd = _TIMERFD[0](_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        return cls(fd) if fd >= 0 else None

    def arm(self, seconds: float) -> bool:
        """Arm the timer to expire in ``seconds`` (at least one nanosecond: a zero
        ``it_value`` disarms it); whether it could be."""
        ns = max(int(seconds * 1e9), 1)
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
        return _TIMERFD[1](self.fd, 0, self._ref, None) == 0  # type: ignore[index]

    def disarm(self) -> None:
        """Stop the timer; an expiry not yet read is dropped with it (the kernel resets the
        count), so a waiter waits until it is armed again."""
        value = self._spec.it_value
        value.tv_sec = value.tv_nsec = 0
        _TIMERFD[1](self.fd, 0, self._ref, None)  # type: ignore[index]

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (or, if :meth:`disarm` is called meanwhile, until it is armed
        again and expires)."""
        if not self.arm(seconds):
            await trio.sleep(seconds)  # (cannot happen with a valid fd; the usual way then)
            return
        await trio.lowlevel.wait_readable(self.fd)
        try:
            os.read(self.fd, 8)  # (the expiry count: reading it makes the fd not readable)
        except BlockingIOError:
            pass
        # a wake-up that comes with a cancellation counts as none (trio.sleep raises then):
        # a probe whose block has ended measures nothing more
        await trio.lowlevel.checkpoint_if_cancelled()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


def _system_clock() -> bool:
    """Whether this trio run keeps trio's own clock: under another one (a test's
    ``MockClock``) the probe sleeps on it, with ``trio.sleep``."""
    clock = trio.lowlevel.current_clock()
    kind = type(clock)
    return kind.__name__ == "SystemClock" and kind.__module__.startswith("trio.")


class StallDetector(trio.abc.Instrument):
    """A trio instrument that records task steps longer than ``threshold_s``.

    Args:
        threshold_s: a step longer than this is a stall.
        on_stall: called as ``on_stall(duration_s, task_name)`` for each stall, from inside the
            trio run right after the step. It must be quick and must not raise: trio removes an
            instrument whose hook raises.
        exclude_gc: subtract garbage-collection pauses from each step.
        exclude_descheduled: subtract the time the operating system kept the thread off the CPU
            (run-queue delay, Linux only) from each step; costs two small reads per step. A step
            still over the threshold then also has the other threads' run-queue delay over it
            subtracted (down to the CPU time it used; see the module docstring).
        exclude_others: with ``exclude_descheduled``, whether that second look is taken
            (``False`` keeps only the loop thread's own delay: what a test compares against).

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
        exclude_others: bool = True,
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
        #: the other threads' run-queue delays and when they were read (see the module docstring)
        self.exclude_others = exclude_others
        self._tid = threading.get_native_id()
        self._others: dict[int, int] = {}
        self._others_read_at = float("-inf")
        self._cpu_at_start = 0.0
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
        fd = self._schedstat
        if fd is None:
            self._step_started = time.perf_counter()
            return
        if self.exclude_others:
            now = time.perf_counter()
            if now - self._others_read_at > OTHERS_SNAPSHOT_EVERY_S:
                self._others = _other_threads_run_delay_ns(self._tid)
                self._others_read_at = now
        # the step's start and the run-queue delay then, read as one instant (as the probe
        # does): the clock was read first and the delay after it, and between the two the
        # loop's thread can give up the GIL at a bytecode boundary (another thread asked for
        # it: a worker starting, a to_thread hand-off) and, woken, wait for a CPU — delay
        # that then counted as the step's own time, since the delay read at its start
        # already held it (a checkpoint read as a 100+ ms stall on a loaded machine)
        now, _, self._delay_at_start = _clock_and_schedstat(fd)
        if self.exclude_others:
            self._cpu_at_start = time.thread_time()
        self._step_started = now

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        started = self._step_started
        if started is None:
            return
        self._step_started = None
        fd = self._schedstat
        if fd is None:
            end = time.perf_counter()
        else:
            # the step's end and the run-queue delay then, read as one instant, as at its
            # start: the clock was read first and the delay after it, and a wait for a CPU
            # between the two was subtracted from a wall time it is not in — a blocking step
            # measured short by all of it (a 0.2 s sleep read as 0.187 s on a loaded machine)
            end, _, delay_at_end = _clock_and_schedstat(fd)
        duration = end - started
        if self.exclude_gc:
            duration -= self._gc_in_step
            gc_started = self._gc_started
            if gc_started is not None:
                # a collection still running: another thread's, whose "stop" callback has not
                # run yet — it gives up the GIL at that callback's first bytecode, and this
                # thread, which waited for it (from the read above: a syscall lets go of the
                # GIL), measures its step first. A worker thread's gc.collect() read as a
                # stall of 0.1-0.9 s of the step that had started it.
                duration -= end - max(started, gc_started)
        if fd is not None:
            off_cpu = (delay_at_end - self._delay_at_start) / 1e9
            if off_cpu > 0:
                self.descheduled_s += off_cpu
                duration -= off_cpu
            if duration > self.threshold_s and self.exclude_others:
                duration = self._less_others_delay(duration)
        self.steps += 1
        if duration > self.max_stall_s:
            self.max_stall_s = duration
        if duration > self.threshold_s:
            self.stall_count += 1
            self._stalls.append((duration, task.name))
            if self.on_stall is not None:
                self.on_stall(duration, task.name)

    def _less_others_delay(self, duration: float) -> float:
        """``duration`` less the run-queue delay the other threads accumulated since the
        snapshot, but never below the CPU time the step used."""
        ran = time.thread_time() - self._cpu_at_start
        before = self._others
        waited_ns = 0
        for tid, delay in _other_threads_run_delay_ns(self._tid).items():
            # a thread absent from the snapshot began since: all its delay is in the window
            waited_ns += max(0, delay - before.get(tid, 0))
        kept = max(ran, duration - waited_ns / 1e9)
        if kept < duration:
            self.descheduled_s += duration - kept
            return kept
        return duration

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
    exclude_others: bool = True,
) -> Iterator[StallDetector]:
    """Install a :class:`StallDetector` in the current trio run for the ``with`` block.

    Must be entered inside a trio run, on the loop's thread (``trio.lowlevel.add_instrument``
    needs one; the run-queue delay is read for the thread that enters). The instrument is removed
    on exit, also when the block raises.
    """
    detector = StallDetector(
        threshold_s,
        on_stall,
        exclude_gc=exclude_gc,
        exclude_descheduled=exclude_descheduled,
        exclude_others=exclude_others,
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


#: A wake-up after an interval in which the loop thread used less of a CPU than this share of the
#: interval lets the probe go idle (the probe's own wake-up uses ≈ 1 %)
IDLE_CPU_SHARE = 0.05


class _IdleWatch(trio.abc.Instrument):
    """A :class:`LoopProbe`'s way to go idle (trio's timerfd path only), installed only from
    a wake-up that found the loop (nearly) idle until the end of the idle period it begins, so
    a busy loop runs no hook of it.

    ``before_io_wait`` (the round's end: nothing more runs in it) lets the probe go idle if
    the round's tasks after the probe's step ran for less than the threshold and the interval
    (else its armed timer reports them: nothing is hidden) and no task is ready; its timer is
    disarmed. ``after_io_wait`` (the start of the next round, before its tasks run: whatever
    woke the loop) arms it again for an interval and begins the probe's next gap there. The
    instrument removes itself at whichever comes first of "not idle after all" and "idle
    ended". Its hooks never raise (trio would drop the instrument)."""

    def __init__(
        self,
        probe: LoopProbe,
        timer: _Timer,
        remove: Callable[[trio.abc.Instrument], None] = trio.lowlevel.remove_instrument,
    ) -> None:
        #: until when (``time.perf_counter()``) the round's end may still idle the probe
        self.idle_by = 0.0
        self.idle = False
        self._probe = probe
        self._timer = timer
        self._remove = remove

    def before_io_wait(self, timeout: float) -> None:
        if self.idle:
            return
        # (timeout 0: more tasks to run at once — the loop is not idle)
        if timeout > 0 and time.perf_counter() < self.idle_by:
            self._timer.disarm()
            self.idle = True
            self._probe._went_idle()
        else:
            self._leave()

    def after_io_wait(self, timeout: float) -> None:
        if self.idle:
            self.idle = False
            self._leave()
            self._probe._left_idle(self._timer)

    def _leave(self) -> None:
        with contextlib.suppress(KeyError):
            self._remove(self)


class LoopProbe:
    """The daemon's sampled stall detector (see the module docstring): a probe task instead of
    per-step hooks.

    Args:
        threshold_s: a probe wake-up later than this (less the run-queue delay) is a stall.
        on_stall: called as ``on_stall(duration_s, where)`` for each stall, on the loop.
        interval_s: how often the probe wakes while the loop runs something.
        exclude_descheduled: subtract the loop thread's run-queue delay (Linux).
        exclude_others: with ``exclude_descheduled``, a wake-up late by more than the threshold
            is looked at once more: the run-queue delay the process's other threads
            accumulated meanwhile is subtracted too, down to no less than the CPU time the
            loop thread used in the gap — as :class:`StallDetector` does for a step (the
            loop waiting asleep for the GIL held by a thread the machine keeps off the CPU is
            the machine's load, not a blocking call). Their delays are read at most every
            ``OTHERS_SNAPSHOT_EVERY_S``, so up to that much from before the gap counts too.

    Attributes:
        max_stall_s: the latest wake-up seen (less run-queue delay), over the threshold or not.
        stall_count: stalls seen since the last reset.
        probes: wake-ups measured.
        idled: times the probe went idle (the loop ran nothing else for a whole interval):
            each idle period ends with a wake-up measured from the start of the round that
            ended it, without a timer.
        descheduled_s: run-queue delay subtracted, in seconds.
    """

    def __init__(
        self,
        threshold_s: float = 0.05,
        on_stall: Callable[[float, str], None] | None = None,
        *,
        interval_s: float = 0.01,
        exclude_descheduled: bool = True,
        exclude_others: bool = True,
    ) -> None:
        self.threshold_s = threshold_s
        self.on_stall = on_stall
        self.interval_s = interval_s
        self.exclude_descheduled = exclude_descheduled
        self.exclude_others = exclude_others
        self._stalls: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=MAX_KEPT_STALLS
        )
        self.max_stall_s = 0.0
        self.stall_count = 0
        self.probes = 0
        self.idled = 0
        self.descheduled_s = 0.0
        #: ``time.perf_counter()`` when the probe is due to wake (read by the watchdog; ``inf``
        #: while it is idle)
        self._due_at = time.perf_counter() + interval_s
        #: set when the probe leaves idle, or stops (the watchdog waits on it while idle)
        self._awake = threading.Event()
        #: the clock and schedstat reads at the start of the round that ended an idle period
        self._resumed: tuple[float, int, int] | None = None
        self._fd: int | None = None
        self._others: _OtherThreads | None = None
        self._snapshot: dict[int, int] = {}
        self._snapshot_at = 0.0
        #: what the watchdog saw the loop thread running while the probe was overdue
        self._where: str | None = None
        self._loop_thread = 0
        self._stop = threading.Event()
        #: threads the loop never waits for: the watchdog (it only reads the loop's stack), so
        #: its own run-queue delay never excuses a late wake-up
        self._not_waited_for: set[int] = set()

    @property
    def stalls(self) -> list[tuple[float, str]]:
        """``(duration_s, where)`` of the most recent stalls, oldest first (at most 100)."""
        return list(self._stalls)

    def reset(self) -> None:
        self._stalls.clear()
        self.max_stall_s = 0.0
        self.stall_count = 0
        self.probes = 0

    async def run(self) -> None:
        """Probe until cancelled (run it for the whole life of what it watches)."""
        fd = _open_schedstat() if self.exclude_descheduled else None
        self._fd = fd
        self._loop_thread = threading.get_ident()
        self._stop.clear()
        self._awake.clear()
        # ``threading.Thread.start`` waits until the new thread has run; on a loaded machine
        # the OS may not schedule it for hundreds of milliseconds, and that wait would block
        # the loop (a stall of the probe's own making). ``_thread.start_new_thread`` only
        # creates the thread; the watchdog begins whenever it is scheduled (daemon-like: never
        # joined, it ends when ``_stop`` is set).
        _thread.start_new_thread(self._watch, ())
        perf = time.perf_counter
        interval = self.interval_s
        timer = _Timer.open() if _system_clock() else None
        sleep = timer.sleep if timer is not None else trio.sleep
        others = (
            _OtherThreads(threading.get_native_id(), self._not_waited_for)
            if fd is not None and self.exclude_others
            else None
        )
        self._others = others
        # an idle loop idles the probe (its timer disarmed): on trio's own clock only — under
        # another (a test's MockClock) the probe sleeps on that clock as always — and where the
        # loop thread's CPU time is read
        watch = _IdleWatch(self, timer) if timer is not None and fd is not None else None
        idle_within = min(interval, self.threshold_s)
        idle_cpu_s = interval * IDLE_CPU_SHARE
        try:
            # (the run-queue delay is read once per wake-up: what was read as the probe woke is
            # where the next gap starts, as is the wall time read then)
            if fd is not None:
                started, cpu0, delay0 = _clock_and_schedstat(fd)
            else:
                started, cpu0, delay0 = perf(), 0, 0
            self._due_at = started + interval
            self._snapshot_at = started
            self._snapshot = others.delays(started) if others is not None else {}
            while True:
                await sleep(interval)
                if fd is not None:
                    woke, cpu, delay = _clock_and_schedstat(fd)
                else:
                    woke = perf()
                resumed = self._resumed
                if resumed is not None:
                    # the probe was idle: its gap began with the round that ended that
                    # (``_left_idle``), where the timer was armed again
                    self._resumed = None
                    started, cpu0, delay0 = resumed
                    if cpu0 < 0 and fd is not None:  # (no run-queue delay read then)
                        cpu0, delay0 = cpu, delay
                late = woke - started - interval
                ran = 0.0
                if fd is not None:
                    off_cpu = (delay - delay0) / 1e9
                    ran = (cpu - cpu0) / 1e9
                    cpu0, delay0 = cpu, delay
                    if off_cpu > 0:
                        self.descheduled_s += off_cpu
                        late -= off_cpu
                    if others is not None:
                        if late > self.threshold_s:
                            now = others.delays(woke, relist=True)
                            late = self._less_others_delay(late, ran, self._snapshot, now)
                            self._snapshot, self._snapshot_at = now, woke
                        elif woke - self._snapshot_at >= OTHERS_SNAPSHOT_EVERY_S:
                            self._snapshot, self._snapshot_at = others.delays(woke), woke
                self.probes += 1
                if late > self.max_stall_s:
                    self.max_stall_s = late
                if late > self.threshold_s:
                    where = self._where or "?"
                    self.stall_count += 1
                    self._stalls.append((late, where))
                    if self.on_stall is not None:
                        self.on_stall(late, where)
                self._where = None
                started = woke
                self._due_at = woke + interval
                if watch is not None and ran < idle_cpu_s:
                    # the loop thread hardly ran since the last wake-up: the probe may go idle
                    # at this round's end (``_IdleWatch``)
                    watch.idle_by = woke + idle_within
                    trio.lowlevel.add_instrument(watch)
        finally:
            if watch is not None:
                watch._leave()
            self._stop.set()
            self._awake.set()
            self._others = None
            if others is not None:
                others.close()
            self._fd = None
            if fd is not None:
                os.close(fd)
            if timer is not None:
                timer.close()

    def _went_idle(self) -> None:
        """The probe's timer was disarmed at the end of a round (``_IdleWatch``, on the loop):
        nothing is due until the loop wakes up."""
        self.idled += 1
        self._due_at = math.inf

    def _left_idle(self, timer: _Timer) -> None:
        """The start of the first round after the probe went idle (``_IdleWatch``, on the loop
        thread): arm the timer for an interval and note where the probe's gap begins — the
        clock, the run-queue delay, and the other threads' delays if their snapshot is old —
        then wake the watchdog. Never raises (trio would drop the instrument)."""
        try:
            fd = self._fd
            if fd is not None:
                now, cpu, delay = _clock_and_schedstat(fd)
            else:
                now, cpu, delay = time.perf_counter(), 0, 0
            others = self._others
            if others is not None and now - self._snapshot_at >= OTHERS_SNAPSHOT_EVERY_S:
                self._snapshot, self._snapshot_at = others.delays(now), now
            self._resumed = (now, cpu, delay)
        except Exception:  # (a /proc read failed: this gap by the wall clock alone)
            now = time.perf_counter()
            self._resumed = (now, -1, -1)
        self._due_at = now + self.interval_s
        timer.arm(self.interval_s)
        self._awake.set()

    def _less_others_delay(
        self, late: float, ran: float, snapshot: dict[int, int], now: dict[int, int]
    ) -> float:
        """``late`` less the run-queue delay the other threads accumulated from ``snapshot``
        to ``now``, but never below the CPU time the loop thread used in the gap (``ran``)."""
        waited_ns = 0
        for other, delay in now.items():
            # a thread absent from the snapshot began since: all its delay is in the window
            waited_ns += max(0, delay - snapshot.get(other, 0))
        kept = max(min(late, ran), late - waited_ns / 1e9)
        if kept < late:
            self.descheduled_s += late - kept
        return kept

    def _watch(self) -> None:
        """The watchdog thread: name what the loop thread runs while the probe is overdue."""
        self._not_waited_for.add(threading.get_native_id())
        threshold = self.threshold_s
        while True:
            self._awake.clear()
            due_at = self._due_at
            if due_at == math.inf:
                # the probe is idle: nothing is due until the loop wakes it (and sets
                # ``_awake``); the watchdog sleeps as long
                self._awake.wait()
                if self._stop.is_set():
                    return
                continue
            wait = due_at + threshold - time.perf_counter()
            if wait > 0:
                # the probe is not overdue yet: sleep until it would be
                if self._stop.wait(wait):
                    return
                continue
            if self._where is None:
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None and self._due_at == due_at:
                    self._where = _describe(frame)
            if self._stop.wait(threshold / 2):
                return

    def __repr__(self) -> str:
        return (
            f"<LoopProbe threshold_s={self.threshold_s} stalls={self.stall_count} "
            f"max_stall_s={self.max_stall_s:.4f}>"
        )


def _describe(frame: FrameType) -> str:
    """``task name (innermost function file:line)`` of a stack of the loop thread."""
    innermost = frame
    task_name = None
    f: FrameType | None = frame
    while f is not None:
        if f.f_code.co_name == "unrolled_run" and "trio" in f.f_code.co_filename:
            task = f.f_locals.get("task")
            task_name = getattr(task, "name", None)
            break
        f = f.f_back
    code = innermost.f_code
    here = f"{code.co_name} {os.path.basename(code.co_filename)}:{innermost.f_lineno}"
    return f"{task_name} ({here})" if task_name else f"? ({here})"


@contextlib.contextmanager
def loop_probe(
    threshold_s: float = 0.05,
    on_stall: Callable[[float, str], None] | None = None,
    *,
    interval_s: float = 0.01,
    exclude_others: bool = True,
) -> Iterator[LoopProbe]:
    """Run a :class:`LoopProbe` in the current trio run for the ``with`` block (a system task,
    so it is no child of the caller's nurseries; stopped on exit)."""
    probe = LoopProbe(threshold_s, on_stall, interval_s=interval_s, exclude_others=exclude_others)
    scope = trio.CancelScope()

    async def probing() -> None:
        with scope:
            try:
                await probe.run()
            except Exception as exc:  # a system task must not raise: stop measuring instead
                probe._where = f"probe failed: {type(exc).__name__}"

    trio.lowlevel.spawn_system_task(probing, name="exai.loop_probe")
    try:
        yield probe
    finally:
        scope.cancel()
