"""Resilience primitives that guard every external call, usable on their own.

Written against anyio, so they run under trio and asyncio; time is read only through the event
loop (``anyio.current_time()``), so a trio ``MockClock`` drives them in tests.

* :class:`CircuitBreaker`: fail fast while a dependency is unhealthy (closed / open / half-open).
* :class:`TokenBucket`: admit a cost at a rate with bursts, FIFO waiters, refunds.
* :class:`RedisTokenBucket`: the same contract shared by many processes through one Redis key;
  :class:`RedisBucketGroup` reserves several in one round trip, refunds riding along.
* :func:`retrying` and :class:`RetryBudget`: bounded retries that honour ``Retry-After`` and the
  caller's deadline.
* :class:`Backoff` and :func:`drain_loop`: the shape of every background retry loop (a pass
  that completed nothing always waits, at least the breaker's retry time).

Errors come from :mod:`exai.errors`: :class:`~exai.errors.CircuitOpenError` and
:class:`~exai.errors.RateLimiterUnavailableError`.
"""

from __future__ import annotations

from .backoff import Backoff, DrainStatistics, Wakeup, drain_loop
from .breaker import BreakerState, BreakerStatistics, CircuitBreaker, count_unless_caller_error
from .bucket import TokenBucket, TokenBucketStatistics
from .redis_bucket import (
    GCRA_GROUP_SCRIPT,
    GCRA_SCRIPT,
    RedisBucketGroup,
    RedisLike,
    RedisTokenBucket,
    is_redis_unreachable,
)
from .retry import RetryBudget, RetryBudgetStatistics, RetryPolicy, is_retryable, retrying

__all__ = [
    "GCRA_GROUP_SCRIPT",
    "GCRA_SCRIPT",
    "Backoff",
    "BreakerState",
    "BreakerStatistics",
    "CircuitBreaker",
    "DrainStatistics",
    "RedisBucketGroup",
    "RedisLike",
    "RedisTokenBucket",
    "RetryBudget",
    "RetryBudgetStatistics",
    "RetryPolicy",
    "TokenBucket",
    "TokenBucketStatistics",
    "Wakeup",
    "count_unless_caller_error",
    "drain_loop",
    "is_redis_unreachable",
    "is_retryable",
    "retrying",
]
