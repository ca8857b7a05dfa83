"""Decision cost per call of the resilience primitives, against anyio's CapacityLimiter.

Every guarded call pays for a breaker check and record and a bucket check. This scenario
measures that cost in nanoseconds per call, in one process and one event loop, next to the
cheapest guard anyio itself offers (``CapacityLimiter`` acquire/release) measured in the same
run as the floor, and reports the ratios. Operations are measured in rounds, round-robin, so
that drift in the machine's speed hits all of them alike; the median of the rounds is reported.

Operations (each one iteration of a tight loop of n):

* ``limiter_acquire_release``: ``await limiter.acquire(); limiter.release()`` (the floor).
* ``breaker_async_with``: ``async with breaker: pass`` on a closed breaker (admit + record).
* ``breaker_call``: ``await breaker.call(noop)`` (the same, plus calling a coroutine).
* ``bucket_try_acquire``: ``bucket.try_acquire()`` on a bucket that always admits.
* ``bucket_acquire``: ``await bucket.acquire()`` on the same (with its two checkpoints).
* ``empty_loop``: the loop with ``await noop()`` only, for scale.

Both backends are measured: trio (the daemon's) and asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from benchmarks.common import summarize
from exai.resilience import CircuitBreaker, TokenBucket

NAME = "resilience"
DESCRIPTION = (
    "ns per call of breaker allow+record and bucket try_acquire, against a bare "
    "anyio.CapacityLimiter acquire/release measured in the same run (ratios reported)"
)

FLOOR = "limiter_acquire_release"
OPS = (
    "limiter_acquire_release",
    "breaker_async_with",
    "breaker_call",
    "bucket_try_acquire",
    "bucket_acquire",
    "empty_loop",
)


async def _noop() -> None:
    pass


def _loops() -> dict[str, Callable[[int], Awaitable[None]]]:
    limiter = anyio.CapacityLimiter(1)
    breaker = CircuitBreaker("bench", slow_call_duration_s=60.0, minimum_calls=10, window_size=100)
    # Refills faster than any loop can drain it: every request is admitted.
    bucket = TokenBucket(rate_per_s=1e15, capacity=1e12)

    async def limiter_acquire_release(n: int) -> None:
        for _ in range(n):
            await limiter.acquire()
            limiter.release()

    async def breaker_async_with(n: int) -> None:
        for _ in range(n):
            async with breaker:
                pass

    async def breaker_call(n: int) -> None:
        for _ in range(n):
            await breaker.call(_noop)

    async def bucket_try_acquire(n: int) -> None:
        try_acquire = bucket.try_acquire
        for _ in range(n):
            if try_acquire():
                raise AssertionError("the benchmark bucket refused a request")

    async def bucket_acquire(n: int) -> None:
        for _ in range(n):
            await bucket.acquire()

    async def empty_loop(n: int) -> None:
        for _ in range(n):
            await _noop()

    loops = {
        "limiter_acquire_release": limiter_acquire_release,
        "breaker_async_with": breaker_async_with,
        "breaker_call": breaker_call,
        "bucket_try_acquire": bucket_try_acquire,
        "bucket_acquire": bucket_acquire,
        "empty_loop": empty_loop,
    }
    assert tuple(loops) == OPS
    return loops


async def _measure(n: int, rounds: int) -> dict[str, Any]:
    loops = _loops()
    for loop in loops.values():  # warm up caches and the backend lookups
        await loop(min(n, 10_000))
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            t0 = time.perf_counter_ns()
            await loop(n)
            samples[name].append((time.perf_counter_ns() - t0) / n)
    ns = {name: summarize(values) for name, values in samples.items()}
    floor = ns[FLOOR]["median"]
    return {
        "ns_per_op": ns,
        "ratio_to_limiter": {
            name: round(ns[name]["median"] / floor, 3) for name in loops if name != FLOOR
        },
    }


def run(full: bool) -> dict[str, Any]:
    n = 1_000_000 if full else 100_000
    rounds = 7 if full else 5
    figures: dict[str, Any] = {
        "settings": {
            "ops_per_round": n,
            "rounds": rounds,
            "statistic": "median of rounds (min and max also given)",
            "floor": FLOOR,
            "breaker": "closed, count window 100, minimum_calls 10",
            "bucket": "rate 1e15/s, capacity 1e12 (always admits)",
        }
    }
    for backend in ("trio", "asyncio"):
        figures[backend] = anyio.run(_measure, n, rounds, backend=backend)
    return figures


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--full" in sys.argv), indent=2))
