"""A circuit breaker: closed, open, half-open, over a count or time window.

Modelled on resilience4j (failure and slow-call rates judged over a sliding window once a
minimum number of calls was seen, a bounded number of half-open probes, an open time that grows)
and Polly v8 (the rejection carries how long to wait). Time is read only through the event loop
(:func:`anyio.current_time`), so a ``MockClock`` drives it in tests.

State machine::

    closed ──(rate ≥ threshold over the window, ≥ minimum_calls seen)──▶ open
    open ──(open time elapsed; checked lazily on the next call)──▶ half_open
    half_open ──(the probes' failure or slow rate reaches its threshold)──▶ open (time doubled)
    half_open ──(all half_open_max_calls probes done, rates below thresholds)──▶ closed
    any ──open_until(seconds)──▶ open (held at least that long)

There is no background task: transitions happen when a call, ``state`` or ``statistics()``
looks at the breaker.
"""

from __future__ import annotations

import contextvars
import math
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar

import attrs

from exai.errors import CallerError, CircuitOpenError
from exai.resilience import loop as aio

__all__ = ["BreakerState", "BreakerStatistics", "CircuitBreaker", "count_unless_caller_error"]

BreakerState = Literal["closed", "open", "half_open"]
T = TypeVar("T")

_CLOSED: BreakerState = "closed"
_OPEN: BreakerState = "open"
_HALF_OPEN: BreakerState = "half_open"

# Outcome bits kept per call in the count window.
_FAILED = 1
_SLOW = 2

#: Partial aggregations a time window is cut into (its resolution is window_size / _BUCKETS).
_BUCKETS = 10


def count_unless_caller_error(exc: BaseException) -> bool:
    """The default ``record`` predicate: every exception counts except a :class:`CallerError`.

    A bad request says nothing about the dependency's health, so it never trips a breaker.
    """
    return not isinstance(exc, CallerError)


@attrs.frozen(kw_only=True)
class BreakerStatistics:
    """A snapshot of a :class:`CircuitBreaker`, taken by :meth:`CircuitBreaker.statistics`.

    Counters (``calls`` … ``trips``) run over the breaker's lifetime; ``window_*`` fields and the
    rates describe the current sliding window (or, in half-open, the probes so far).

    Attributes:
        name: the breaker's name.
        state: ``"closed"``, ``"open"`` or ``"half_open"``.
        calls: calls admitted.
        successes: admitted calls that returned.
        failures: admitted calls that raised an exception ``record`` counts.
        slow_calls: admitted calls (successful or not) that took ``slow_call_duration_s`` or more.
        ignored: admitted calls that counted as neither (cancelled, or not recorded).
        rejections: calls refused with :class:`~exai.errors.CircuitOpenError`.
        transitions: state changes so far.
        trips: times the breaker opened because of its window (``open_until`` is not a trip).
        consecutive_trips: trips since it last closed; the open time doubles with each.
        window_calls: counted calls in the window.
        window_failures: failures in the window.
        window_slow_calls: slow calls in the window.
        failure_rate: ``window_failures / window_calls`` (0.0 when empty).
        slow_call_rate: ``window_slow_calls / window_calls`` (0.0 when empty).
        half_open_in_flight: probes running now.
        current_open_duration_s: the open time of the current trip, or of the next one when
            the breaker is not open.
        retry_after_s: seconds until the breaker turns half-open (0.0 unless open).
    """

    name: str
    state: BreakerState
    calls: int
    successes: int
    failures: int
    slow_calls: int
    ignored: int
    rejections: int
    transitions: int
    trips: int
    consecutive_trips: int
    window_calls: int
    window_failures: int
    window_slow_calls: int
    failure_rate: float
    slow_call_rate: float
    half_open_in_flight: int
    current_open_duration_s: float
    retry_after_s: float


class _Permit:
    """One admitted call: when it started and which state period admitted it."""

    __slots__ = ("epoch", "probe", "start", "token")

    def __init__(self, start: float, epoch: int, probe: bool) -> None:
        self.start = start
        self.epoch = epoch
        self.probe = probe
        self.token: contextvars.Token[_Permit | None] | None = None


class _CountWindow:
    """The outcomes of the last ``size`` counted calls, with running sums."""

    __slots__ = ("_count", "_pos", "_ring", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self._ring = bytearray(self.size)
        self._pos = 0
        self._count = 0
        self.failures = 0
        self.slow = 0

    def add(self, now: float, bits: int) -> None:
        if self._count == self.size:
            old = self._ring[self._pos]
            self.failures -= old & _FAILED
            self.slow -= (old & _SLOW) >> 1
        else:
            self._count += 1
        self._ring[self._pos] = bits
        self._pos = (self._pos + 1) % self.size
        self.failures += bits & _FAILED
        self.slow += (bits & _SLOW) >> 1

    def calls(self, now: float) -> int:
        return self._count


class _TimeWindow:
    """The outcomes of the calls of the last ``span_s`` seconds, in ``_BUCKETS`` aggregates."""

    __slots__ = ("_buckets", "_calls", "_width", "failures", "slow", "span_s")

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._width = span_s / _BUCKETS
        self.reset()

    def reset(self) -> None:
        # Each bucket: [index, calls, failures, slow]
        self._buckets: deque[list[int]] = deque()
        self._calls = 0
        self.failures = 0
        self.slow = 0

    def _evict(self, now: float) -> int:
        index = math.floor(now / self._width)
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - _BUCKETS:
            _, calls, failures, slow = buckets.popleft()
            self._calls -= calls
            self.failures -= failures
            self.slow -= slow
        return index

    def add(self, now: float, bits: int) -> None:
        index = self._evict(now)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0, 0])
        bucket = buckets[-1]
        failed = bits & _FAILED
        slow = (bits & _SLOW) >> 1
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self._calls += 1
        self.failures += failed
        self.slow += slow

    def calls(self, now: float) -> int:
        self._evict(now)
        return self._calls


class CircuitBreaker:
    """Guard calls to one dependency; fail fast while it is unhealthy.

    Use it around a call::

        breaker = CircuitBreaker("provider:kimi", slow_call_duration_s=30, minimum_calls=10,
                                 window_size=50, half_open_max_calls=2, open_duration_s=5,
                                 max_open_duration_s=120)
        async with breaker:
            response = await client.post(...)
        # or
        response = await breaker.call(client.post, url)

    Args:
        name: names the breaker in errors, statistics and metrics (``"provider:kimi"``).
        failure_rate_threshold: open when the share of failed calls in the window reaches this
            (0 < x ≤ 1).
        slow_call_rate_threshold: open when the share of slow calls reaches this (0 < x ≤ 1;
            1.0 means "every call in the window was slow").
        slow_call_duration_s: a call taking at least this long is slow.
        minimum_calls: calls the window must hold before any rate is judged (in a count window
            at most ``window_size`` can be required).
        window_size: calls in a ``"count"`` window; seconds in a ``"time"`` window.
        window_kind: ``"count"`` (the last N calls) or ``"time"`` (the calls of the last N
            seconds, at a resolution of a tenth of the window).
        half_open_max_calls: probes admitted in half-open, concurrently or not; the rest are
            rejected until the probes have decided.
        open_duration_s: how long the first trip stays open; each consecutive trip doubles it.
        max_open_duration_s: the cap on the doubled open time.
        record: ``record(exc) -> bool`` says whether an exception counts as a failure; one that
            does not counts as neither success nor failure. Default: all but
            :class:`~exai.errors.CallerError`. Cancellation (and any ``BaseException`` that is not
            an ``Exception``) always counts as neither.
        on_transition: ``on_transition(name, old_state, new_state)``, called synchronously after
            each state change (for metrics and logs). It must be quick and must not raise.

    Raises:
        CircuitOpenError: from ``async with`` / :meth:`call` when the call is rejected; it
            carries the breaker's name and ``retry_after_s``.

    Error handling:
        ``async with breaker`` never changes the exception raised by its body: the body's error
        (single, not wrapped in a group) propagates as it was, after being counted.

    Resource handling:
        Nothing to close; the breaker owns no task. An admitted call that is cancelled gives
        back its half-open probe slot.
    """

    __slots__ = (
        "_current",
        "_current_open_s",
        "_epoch",
        "_half_open_done",
        "_half_open_failures",
        "_half_open_in_flight",
        "_half_open_slow",
        "_min_calls",
        "_open_until",
        "_state",
        "_window",
        "calls",
        "consecutive_trips",
        "failure_rate_threshold",
        "failures",
        "half_open_max_calls",
        "ignored",
        "max_open_duration_s",
        "minimum_calls",
        "name",
        "on_transition",
        "open_duration_s",
        "record",
        "rejections",
        "slow_call_duration_s",
        "slow_call_rate_threshold",
        "slow_calls",
        "successes",
        "transitions",
        "trips",
        "window_kind",
        "window_size",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_rate_threshold: float = 0.5,
        slow_call_rate_threshold: float = 1.0,
        slow_call_duration_s: float = 60.0,
        minimum_calls: int = 10,
        window_size: float = 50,
        window_kind: Literal["count", "time"] = "count",
        half_open_max_calls: int = 1,
        open_duration_s: float = 5.0,
        max_open_duration_s: float = 120.0,
        record: Callable[[BaseException], bool] = count_unless_caller_error,
        on_transition: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if not 0.0 < failure_rate_threshold <= 1.0:
            raise ValueError("failure_rate_threshold must be in (0, 1]")
        if not 0.0 < slow_call_rate_threshold <= 1.0:
            raise ValueError("slow_call_rate_threshold must be in (0, 1]")
        if not slow_call_duration_s > 0:
            raise ValueError("slow_call_duration_s must be > 0")
        if minimum_calls < 1:
            raise ValueError("minimum_calls must be >= 1")
        if half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be >= 1")
        if not open_duration_s > 0:
            raise ValueError("open_duration_s must be > 0")
        if max_open_duration_s < open_duration_s:
            raise ValueError("max_open_duration_s must be >= open_duration_s")
        if window_kind == "count":
            if window_size < 1 or int(window_size) != window_size:
                raise ValueError("a count window_size must be a whole number >= 1")
            self._window: _CountWindow | _TimeWindow = _CountWindow(int(window_size))
            self._min_calls = min(minimum_calls, int(window_size))
        elif window_kind == "time":
            if not window_size > 0:
                raise ValueError("a time window_size must be > 0 seconds")
            self._window = _TimeWindow(float(window_size))
            self._min_calls = minimum_calls
        else:
            raise ValueError(f"window_kind must be 'count' or 'time', not {window_kind!r}")

        self.name = name
        self.failure_rate_threshold = failure_rate_threshold
        self.slow_call_rate_threshold = slow_call_rate_threshold
        self.slow_call_duration_s = slow_call_duration_s
        self.minimum_calls = minimum_calls
        self.window_size = window_size
        self.window_kind = window_kind
        self.half_open_max_calls = half_open_max_calls
        self.open_duration_s = open_duration_s
        self.max_open_duration_s = max_open_duration_s
        self.record = record
        self.on_transition = on_transition

        self._state: BreakerState = _CLOSED
        self._epoch = 0
        self._open_until = -math.inf
        self._current_open_s = open_duration_s
        self._half_open_in_flight = 0
        self._half_open_done = 0
        self._half_open_failures = 0
        self._half_open_slow = 0
        # The permit of the innermost ``async with`` of this breaker in the current task.
        self._current: contextvars.ContextVar[_Permit | None] = contextvars.ContextVar(
            f"exai.breaker.{name}", default=None
        )
        self.calls = 0
        self.successes = 0
        self.failures = 0
        self.slow_calls = 0
        self.ignored = 0
        self.rejections = 0
        self.transitions = 0
        self.trips = 0
        self.consecutive_trips = 0

    # -- public API -----------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """``"closed"``, ``"open"`` or ``"half_open"``, as of now on the event loop's clock."""
        now = _now_or_none()
        if now is not None:
            self._refresh(now)
        return self._state

    async def __aenter__(self) -> CircuitBreaker:
        permit = self._admit(aio.current_time())
        permit.token = self._current.set(permit)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit = self._current.get()
        if permit is None or permit.token is None:  # pragma: no cover - misuse
            raise RuntimeError("CircuitBreaker.__aexit__ without a matching __aenter__")
        self._current.reset(permit.token)
        permit.token = None
        self._settle(permit, exc, aio.current_time())

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` through the breaker and return its result.

        Raises:
            CircuitOpenError: the call was rejected; ``fn`` was not called.
            Exception: whatever ``fn`` raised (counted according to ``record``).
        """
        permit = self._admit(aio.current_time())
        try:
            result = await fn(*args)
        except BaseException as exc:
            self._settle(permit, exc, aio.current_time())
            raise
        self._settle(permit, None, aio.current_time())
        return result

    def open_until(self, seconds: float) -> None:
        """Hold the breaker open for at least ``seconds`` from now (an upstream ``Retry-After``).

        An open breaker is only ever extended, never shortened. This is not a trip: it does not
        double the next open time. ``seconds <= 0`` does nothing.
        """
        if not seconds > 0:
            return
        now = aio.current_time()
        self._refresh(now)
        until = now + seconds
        if self._state == _OPEN:
            if until > self._open_until:
                self._open_until = until
            return
        self._enter_open(now, until)

    def statistics(self) -> BreakerStatistics:
        """A frozen snapshot of the breaker's state and counters."""
        now = _now_or_none()
        if now is not None:
            self._refresh(now)
        window = self._window
        if self._state == _HALF_OPEN:
            w_calls = self._half_open_done
            w_failures = self._half_open_failures
            w_slow = self._half_open_slow
        else:
            w_calls = window.calls(now) if now is not None else 0
            w_failures = window.failures
            w_slow = window.slow
        if self._state == _OPEN:
            open_s = self._current_open_s
            retry_after = max(0.0, self._open_until - now) if now is not None else open_s
        else:
            open_s = self._next_open_duration()
            retry_after = 0.0
        return BreakerStatistics(
            name=self.name,
            state=self._state,
            calls=self.calls,
            successes=self.successes,
            failures=self.failures,
            slow_calls=self.slow_calls,
            ignored=self.ignored,
            rejections=self.rejections,
            transitions=self.transitions,
            trips=self.trips,
            consecutive_trips=self.consecutive_trips,
            window_calls=w_calls,
            window_failures=w_failures,
            window_slow_calls=w_slow,
            failure_rate=w_failures / w_calls if w_calls else 0.0,
            slow_call_rate=w_slow / w_calls if w_calls else 0.0,
            half_open_in_flight=self._half_open_in_flight,
            current_open_duration_s=open_s,
            retry_after_s=retry_after,
        )

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.name!r} state={self._state} calls={self.calls} "
            f"failures={self.failures} rejections={self.rejections}>"
        )

    # -- internals ------------------------------------------------------------------------------

    def _admit(self, now: float) -> _Permit:
        state = self._state
        if state == _CLOSED:
            self.calls += 1
            return _Permit(now, self._epoch, False)
        if state == _OPEN:
            if now < self._open_until:
                self.rejections += 1
                raise CircuitOpenError(self.name, self._open_until - now)
            self._transition(_HALF_OPEN)
        # half-open: a probe slot is taken by a probe in flight or one that has been counted.
        if self._half_open_in_flight + self._half_open_done < self.half_open_max_calls:
            self._half_open_in_flight += 1
            self.calls += 1
            return _Permit(now, self._epoch, True)
        self.rejections += 1
        # The probes decide within about one call; advise the base open time as the wait.
        raise CircuitOpenError(
            self.name,
            self.open_duration_s,
            f"circuit breaker {self.name!r} is half-open and its probes are taken; "
            f"retry in {self.open_duration_s:.3f}s",
        )

    def _settle(self, permit: _Permit, exc: BaseException | None, now: float) -> None:
        if exc is None:
            failed = False
        elif isinstance(exc, Exception) and self.record(exc):
            failed = True
        else:
            # Cancelled (trio.Cancelled / asyncio.CancelledError are BaseExceptions), or an
            # exception ``record`` does not count: neither success nor failure.
            self.ignored += 1
            if permit.probe and permit.epoch == self._epoch:
                self._half_open_in_flight -= 1  # give the probe slot back
            return
        slow = now - permit.start >= self.slow_call_duration_s
        if failed:
            self.failures += 1
        else:
            self.successes += 1
        if slow:
            self.slow_calls += 1
        if permit.epoch != self._epoch:
            return  # admitted in an earlier state period; its outcome no longer matters
        if permit.probe:
            self._settle_probe(failed, slow, now)
            return
        window = self._window
        window.add(now, (_FAILED if failed else 0) | (_SLOW if slow else 0))
        calls = window.calls(now)
        if calls >= self._min_calls and (
            window.failures / calls >= self.failure_rate_threshold
            or window.slow / calls >= self.slow_call_rate_threshold
        ):
            self._trip(now)

    def _settle_probe(self, failed: bool, slow: bool, now: float) -> None:
        self._half_open_in_flight -= 1
        self._half_open_done += 1
        self._half_open_failures += failed
        self._half_open_slow += slow
        n = self.half_open_max_calls
        # Rates over all the probes: once a threshold is reached it can only stay reached.
        if (
            self._half_open_failures / n >= self.failure_rate_threshold
            or self._half_open_slow / n >= self.slow_call_rate_threshold
        ):
            self._trip(now)
        elif self._half_open_done >= n:
            self._enter_closed()

    def _next_open_duration(self) -> float:
        exponent = min(self.consecutive_trips, 62)
        return min(self.open_duration_s * 2.0**exponent, self.max_open_duration_s)

    def _trip(self, now: float) -> None:
        duration = self._next_open_duration()
        self.trips += 1
        self.consecutive_trips += 1
        self._current_open_s = duration
        self._enter_open(now, now + duration)

    def _enter_open(self, now: float, until: float) -> None:
        self._open_until = until
        self._new_period()
        self._transition(_OPEN)

    def _enter_closed(self) -> None:
        self.consecutive_trips = 0
        self._current_open_s = self.open_duration_s
        self._open_until = -math.inf
        self._new_period()
        self._transition(_CLOSED)

    def _new_period(self) -> None:
        self._epoch += 1
        self._window.reset()
        self._half_open_in_flight = 0
        self._half_open_done = 0
        self._half_open_failures = 0
        self._half_open_slow = 0

    def _refresh(self, now: float) -> None:
        if self._state == _OPEN and now >= self._open_until:
            self._transition(_HALF_OPEN)

    def _transition(self, new: BreakerState) -> None:
        old = self._state
        if new == _HALF_OPEN:
            self._new_period()
        self._state = new
        self.transitions += 1
        if self.on_transition is not None:
            self.on_transition(self.name, old, new)


def _now_or_none() -> float | None:
    try:
        return aio.current_time()
    except RuntimeError:  # no event loop running (anyio.NoEventLoopError)
        return None
