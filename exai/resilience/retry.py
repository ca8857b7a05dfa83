"""Retries for calls that fail retryably: backoff with jitter, ``Retry-After``, deadline, budget.

Built on tenacity with anyio sleeps, so it works under trio and asyncio::

    policy = retrying(attempts=4, budget=kimi_budget)

    result = await policy.call(client.chat, request)

    async for attempt in policy:
        with attempt:
            result = await client.chat(request)

Three rules keep retries from making an outage worse (Envoy's retry budget, the old daemon's
four-minute fallback cascade):

* it retries only errors that say so (``ExaiError.retryable`` by default) and waits at least
  their ``retry_after_s``;
* it never sleeps past the caller's deadline (``anyio.current_effective_deadline()``): when the
  next sleep would end at or after it, it gives up at once with the last error;
* a shared :class:`RetryBudget` caps retries at a fraction of recent calls.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
import attrs
import tenacity
from tenacity import AttemptManager, RetryCallState

from exai.errors import ExaiError

__all__ = ["RetryBudget", "RetryBudgetStatistics", "RetryPolicy", "is_retryable", "retrying"]

T = TypeVar("T")

#: Partial aggregations a budget's window is cut into.
_BUCKETS = 10


def is_retryable(exc: BaseException) -> bool:
    """The default retry predicate: an :class:`~exai.errors.ExaiError` marked ``retryable``."""
    return isinstance(exc, ExaiError) and exc.retryable


@attrs.frozen(kw_only=True)
class RetryBudgetStatistics:
    """A snapshot of a :class:`RetryBudget` over its current window.

    Attributes:
        calls: first attempts recorded in the window.
        retries: retries spent in the window.
        refused: retries refused over the budget's lifetime.
        available: retries that could be spent now.
    """

    calls: int
    retries: int
    refused: int
    available: float


class RetryBudget:
    """Allow retries up to ``ratio`` of the calls of the last ``window_s`` seconds.

    Shared by every call to one dependency, so that when it fails, retries add at most ``ratio``
    to its load instead of multiplying it by the number of attempts. ``min_retries_per_s``
    keeps a few retries available when traffic is low (as in Finagle and Envoy).

    Args:
        ratio: retries allowed per recorded call (0.2 = at most 20 % extra load).
        min_retries_per_s: retries always allowed per second of window, whatever the traffic.
        window_s: the sliding window, read on the event loop's clock.
    """

    __slots__ = (
        "_buckets",
        "_calls",
        "_retries",
        "_width",
        "min_retries_per_s",
        "ratio",
        "refused",
        "window_s",
    )

    def __init__(
        self, *, ratio: float = 0.2, min_retries_per_s: float = 1.0, window_s: float = 10.0
    ) -> None:
        if ratio < 0 or min_retries_per_s < 0:
            raise ValueError("ratio and min_retries_per_s must be >= 0")
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self.ratio = ratio
        self.min_retries_per_s = min_retries_per_s
        self.window_s = window_s
        self.refused = 0
        self._width = window_s / _BUCKETS
        self._buckets: deque[list[int]] = deque()  # [index, calls, retries]
        self._calls = 0
        self._retries = 0

    def record_call(self) -> None:
        """Count one call (a first attempt): it earns ``ratio`` of a retry."""
        self._bucket(anyio.current_time())[1] += 1
        self._calls += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one; ``False`` means do not retry."""
        now = anyio.current_time()
        if self._available(now) < 1.0:
            self.refused += 1
            return False
        self._bucket(now)[2] += 1
        self._retries += 1
        return True

    def statistics(self) -> RetryBudgetStatistics:
        """A frozen snapshot of the budget."""
        now = anyio.current_time()
        available = self._available(now)
        return RetryBudgetStatistics(
            calls=self._calls, retries=self._retries, refused=self.refused, available=available
        )

    def _available(self, now: float) -> float:
        self._evict(now)
        allowed = self.min_retries_per_s * self.window_s + self.ratio * self._calls
        return allowed - self._retries

    def _evict(self, now: float) -> int:
        index = math.floor(now / self._width)
        while self._buckets and self._buckets[0][0] <= index - _BUCKETS:
            _, calls, retries = self._buckets.popleft()
            self._calls -= calls
            self._retries -= retries
        return index

    def _bucket(self, now: float) -> list[int]:
        index = self._evict(now)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append([index, 0, 0])
        return self._buckets[-1]


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """A reusable retry policy; build it with :func:`retrying`.

    Each use (``call`` or ``async for``) runs with fresh state, so one policy can serve
    concurrent calls; a :class:`RetryBudget` given to it is shared by all of them.
    """

    attempts: int
    initial_backoff_s: float
    max_backoff_s: float
    jitter: float
    max_retry_after_s: float
    retry_if: Callable[[BaseException], bool]
    budget: RetryBudget | None
    on_retry: Callable[[int, BaseException, float], None] | None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)``, retrying as the policy says; return its result.

        Raises:
            Exception: the last error when the policy gives up (attempts, deadline, budget, or
                a ``retry_after_s`` above ``max_retry_after_s``), or the first error that is not
                retryable. Never a ``tenacity.RetryError``.
        """
        result: T = await self._tenacity()(fn, *args)
        return result

    def __aiter__(self) -> AsyncIterator[AttemptManager]:
        return self._tenacity().__aiter__()

    def backoff_s(self, attempt: int) -> float:
        """The jittered backoff after failed attempt number ``attempt`` (1-based)."""
        exponent = min(attempt - 1, 62)
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2.0**exponent)
        return random.uniform(ceiling * (1.0 - self.jitter), ceiling)

    def _tenacity(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            sleep=anyio.sleep,
            retry=tenacity.retry_if_exception(self.retry_if),
            wait=self._wait,
            stop=self._stop,
            before=self._before,
            before_sleep=self._before_sleep if self.on_retry is not None else None,
            reraise=True,
        )

    def _before(self, state: RetryCallState) -> None:
        if state.attempt_number == 1 and self.budget is not None:
            self.budget.record_call()

    def _wait(self, state: RetryCallState) -> float:
        wait = self.backoff_s(state.attempt_number)
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after_s", None)
        if isinstance(retry_after, int | float) and retry_after > wait:
            wait = float(retry_after)
        return wait

    def _stop(self, state: RetryCallState) -> bool:
        # Called after _wait, so ``upcoming_sleep`` is the sleep a retry would need.
        if state.attempt_number >= self.attempts:
            return True
        sleep = state.upcoming_sleep
        if sleep > self.max_retry_after_s:
            return True
        if anyio.current_time() + sleep >= anyio.current_effective_deadline():
            return True  # the retry could not finish in time: fail now with the real error
        # Last, so that a retry refused for another reason does not spend the budget.
        return self.budget is not None and not self.budget.try_spend()

    def _before_sleep(self, state: RetryCallState) -> None:
        assert self.on_retry is not None and state.outcome is not None
        exc = state.outcome.exception()
        assert exc is not None
        self.on_retry(state.attempt_number, exc, state.upcoming_sleep)


def retrying(
    *,
    attempts: int = 3,
    initial_backoff_s: float = 0.2,
    max_backoff_s: float = 10.0,
    jitter: float = 0.5,
    max_retry_after_s: float = 60.0,
    retry_if: Callable[[BaseException], bool] = is_retryable,
    budget: RetryBudget | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> RetryPolicy:
    """Build a :class:`RetryPolicy` for calls that fail retryably.

    The wait after failed attempt ``n`` is drawn from ``[(1 - jitter) × b, b]`` with
    ``b = min(max_backoff_s, initial_backoff_s × 2**(n-1))``, raised to the error's
    ``retry_after_s`` when that is longer.

    Args:
        attempts: the most attempts in all (1 = no retry).
        initial_backoff_s: the backoff ceiling after the first failure.
        max_backoff_s: the cap on the backoff ceiling.
        jitter: the fraction of the ceiling drawn at random (0 = none, 1 = full jitter).
        max_retry_after_s: give up instead of honouring a longer ``retry_after_s``.
        retry_if: ``retry_if(exc) -> bool``; default :func:`is_retryable`. Cancellation is never
            retried (it is not an ``ExaiError``).
        budget: a :class:`RetryBudget` shared by the calls to one dependency.
        on_retry: ``on_retry(attempt, exc, sleep_s)`` called before each backoff sleep.

    The caller bounds the whole thing with a cancel scope; no sleep passes its deadline.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    if initial_backoff_s < 0 or max_backoff_s < initial_backoff_s:
        raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter must be in [0, 1]")
    return RetryPolicy(
        attempts=attempts,
        initial_backoff_s=initial_backoff_s,
        max_backoff_s=max_backoff_s,
        jitter=jitter,
        max_retry_after_s=max_retry_after_s,
        retry_if=retry_if,
        budget=budget,
        on_retry=on_retry,
    )
