"""One long-lived worker thread for a store's blocking calls, answering through a file
descriptor: :class:`StoreThread`.

The SQLite store used :func:`anyio.to_thread.run_sync` under a limiter of one for every call.
Each such hand-off costs the event loop more than the work it hands off when that work is one
small transaction: the limiter's checkpoints, a context copy, trio's thread cache (which
renames the OS thread before and after every job), the result carried back by
``run_sync_soon`` — a byte to trio's wake-up socket, a system task that runs the callback, and
then one more scheduler pass for the waiting task. Measured on the 2 vCPU benchmark VM (one job
at a time, each blocking 1.5 ms the way an ``fsync`` does; the process's CPU time per job):
175–180 µs through ``to_thread``, 55–80 µs through this class; a lone SQLite ``append_turns``
went from 500–600 to 390–450 µs. A chat call at concurrency 1 makes one such hand-off; nothing
can share it.

How: one thread (started with ``_thread.start_new_thread``: ``threading.Thread.start`` waits
until the OS has run the new thread, which on a loaded machine blocks the loop) takes one job
at a time from a slot, woken by a lock; when the job is done it writes to an ``eventfd`` (a
socket pair where there is none), and the task that handed the job in waits for that
descriptor to be readable — the task itself is woken by the loop's I/O poll, nothing in
between. Under trio that wait is registered before the job is handed in (``_hand_in``): the
thread, woken, needs the GIL at once, and a registration after the hand-off let the GIL go in
its ``epoll_ctl`` to the thread, which the loop then waited for.

**One job at a time, first come first served.** :meth:`StoreThread.run` holds the thread from
before its job is handed in until its result is taken; other callers queue (FIFO) — the same
guarantee the limiter of one gave: the store's connection is never used by two jobs at once.
:meth:`StoreThread.hold` holds it without a job (tests; the SQLite writer waits for it to be
free this way).

**A caller may leave.** When the caller of :meth:`run` is cancelled while its job runs (its
deadline passed: a hung disk), it leaves at once and the job keeps running (what
``abandon_on_cancel`` did); the thread stays busy until the job really ends, and the next holder
first waits for that (within its own deadline) before its job is handed in.

Resource handling:
    The thread and its descriptor live between ``__aenter__`` and ``__aexit__``. Leaving waits,
    up to ``close_timeout_s``, for the thread to be free and then stops it; a thread still stuck
    in a job after that (a dead disk) is left to end by itself: it stops and closes the
    descriptor when its job returns. The thread never keeps the process alive.

Error handling:
    A job's exception is raised to its caller unchanged (the store maps it).
    :class:`~exai.errors.StoreUnavailableError` to a caller when the thread is not running
    (before ``__aenter__``, after ``__aexit__``, or closed while the caller waited).
"""

from __future__ import annotations

import _thread
import os
import socket
import threading
import types
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel
import sniffio
import trio

from exai.errors import StoreUnavailableError
from exai.resilience import loop as aio

__all__ = ["StoreThread"]

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: T | None = None
        self.error: BaseException | None = None
        #: set by the thread once ``result`` or ``error`` is
        self.done = False


class _Wakeup:
    """The descriptor the thread makes readable after each job: an eventfd (Linux), else the
    read end of a socket pair."""

    def __init__(self) -> None:
        self._sock: tuple[socket.socket, socket.socket] | None = None
        if hasattr(os, "eventfd"):
            self.fd: Any = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._sock = (r, w)
            self.fd = r

    def signal(self) -> None:
        """(Thread.) Make the descriptor readable."""
        if self._sock is None:
            os.eventfd_write(self.fd, 1)
        else:  # pragma: no cover - not Linux
            try:
                self._sock[1].send(b"\0")
            except BlockingIOError:
                pass  # full: already readable

    def drain(self) -> None:
        """(Loop.) Consume what was signalled, if anything."""
        try:
            if self._sock is None:
                os.eventfd_read(self.fd)
            else:  # pragma: no cover - not Linux
                self._sock[0].recv(4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._sock is None:
            os.close(self.fd)
        else:  # pragma: no cover - not Linux
            for s in self._sock:
                s.close()


@types.coroutine
def _wait_readable_then(fd: int, then: Callable[[], None]) -> Generator[Any, Any, None]:
    """(trio.) ``trio.lowlevel.wait_readable(fd)``, calling ``then()`` (which must not raise)
    once the wait is registered with the loop, just before the task is put aside.

    Drives trio's coroutine by hand: its first step registers the descriptor and yields trio's
    trap, which is passed on to the scheduler, and so is everything after it (what trio sends
    or throws in). ``then`` is not called when the registration raises."""
    # (awaited by hand below: every step of it goes to trio's scheduler)
    inner = trio.lowlevel.wait_readable(fd).__await__()  # noqa: ASYNC105
    try:
        trap = inner.send(None)  # registers; raises here (not registered) or yields the trap
    except StopIteration:  # pragma: no cover - trio's wait always suspends
        then()
        return
    then()
    while True:
        try:
            sent = yield trap
        except BaseException as exc:  # (thrown in by the scheduler)
            try:
                trap = inner.throw(exc)
            except StopIteration:
                return
        else:
            try:
                trap = inner.send(sent)
            except StopIteration:
                return


class StoreThread:
    """A worker thread that runs one blocking job at a time for the event loop.

    Args:
        close_timeout_s: how long ``__aexit__`` waits for a running job before leaving the
            thread to end by itself.
    """

    def __init__(self, *, close_timeout_s: float = 5.0) -> None:
        self._close_timeout_s = close_timeout_s
        self._wakeup: _Wakeup | None = None
        #: the thread sleeps on it; released once per job handed in (and once to stop)
        self._go = threading.Lock()
        #: makes "the job ended" and "the thread must stop" one decision for either side
        self._state = threading.Lock()
        self._slot: _Job[Any] | None = None
        self._stopping = False
        #: the job in the thread, until its result is taken (an abandoned one included)
        self._job: _Job[Any] | None = None
        self._held = False
        self._waiters: deque[anyio.Event] = deque()
        self.jobs = 0
        #: under trio a job is handed in only once the wait for its end is registered
        self._on_trio = False

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> StoreThread:
        self._wakeup = _Wakeup()
        self._on_trio = sniffio.current_async_library() == "trio"
        self._go.acquire()
        _thread.start_new_thread(self._main, (self._wakeup,))
        return self

    async def __aexit__(self, *exc: object) -> None:
        wakeup = self._wakeup
        if wakeup is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._close_timeout_s):
            await self._acquire()  # (never released: nothing may use the thread after this)
        self._wakeup = None
        with self._state:
            # a thread still in a job (a dead disk) stops when the job returns, and no longer
            # touches the descriptor, which is closed here
            self._stopping = True
            idle = self._job is None or self._job.done
            anyio.notify_closing(wakeup.fd)  # (a caller still waiting: ClosedResourceError)
            wakeup.close()
        if idle:
            self._slot = None
            self._go.release()  # wakes the thread to find no job and stop
        while self._waiters:  # each finds the thread closed
            self._waiters.popleft().set()

    def _main(self, wakeup: _Wakeup) -> None:
        """(The thread.) Run each job handed in; stop when woken without one."""
        while True:
            self._go.acquire()
            job, self._slot = self._slot, None
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # the caller gets it, whatever it is
                job.error = exc
            del job.fn, job.args  # (references to what the job held)
            with self._state:
                job.done = True
                if self._stopping:
                    return
                wakeup.signal()

    # -- use --------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Whether a job runs or someone holds the thread (a new caller would wait)."""
        return self._held or self._job is not None or bool(self._waiters)

    @property
    def in_use(self) -> bool:
        """Whether a job runs (or its result is not taken yet) or someone holds the thread."""
        return self._held or self._job is not None

    @property
    def waiting(self) -> int:
        """Callers queued for the thread."""
        return len(self._waiters)

    async def run(
        self, fn: Callable[..., T], *args: Any, on_abandon: Callable[[], None] | None = None
    ) -> T:
        """``fn(*args)`` in the thread, once every earlier caller is done; its result, or its
        exception raised here. Cancelled while it runs, the caller leaves at once and the job
        runs on (see the module docstring); ``on_abandon`` is then called (only then: a caller
        cancelled before its job was handed in has nothing running in the thread — whatever
        runs there is another caller's). A caller cancelled before its job is handed in —
        already on entry, while it waits its turn, or after it is given the turn but before it
        runs again — never hands it in: it gets the cancellation and nothing of its runs."""
        await aio.checkpoint_if_cancelled()
        await self._acquire()
        try:
            wakeup = self._wakeup
            if wakeup is None:
                raise StoreUnavailableError("the store thread is not running")
            # A cancellation that came after the turn was given (or after an abandoned job
            # ended) is delivered only at the next checkpoint: in the hand-in's wait, after the
            # job went in. Take it here; nothing from here to the hand-in lets another task run.
            await aio.checkpoint_if_cancelled()
            job: _Job[T] = _Job(fn, args)
            self._job = job
            self.jobs += 1
            self._slot = job
            try:
                if self._on_trio:
                    await self._hand_in(job, wakeup)
                else:
                    self._go.release()
                await self._finish(job, wakeup)
            except anyio.get_cancelled_exc_class():
                if on_abandon is not None and not job.done:
                    on_abandon()
                raise
        finally:
            self._release()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold the thread without a job (once any abandoned job ended): callers of
        :meth:`run` wait until the block ends."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    # -- turns --------------------------------------------------------------------------------
    async def _acquire(self) -> None:
        if self._wakeup is None:
            raise StoreUnavailableError("the store thread is not running")
        if self._held or self._waiters:
            turn = anyio.Event()
            self._waiters.append(turn)
            try:
                await turn.wait()
            except BaseException:
                if turn.is_set():
                    self._release()  # handed the thread while leaving: pass it on
                else:
                    self._waiters.remove(turn)
                raise
        else:
            self._held = True
        job = self._job
        if job is not None:
            # a job whose caller left still runs: the connection is not free until it ends
            try:
                wakeup = self._wakeup
                if wakeup is None:
                    raise StoreUnavailableError("the store thread is not running")
                await self._finish(job, wakeup)
            except BaseException:
                self._release()
                raise

    async def _finish(self, job: _Job[Any], wakeup: _Wakeup) -> None:
        """Wait until ``job`` ended; then the thread is free (``_job`` cleared). Cancelled,
        the job stays as the one the next holder waits for."""
        while not job.done:
            try:
                await anyio.wait_readable(wakeup.fd)
            except anyio.ClosedResourceError:
                raise StoreUnavailableError("the store is closing") from None
            wakeup.drain()
        self._job = None

    async def _hand_in(self, job: _Job[Any], wakeup: _Wakeup) -> None:
        """(trio.) Hand ``job`` to the thread once this task's wait for the descriptor is
        registered with the loop, and wait for it to be readable once.

        The thread, woken, needs the GIL at once. Handed the job before the wait's
        registration (an ``epoll_ctl``, which lets the GIL go), it took the GIL there, and the
        loop, back from that system call, waited for it until the job reached SQLite: two more
        futex round trips and context switches per job on the benchmark VM (issue 18, part 8,
        ``strace -f``). Handed in after it, the thread finds the GIL free once the loop sleeps
        in its poll.

        The caller must have no cancellation pending (``run`` checks just before): one would
        be delivered at the wait, after the job went in.

        Raises:
            StoreUnavailableError: the descriptor was closed (the store is closing).
            trio.Cancelled: the caller's scope was cancelled (the job, handed in, runs on; not
                handed in if the wait could not be registered).
        """
        handed = False

        def hand() -> None:
            nonlocal handed
            handed = True
            self._go.release()

        try:
            await _wait_readable_then(wakeup.fd, hand)
        except trio.ClosedResourceError:  # (trio's own: no anyio between)
            raise StoreUnavailableError("the store is closing") from None
        finally:
            if not handed:  # (the registration failed: nothing runs in the thread)
                self._slot = None
                self._job = None
        wakeup.drain()

    def _release(self) -> None:
        """Hand the thread to the first waiter, or free it."""
        if self._waiters:
            self._waiters.popleft().set()  # (``_held`` stays True: it is theirs now)
        else:
            self._held = False
