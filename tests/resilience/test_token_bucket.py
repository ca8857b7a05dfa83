"""TokenBucket: unit behaviour under trio's MockClock, and hypothesis properties.

The properties run each example in its own ``trio.run`` with a ``MockClock``, so simulated
minutes cost milliseconds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from exai.resilience import TokenBucket


@pytest.fixture
def anyio_backend() -> Any:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


def run_mock(fn: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with trio.fail_after(1e7):  # mock seconds: a stuck waiter fails instead of hanging
            return await fn()

    return trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


@contextlib.asynccontextmanager
async def bounded_task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group that fails (on the mock clock) instead of hanging if a waiter gets stuck."""
    with anyio.fail_after(100):
        async with anyio.create_task_group() as tg:
            yield tg


def slack(rate: float) -> float:
    # What the bucket may round in a request's favour: a microsecond's worth of refill.
    return 1e-9 + rate * 1e-6 + 1e-9


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- unit behaviour -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_starts_full_and_try_acquire_reports_the_exact_wait() -> None:
    bucket = TokenBucket(rate_per_s=2.0, capacity=4)
    assert [bucket.try_acquire() for _ in range(4)] == [0.0] * 4
    assert bucket.try_acquire() == pytest.approx(0.5)
    assert bucket.try_acquire(3) == pytest.approx(1.5)
    await anyio.sleep(0.5)
    assert bucket.try_acquire() == 0.0
    stats = bucket.statistics()
    assert (stats.admitted, stats.admitted_cost, stats.rejected) == (5, 5.0, 2)


@pytest.mark.anyio
async def test_acquire_waits_exactly_until_the_tokens_are_refilled() -> None:
    bucket = TokenBucket(rate_per_s=10.0, capacity=10)
    await bucket.acquire(10)
    start = anyio.current_time()
    await bucket.acquire(4)
    assert anyio.current_time() - start == pytest.approx(0.4)


@pytest.mark.anyio
async def test_refill_stops_at_capacity() -> None:
    bucket = TokenBucket(rate_per_s=100.0, capacity=5)
    await anyio.sleep(60.0)
    assert bucket.statistics().tokens == 5.0


@pytest.mark.anyio
async def test_a_cost_larger_than_capacity_is_refused_at_once() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=5)
    with pytest.raises(ValueError, match="capacity"):
        await bucket.acquire(6)
    with pytest.raises(ValueError):
        bucket.try_acquire(-1)
    with pytest.raises(ValueError):
        bucket.refund(-1)


@pytest.mark.anyio
async def test_try_acquire_does_not_jump_the_queue() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=10)
    await bucket.acquire(10)
    async with bounded_task_group() as tg:
        tg.start_soon(bucket.acquire, 5)
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(4.0)  # 4 tokens: not enough for the waiter, enough for 1
        assert bucket.try_acquire(1) == pytest.approx(2.0)  # after the waiter's 5, then its own
    assert anyio.current_time() == pytest.approx(5.0)


@pytest.mark.anyio
async def test_a_large_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    bucket = TokenBucket(rate_per_s=10.0, capacity=10)
    await bucket.acquire(10)
    admitted_at: dict[str, float] = {}

    async def big() -> None:
        await bucket.acquire(10)
        admitted_at["big"] = anyio.current_time()

    async def small_stream() -> None:
        while anyio.current_time() < 5.0:
            await bucket.acquire(1)
            admitted_at.setdefault("first small after big", anyio.current_time())

    async with bounded_task_group() as tg:
        tg.start_soon(big)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(small_stream)
    assert admitted_at["big"] == pytest.approx(1.0)
    assert admitted_at["first small after big"] == pytest.approx(1.1)


@pytest.mark.anyio
async def test_refund_returns_tokens_and_lets_the_head_waiter_go_sooner() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=100)
    await bucket.acquire(100)  # reserve an estimate of 100 tokens
    done_at = math.nan

    async def waiter() -> None:
        nonlocal done_at
        await bucket.acquire(30)
        done_at = anyio.current_time()

    async with bounded_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        await anyio.sleep(2.0)
        bucket.refund(60)  # the call used 40
    assert done_at == pytest.approx(2.0)
    assert bucket.statistics().tokens == pytest.approx(32.0)
    assert bucket.statistics().admitted_cost == pytest.approx(70.0)


@pytest.mark.anyio
async def test_refund_never_fills_above_capacity() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=10)
    bucket.try_acquire(2)
    bucket.refund(5)
    assert bucket.statistics().tokens == 10.0


@pytest.mark.anyio
async def test_a_cancelled_waiter_takes_nothing_and_the_next_one_moves_up_at_once() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=10)
    await bucket.acquire(10)
    admitted_at: dict[str, float] = {}

    async def waiter(name: str, cost: float, give_up_after: float = math.inf) -> None:
        with anyio.move_on_after(give_up_after):
            await bucket.acquire(cost)
            admitted_at[name] = anyio.current_time()

    async with bounded_task_group() as tg:
        tg.start_soon(waiter, "big", 10, 3.0)  # at the head, waiting for 10 s
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "small", 2)
        await anyio.wait_all_tasks_blocked()
    # big gave up at t=3 holding nothing; small had 3 tokens there and went at once
    assert admitted_at == {"small": pytest.approx(3.0)}
    assert bucket.statistics().tokens == pytest.approx(1.0)
    assert bucket.statistics().waiters == 0


# -- properties ---------------------------------------------------------------------------------

rates = st.floats(min_value=0.5, max_value=1000.0)
capacities = st.integers(min_value=1, max_value=50)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[float, float, list[tuple[float, float, str, float]]]:
    rate = draw(rates)
    capacity = float(draw(capacities))
    n = draw(st.integers(min_value=1, max_value=40))
    ops = []
    for _ in range(n):
        gap = draw(st.floats(min_value=0.0, max_value=3.0)) * capacity / rate / 4
        cost = draw(st.floats(min_value=0.01, max_value=1.0)) * capacity
        kind = draw(st.sampled_from(["try", "acquire"]))
        patience = draw(st.floats(min_value=0.0, max_value=2.0)) * capacity / rate
        ops.append((gap, cost, kind, patience))
    return rate, capacity, ops


@PROPERTY
@given(schedules())
def test_admitted_cost_over_any_interval_stays_within_capacity_plus_rate_times_length(
    schedule: tuple[float, float, list[tuple[float, float, str, float]]],
) -> None:
    rate, capacity, ops = schedule
    admitted: list[tuple[float, float]] = []

    async def main() -> None:
        bucket = TokenBucket(rate, capacity)

        async def waiter(cost: float, patience: float) -> None:
            with anyio.move_on_after(patience):
                await bucket.acquire(cost)
                admitted.append((anyio.current_time(), cost))

        async with anyio.create_task_group() as tg:
            for gap, cost, kind, patience in ops:
                await anyio.sleep(gap)
                if kind == "try":
                    if bucket.try_acquire(cost) == 0.0:
                        admitted.append((anyio.current_time(), cost))
                else:
                    tg.start_soon(waiter, cost, patience)

    run_mock(main)
    admitted.sort()
    for i, (start, _) in enumerate(admitted):
        total = 0.0
        for end, cost in admitted[i:]:
            total += cost
            assert total <= capacity + rate * (end - start) + slack(rate) + 1e-9 * total


@PROPERTY
@given(
    rate=rates,
    capacity=capacities,
    cost_share=st.floats(min_value=0.01, max_value=1.0),
    clients=st.integers(min_value=1, max_value=8),
)
def test_steady_demand_above_the_rate_is_admitted_at_the_rate_within_one_percent(
    rate: float, capacity: int, cost_share: float, clients: int
) -> None:
    cost = capacity * cost_share
    duration = 400 * cost / rate  # long enough for ~400 admissions after the burst
    burst_over = capacity / rate
    admitted_after_burst = 0.0

    async def main() -> None:
        bucket = TokenBucket(rate, capacity)

        async def waiting_client() -> None:
            nonlocal admitted_after_burst
            while True:
                await bucket.acquire(cost)
                if anyio.current_time() > burst_over:
                    admitted_after_burst += cost

        async def polling_client() -> None:
            nonlocal admitted_after_burst
            while True:
                wait = bucket.try_acquire(cost)
                if wait == 0.0:
                    if anyio.current_time() > burst_over:
                        admitted_after_burst += cost
                    await anyio.lowlevel.checkpoint()
                else:
                    await anyio.sleep(wait)

        with anyio.move_on_after(burst_over + duration):
            async with anyio.create_task_group() as tg:
                for i in range(clients):
                    tg.start_soon(waiting_client if i % 2 == 0 else polling_client)

    run_mock(main)
    assert admitted_after_burst / duration == pytest.approx(rate, rel=0.01)


@st.composite
def queues(draw: st.DrawFn) -> tuple[float, float, list[tuple[float, float]]]:
    rate = draw(rates)
    capacity = float(draw(capacities))
    n = draw(st.integers(min_value=1, max_value=30))
    waiters = []
    for _ in range(n):
        cost = draw(st.floats(min_value=0.01, max_value=1.0)) * capacity
        gives_up = draw(st.booleans())
        patience = draw(st.floats(min_value=0.001, max_value=float(n))) * capacity / rate
        waiters.append((cost, patience if gives_up else math.inf))
    return rate, capacity, waiters


def ideal_fifo(rate: float, capacity: float, waiters: list[tuple[float, float]]) -> list[float]:
    """When each waiter (all queued at t=0, in order) is admitted by an ideal FIFO bucket whose
    cancelled waiters take nothing and leave at once; ``nan`` for one that gives up."""
    t, tokens, result = 0.0, capacity, []
    for cost, deadline in waiters:
        # Too close to call: the real bucket's rounding may go either way.
        assume(abs(deadline - t) > 1e-6 * (1 + t))
        if deadline < t:  # gave up before reaching the head
            result.append(math.nan)
            continue
        ready = t + max(0.0, cost - tokens) / rate
        assume(abs(deadline - ready) > 1e-6 * (1 + ready))
        if deadline < ready:  # gave up at the head
            tokens = min(capacity, tokens + (deadline - t) * rate)
            t = deadline
            result.append(math.nan)
        else:
            tokens = min(capacity, tokens + (ready - t) * rate) - cost
            t = ready
            result.append(ready)
    return result


@PROPERTY
@given(queues())
def test_cancelled_waiters_lose_nothing_block_nobody_and_order_is_fifo(
    queue: tuple[float, float, list[tuple[float, float]]],
) -> None:
    """Every admission happens exactly when an ideal FIFO bucket admits it: a waiter that gives
    up takes no tokens (later ones are not delayed) and stops blocking the queue at once."""
    rate, capacity, waiters = queue
    expected = ideal_fifo(rate, capacity, waiters)
    actual = [math.nan] * len(waiters)

    async def main() -> None:
        bucket = TokenBucket(rate, capacity)

        async def waiter(
            i: int, cost: float, patience: float, *, task_status: anyio.abc.TaskStatus[None]
        ) -> None:
            with anyio.move_on_after(patience):
                task_status.started()  # the parent resumes only after we are queued
                await bucket.acquire(cost)
                actual[i] = anyio.current_time()

        async with anyio.create_task_group() as tg:
            for i, (cost, patience) in enumerate(waiters):
                await tg.start(waiter, i, cost, patience)
            assert anyio.current_time() == 0.0

    run_mock(main)
    for got, want in zip(actual, expected, strict=True):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
