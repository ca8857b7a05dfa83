"""A token bucket with FIFO waiters, driven by the event loop's clock.

The bucket holds up to ``capacity`` tokens and refills at ``rate_per_s``; it starts full. Over
any interval of length ``t`` it admits at most ``capacity + rate_per_s × t`` tokens' worth of
cost. Waiters are served strictly in arrival order, so a large request at the head of the queue
is not starved by a stream of small ones: nobody (not even :meth:`TokenBucket.try_acquire`)
jumps the queue.

There is no refill task: the level is computed from the elapsed loop time whenever the bucket is
touched, and only the waiter at the head of the queue sleeps on a timer.
"""

from __future__ import annotations

import math
from collections import deque

import anyio
import anyio.lowlevel
import attrs

from exai.resilience import loop as aio

__all__ = ["TokenBucket", "TokenBucketStatistics"]

# A level within this many seconds' worth of refill counts as reached: the clock is a float, so
# a waiter woken exactly when its tokens are due can find them a rounding error short, and a
# shorter sleep might not advance the clock at all. It bounds any excess at rate × 1 µs.
_SLACK_S = 1e-6


@attrs.frozen(kw_only=True)
class TokenBucketStatistics:
    """A snapshot of a :class:`TokenBucket`.

    Attributes:
        rate_per_s: refill rate.
        capacity: maximum level.
        tokens: the level now (refilled up to the snapshot's time).
        waiters: tasks queued in :meth:`TokenBucket.acquire`.
        queued_cost: the total cost they wait for.
        admitted_cost: cost admitted over the bucket's lifetime (net of refunds).
        admitted: requests admitted over the lifetime.
        rejected: :meth:`TokenBucket.try_acquire` calls that were refused.
        waited: :meth:`TokenBucket.acquire` calls that had to queue for tokens.
    """

    rate_per_s: float
    capacity: float
    tokens: float
    waiters: int
    queued_cost: float
    admitted_cost: float
    admitted: int
    rejected: int
    waited: int = 0


#: the waiters of every bucket nobody has waited on yet: never appended to (see ``acquire``)
_NOBODY_WAITS: deque[_Waiter] = deque()


class _Waiter:
    __slots__ = ("cost", "wake")

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.wake = anyio.Event()


class TokenBucket:
    """Admit a cost at a sustained ``rate_per_s`` with bursts up to ``capacity``.

    Args:
        rate_per_s: tokens added per second (> 0).
        capacity: the most tokens the bucket holds, i.e. the largest burst (> 0). A single
            request can cost at most this much.

    Use :meth:`acquire` to wait for tokens (bound the wait with a cancel scope), or
    :meth:`try_acquire` to ask without waiting. For token-per-minute limits, reserve an estimate
    and :meth:`refund` what the call did not use.

    Resource handling:
        The bucket owns no task. A waiter that is cancelled leaves the queue having taken
        nothing, and the next waiter moves up at once.
    """

    __slots__ = (
        "_last",
        "_queued_cost",
        "_slack",
        "_tokens",
        "_waiters",
        "admitted",
        "admitted_cost",
        "capacity",
        "rate_per_s",
        "rejected",
        "waited",
    )

    def __init__(self, rate_per_s: float, capacity: float) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ValueError("rate_per_s must be a finite number > 0")
        if not (capacity > 0 and math.isfinite(capacity)):
            raise ValueError("capacity must be a finite number > 0")
        self.rate_per_s = float(rate_per_s)
        self.capacity = float(capacity)
        self._tokens = float(capacity)
        self._slack = 1e-9 + self.rate_per_s * _SLACK_S
        self._last: float | None = None  # loop time of the last refill; None until first use
        # (the empty queue every bucket shares until one has to wait: an empty deque holds a
        # block of 64 slots, ≈ 0.6 KB, and a daemon has a bucket per connection)
        self._waiters: deque[_Waiter] = _NOBODY_WAITS
        self._queued_cost = 0.0
        self.admitted = 0
        self.admitted_cost = 0.0
        self.rejected = 0
        self.waited = 0

    # -- public API -----------------------------------------------------------------------------

    async def acquire(self, cost: float = 1) -> None:
        """Wait until ``cost`` tokens can be taken, then take them.

        Waiters are served in FIFO order. The wait has no bound of its own: open a cancel scope
        (``anyio.fail_after`` / ``move_on_after``) around the call.

        Raises:
            ValueError: ``cost`` is negative or larger than ``capacity`` (it could never be met).

        Error handling:
            A waiter cancelled while queued takes nothing and leaves the queue; the tokens it was
            waiting for go to the next waiter.
        """
        self._check_cost(cost)
        await aio.checkpoint_if_cancelled()
        now = aio.current_time()
        self._refill(now)
        if not self._waiters and self._tokens + self._slack >= cost:
            self._take(cost)
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter(cost)
        self.waited += 1
        if self._waiters is _NOBODY_WAITS:
            self._waiters = deque()
        self._waiters.append(waiter)
        self._queued_cost += cost
        try:
            while True:
                if self._waiters[0] is not waiter:
                    await waiter.wake.wait()
                    waiter.wake = anyio.Event()
                    continue
                self._refill(aio.current_time())
                missing = cost - self._tokens
                if missing <= self._slack:
                    break
                # Sleep until the tokens are there, or until a refund wakes us earlier.
                with aio.move_on_after(missing / self.rate_per_s):
                    await waiter.wake.wait()
                waiter.wake = anyio.Event()
        finally:
            # Leave the queue on success and on cancellation alike; only success takes tokens.
            head = self._waiters[0] is waiter
            self._waiters.remove(waiter)
            self._queued_cost -= cost
            if not self._waiters:
                self._queued_cost = 0.0  # forget accumulated float error
            elif head:
                self._waiters[0].wake.set()
        # No checkpoint between the last refill and here: the tokens are taken atomically.
        self._take(cost)

    def try_acquire(self, cost: float = 1) -> float:
        """Take ``cost`` tokens now if possible.

        Returns:
            ``0.0`` when admitted; otherwise the seconds until ``cost`` tokens would be
            available to this request (after the waiters already queued), taking nothing.

        Raises:
            ValueError: ``cost`` is negative or larger than ``capacity``.
        """
        self._check_cost(cost)
        self._refill(aio.current_time())
        if not self._waiters and self._tokens + self._slack >= cost:
            self._take(cost)
            return 0.0
        self.rejected += 1
        missing = self._queued_cost + cost - self._tokens
        return max(missing / self.rate_per_s, _SLACK_S)

    def refund(self, cost: float) -> None:
        """Give back ``cost`` tokens that were reserved but not used (never above capacity).

        Raises:
            ValueError: ``cost`` is negative.
        """
        if cost < 0 or math.isnan(cost):
            raise ValueError("refund cost must be >= 0")
        if cost == 0:
            return
        self._refill(aio.current_time())
        self._tokens = min(self.capacity, self._tokens + cost)
        self.admitted_cost -= cost
        if self._waiters:
            self._waiters[0].wake.set()  # the head may not need to wait as long any more

    def statistics(self) -> TokenBucketStatistics:
        """A frozen snapshot of the bucket."""
        try:
            self._refill(aio.current_time())
        except RuntimeError:  # no event loop running: report the last computed level
            pass
        return TokenBucketStatistics(
            rate_per_s=self.rate_per_s,
            capacity=self.capacity,
            tokens=self._tokens,
            waiters=len(self._waiters),
            queued_cost=self._queued_cost,
            admitted_cost=self.admitted_cost,
            admitted=self.admitted,
            rejected=self.rejected,
            waited=self.waited,
        )

    def __repr__(self) -> str:
        return (
            f"<TokenBucket rate_per_s={self.rate_per_s} capacity={self.capacity} "
            f"tokens={self._tokens:.3f} waiters={len(self._waiters)}>"
        )

    # -- internals ------------------------------------------------------------------------------

    def _check_cost(self, cost: float) -> None:
        if not 0 <= cost <= self.capacity:
            raise ValueError(
                f"cost {cost!r} must be between 0 and the bucket's capacity {self.capacity}"
            )

    def _refill(self, now: float) -> None:
        last = self._last
        if last is not None and now > last:
            self._tokens = min(self.capacity, self._tokens + (now - last) * self.rate_per_s)
        if last is None or now > last:
            self._last = now

    def _take(self, cost: float) -> None:
        self._tokens -= cost
        self.admitted += 1
        self.admitted_cost += cost
