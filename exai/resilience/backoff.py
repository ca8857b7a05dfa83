"""Backoff for loops that retry, and the one loop shape every background retry in exai uses.

A retry loop that never waits is the failure this module designs out: a pass that made no
progress (it raised, *or* it returned having done nothing, e.g. because a breaker rejected every
item and the code below swallowed that) is always followed by a wait. :func:`drain_loop` judges
progress by what a pass *completed* (the count the pass returns), never by the absence of an
exception, so a pass that swallows its failures still waits.

::

    backoff = Backoff(min_s=0.05, max_s=30.0)
    work, recovered = Wakeup(), Wakeup()
    breaker.on_transition = lambda name, old, new: new == "closed" and recovered.set()
    tg.start_soon(functools.partial(drain_loop, replay_some, lambda: spool.depth,
                                    backoff=backoff, breaker=breaker, work=work,
                                    recovered=recovered))
    ...
    spool.append(...); work.set()          # new work wakes an idle loop

Time is read only through the event loop; tests drive it with ``MockClock``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

import anyio
import anyio.lowlevel
import attrs

from exai.errors import ExaiError

if TYPE_CHECKING:
    from exai.resilience.breaker import CircuitBreaker

__all__ = ["Backoff", "DrainStatistics", "Wakeup", "drain_loop"]


class Backoff:
    """Exponential backoff with jitter: the n-th consecutive delay is about
    ``min_s * factor**n``, capped at ``max_s``; :meth:`reset` after a success.

    Args:
        min_s: the first delay (> 0).
        max_s: the cap (>= ``min_s``).
        factor: growth per failure (>= 1).
        jitter: each delay is scaled by a random factor in ``[1 - jitter, 1]`` so that many
            loops that failed together do not retry together.
        rng: the random source (tests pass a seeded one).
    """

    def __init__(
        self,
        min_s: float,
        max_s: float,
        *,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not min_s > 0:
            raise ValueError("min_s must be > 0")
        if max_s < min_s:
            raise ValueError("max_s must be >= min_s")
        if factor < 1:
            raise ValueError("factor must be >= 1")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.min_s = min_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.failures = 0

    def reset(self) -> None:
        """Back to the first delay (after a pass that made progress)."""
        self.failures = 0

    def next_delay(self, at_least_s: float = 0.0) -> float:
        """The delay before the next attempt, at least ``at_least_s`` (a breaker's retry time,
        which may exceed ``max_s``: retrying before a breaker admits anything is pointless)."""
        exponent = min(self.failures, 64)
        base = min(self.max_s, self.min_s * self.factor**exponent)
        self.failures += 1
        delay = base * (1.0 - self.jitter * self._rng.random())
        return max(delay, at_least_s, 0.0)


class Wakeup:
    """A flag that wakes waiters: :meth:`set` wakes every :meth:`wait` and stays set until
    :meth:`clear`, so a set between a check and a wait is never lost."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        await self._event.wait()


@attrs.define
class DrainStatistics:
    """Counters of one :func:`drain_loop` (read them for status).

    Attributes:
        passes: passes run.
        completed: items the passes completed.
        empty_passes: passes that completed nothing (each followed by a wait).
        errors: passes that raised an :class:`~exai.errors.ExaiError`.
        waits: backoff waits taken.
        woken_early: backoff waits cut short by ``recovered``.
        idle_with_work_s: seconds spent in backoff waits that began while the breaker was
            closed (work pending, dependency said healthy: what a slow replay looks like).
    """

    passes: int = 0
    completed: int = 0
    empty_passes: int = 0
    errors: int = 0
    waits: int = 0
    woken_early: int = 0
    idle_with_work_s: float = 0.0

    def to_dict(self) -> dict[str, float | int]:
        return attrs.asdict(self)


async def drain_loop(
    step: Callable[[], Awaitable[int]],
    pending: Callable[[], int],
    *,
    backoff: Backoff,
    work: Wakeup,
    recovered: Wakeup | None = None,
    breaker: CircuitBreaker | None = None,
    stats: DrainStatistics | None = None,
    on_error: Callable[[ExaiError], None] | None = None,
) -> NoReturn:
    """Run ``step`` while ``pending() > 0``; never loop without waiting unless a pass made
    progress.

    Each pass calls ``await step()``, which returns how many items it completed. After a pass
    that completed nothing or raised an :class:`~exai.errors.ExaiError` (given to
    ``on_error``), the loop waits ``backoff.next_delay(at_least_s=<breaker retry time>)``, or
    until ``recovered`` is set (the breaker closed: the dependency is back). After a pass that
    completed something the backoff resets and the next pass starts at once. While nothing is
    pending the loop sleeps until ``work`` is set. New work does *not* cut a backoff wait short:
    more work does not make a failing dependency healthier.

    Runs until cancelled. Any exception that is not an ``ExaiError`` propagates (a bug).
    """
    st = stats if stats is not None else DrainStatistics()
    while True:
        if pending() <= 0:
            work.clear()
            if pending() <= 0:  # checked after clearing: a set() after this line is kept
                await work.wait()
                continue
        st.passes += 1
        done = 0
        try:
            done = await step()
        except ExaiError as exc:
            st.errors += 1
            if on_error is not None:
                on_error(exc)
        if done > 0:
            st.completed += done
            backoff.reset()
            # a checkpoint even on the happy path: a pass whose items all complete without
            # awaiting anything (a fake store, a cached answer) must still let others run
            await anyio.lowlevel.checkpoint()
            continue
        st.empty_passes += 1
        retry_s = 0.0
        if breaker is not None:
            retry_s = breaker.statistics().retry_after_s
        delay = backoff.next_delay(at_least_s=retry_s)
        st.waits += 1
        if recovered is not None:
            recovered.clear()
        closed = breaker is not None and breaker.state == "closed"
        start = anyio.current_time()
        with anyio.move_on_after(delay if math.isfinite(delay) else backoff.max_s):
            if recovered is not None:
                await recovered.wait()
                st.woken_early += 1
            else:
                await anyio.sleep_forever()
        if closed:
            # waited while the dependency's breaker said it was healthy
            st.idle_with_work_s += anyio.current_time() - start
