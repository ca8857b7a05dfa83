"""CircuitBreaker: its state machine, driven by trio's MockClock (no real time passes)."""

from __future__ import annotations

from typing import Any

import anyio
import attrs
import pytest
import trio.testing

from exai.errors import CallerError, CircuitOpenError, InvalidParams, UpstreamRetryableError
from exai.resilience import BreakerStatistics, CircuitBreaker


@pytest.fixture
def anyio_backend() -> Any:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class Boom(Exception):
    pass


async def ok() -> str:
    return "ok"


async def fail() -> None:
    raise Boom("dependency failed")


async def take(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "done"


async def failures(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            await breaker.call(fail)


async def successes(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        assert await breaker.call(ok) == "ok"


def make(**kw: Any) -> CircuitBreaker:
    settings: dict[str, Any] = {
        "slow_call_duration_s": 10.0,
        "minimum_calls": 5,
        "window_size": 20,
        "half_open_max_calls": 1,
        "open_duration_s": 10.0,
        "max_open_duration_s": 100.0,
    }
    settings.update(kw)
    return CircuitBreaker("dep", **settings)


# -- opening ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_failures_below_minimum_calls_never_open_the_breaker() -> None:
    breaker = make(minimum_calls=5)
    await failures(breaker, 4)
    assert breaker.state == "closed"
    await failures(breaker, 1)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_opens_when_failure_rate_reaches_threshold_not_before() -> None:
    breaker = make(minimum_calls=10, failure_rate_threshold=0.5)
    await successes(breaker, 6)
    await failures(breaker, 4)  # 4/10
    assert breaker.state == "closed"
    await failures(breaker, 1)  # 5/11
    assert breaker.state == "closed"
    await failures(breaker, 1)  # 6/12 = 50 %
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_opens_on_slow_call_rate_once_minimum_calls_seen() -> None:
    breaker = make(minimum_calls=4, slow_call_duration_s=2.0, slow_call_rate_threshold=0.5)
    assert await breaker.call(take, 3.0) == "done"  # slow but successful
    assert await breaker.call(take, 3.0) == "done"
    assert breaker.state == "closed"  # 2 calls: 100 % slow, but fewer than minimum_calls
    await breaker.call(take, 0.5)
    assert breaker.state == "closed"  # 2/3 slow, still below minimum_calls
    await breaker.call(take, 0.5)
    assert breaker.state == "open"  # 2/4 slow = threshold
    stats = breaker.statistics()
    assert (stats.slow_calls, stats.failures, stats.successes) == (2, 0, 4)


@pytest.mark.anyio
async def test_fast_successes_do_not_open_on_slow_call_rate() -> None:
    breaker = make(minimum_calls=4, slow_call_duration_s=2.0, slow_call_rate_threshold=0.5)
    for _ in range(10):
        await breaker.call(take, 1.0)
    assert breaker.state == "closed"
    assert breaker.statistics().slow_calls == 0


@pytest.mark.anyio
async def test_count_window_judges_only_the_last_n_calls() -> None:
    breaker = make(minimum_calls=4, window_size=4, failure_rate_threshold=0.75)
    await failures(breaker, 2)
    await successes(breaker, 4)  # the two failures slide out of the window
    await failures(breaker, 2)  # 2/4 in the window
    assert breaker.state == "closed"
    await failures(breaker, 1)  # 3/4
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_time_window_forgets_calls_older_than_the_window() -> None:
    breaker = make(window_kind="time", window_size=10.0, minimum_calls=4)
    await failures(breaker, 3)
    await anyio.sleep(11.0)  # those three fall out of the window
    await successes(breaker, 1)
    await failures(breaker, 2)
    assert breaker.state == "closed"  # 2/3 but only 3 calls in the window
    assert breaker.statistics().window_calls == 3
    await failures(breaker, 1)
    assert breaker.state == "open"


# -- open: rejection ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_open_breaker_rejects_with_its_name_and_time_until_half_open() -> None:
    breaker = make(minimum_calls=2, open_duration_s=10.0)
    await failures(breaker, 2)
    await anyio.sleep(4.0)
    called = False

    async def never() -> None:
        nonlocal called
        called = True

    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(never)
    assert not called
    assert info.value.name == "dep"
    assert info.value.retry_after_s == pytest.approx(6.0)
    assert info.value.to_error_data() == {
        "reason": "circuit_open",
        "retry_after_s": 6.0,
        "breaker": "dep",
    }
    with pytest.raises(CircuitOpenError):
        async with breaker:
            pytest.fail("the body of a rejected call must not run")
    assert breaker.statistics().rejections == 2


@pytest.mark.anyio
async def test_open_breaker_turns_half_open_when_its_open_time_ends() -> None:
    breaker = make(minimum_calls=2, open_duration_s=10.0)
    await failures(breaker, 2)
    await anyio.sleep(9.999)
    assert breaker.state == "open"
    await anyio.sleep(0.001)
    assert breaker.state == "half_open"


# -- half-open ----------------------------------------------------------------------------------


async def tripped(**kw: Any) -> CircuitBreaker:
    breaker = make(minimum_calls=2, **kw)
    await failures(breaker, 2)
    assert breaker.state == "open"
    await anyio.sleep(breaker.statistics().retry_after_s)
    assert breaker.state == "half_open"
    return breaker


@pytest.mark.anyio
async def test_half_open_admits_exactly_max_calls_among_50_concurrent_callers() -> None:
    breaker = await tripped(half_open_max_calls=3)
    release = anyio.Event()
    admitted = 0
    rejected = 0

    async def caller() -> None:
        nonlocal admitted, rejected
        try:
            async with breaker:
                admitted += 1
                await release.wait()
        except CircuitOpenError:
            rejected += 1

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(caller)
        await anyio.wait_all_tasks_blocked()
        assert (admitted, rejected) == (3, 47)
        assert breaker.statistics().half_open_in_flight == 3
        release.set()
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_sequential_probes_are_counted_against_the_same_limit() -> None:
    breaker = await tripped(half_open_max_calls=2, failure_rate_threshold=1.0)
    await failures(breaker, 1)  # 1/2 probes failed: below 100 %, undecided
    assert breaker.state == "half_open"
    await successes(breaker, 1)
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_successful_probes_close_the_breaker() -> None:
    breaker = await tripped(half_open_max_calls=2)
    await successes(breaker, 1)
    assert breaker.state == "half_open"  # one probe still owed
    await successes(breaker, 1)
    assert breaker.state == "closed"
    await successes(breaker, 5)  # a fresh window
    assert breaker.statistics().window_calls == 5


@pytest.mark.anyio
async def test_failed_probe_reopens_with_the_open_time_doubled_up_to_the_cap() -> None:
    breaker = await tripped(open_duration_s=10.0, max_open_duration_s=35.0)
    open_times = []
    for _ in range(4):
        await failures(breaker, 1)  # the probe fails
        assert breaker.state == "open"
        stats = breaker.statistics()
        open_times.append(stats.retry_after_s)
        assert stats.current_open_duration_s == stats.retry_after_s
        await anyio.sleep(stats.retry_after_s)
    assert open_times == [20.0, 35.0, 35.0, 35.0]
    assert breaker.statistics().consecutive_trips == 5


@pytest.mark.anyio
async def test_recovery_resets_the_open_time_to_its_base() -> None:
    breaker = await tripped(open_duration_s=10.0)
    await failures(breaker, 1)  # re-trip: 20 s
    await anyio.sleep(20.0)
    await successes(breaker, 1)
    assert breaker.state == "closed"
    await failures(breaker, 2)
    assert breaker.statistics().retry_after_s == 10.0


@pytest.mark.anyio
async def test_slow_probe_reopens_the_breaker() -> None:
    breaker = await tripped(slow_call_duration_s=2.0)
    assert await breaker.call(take, 5.0) == "done"
    assert breaker.state == "open"


# -- what counts --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_calls_count_as_neither_success_nor_failure() -> None:
    breaker = make(minimum_calls=2, slow_call_duration_s=1.0)
    for _ in range(5):
        with anyio.move_on_after(3.0):  # cancelled after the call became slow, too
            async with breaker:
                await anyio.sleep(10.0)
    stats = breaker.statistics()
    assert breaker.state == "closed"
    assert (stats.calls, stats.ignored, stats.failures, stats.successes) == (5, 5, 0, 0)
    assert (stats.slow_calls, stats.window_calls) == (0, 0)


@pytest.mark.anyio
async def test_cancelled_probe_gives_its_slot_back() -> None:
    breaker = await tripped(half_open_max_calls=1)
    with anyio.move_on_after(1.0):
        await breaker.call(take, 5.0)
    assert breaker.state == "half_open"
    await successes(breaker, 1)  # admitted as the probe, and it closes the breaker
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_caller_errors_never_count_by_default() -> None:
    breaker = make(minimum_calls=2)

    async def bad_input() -> None:
        raise InvalidParams("temperature must be <= 1", field="temperature")

    for _ in range(5):
        with pytest.raises(CallerError):
            await breaker.call(bad_input)
    assert breaker.state == "closed"
    assert breaker.statistics().ignored == 5


@pytest.mark.anyio
async def test_record_predicate_decides_which_exceptions_count() -> None:
    breaker = make(minimum_calls=2, record=lambda exc: isinstance(exc, UpstreamRetryableError))
    await failures(breaker, 3)  # Boom does not count
    assert breaker.state == "closed"

    async def upstream_down() -> None:
        raise UpstreamRetryableError("502 from upstream", provider="kimi")

    for _ in range(2):
        with pytest.raises(UpstreamRetryableError):
            await breaker.call(upstream_down)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_outcome_of_a_call_admitted_before_a_trip_is_ignored() -> None:
    breaker = make(minimum_calls=2)
    release = anyio.Event()

    async def slow_success() -> None:
        async with breaker:
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow_success)
        await anyio.wait_all_tasks_blocked()
        await failures(breaker, 2)
        assert breaker.state == "open"
        await anyio.sleep(10.0)
        assert breaker.state == "half_open"
        release.set()  # the old call succeeds: it is not a probe and decides nothing
    assert breaker.state == "half_open"
    assert breaker.statistics().successes == 1


# -- open_until ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_open_until_holds_a_closed_breaker_open_for_that_long() -> None:
    breaker = make()
    breaker.open_until(30.0)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(ok)
    assert info.value.retry_after_s == pytest.approx(30.0)
    await anyio.sleep(29.9)
    assert breaker.state == "open"
    await anyio.sleep(0.1)
    assert breaker.state == "half_open"


@pytest.mark.anyio
async def test_open_until_extends_an_open_breaker_but_never_shortens_it() -> None:
    breaker = make(minimum_calls=2, open_duration_s=10.0)
    await failures(breaker, 2)
    breaker.open_until(3.0)
    assert breaker.statistics().retry_after_s == pytest.approx(10.0)
    breaker.open_until(60.0)
    assert breaker.statistics().retry_after_s == pytest.approx(60.0)


@pytest.mark.anyio
async def test_open_until_is_not_a_trip() -> None:
    breaker = make(minimum_calls=2, open_duration_s=10.0)
    breaker.open_until(5.0)
    await anyio.sleep(5.0)
    await failures(breaker, 1)  # the probe fails: the first real trip
    assert breaker.statistics().retry_after_s == pytest.approx(10.0)
    assert breaker.statistics().trips == 1


# -- observability and API ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_on_transition_reports_every_state_change() -> None:
    seen: list[tuple[str, str, str]] = []
    breaker = make(minimum_calls=2, on_transition=lambda *change: seen.append(change))
    await failures(breaker, 2)
    await anyio.sleep(10.0)
    await successes(breaker, 1)
    assert seen == [
        ("dep", "closed", "open"),
        ("dep", "open", "half_open"),
        ("dep", "half_open", "closed"),
    ]
    assert breaker.statistics().transitions == 3


@pytest.mark.anyio
async def test_statistics_is_a_frozen_snapshot() -> None:
    breaker = make(minimum_calls=5)
    await successes(breaker, 3)
    await failures(breaker, 1)
    stats = breaker.statistics()
    assert isinstance(stats, BreakerStatistics)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.calls = 0  # type: ignore[misc]
    await successes(breaker, 1)
    assert stats.calls == 4  # unchanged by later calls
    assert (stats.window_calls, stats.window_failures, stats.failure_rate) == (4, 1, 0.25)
    assert (stats.state, stats.retry_after_s, stats.current_open_duration_s) == (
        "closed",
        0.0,
        10.0,
    )


@pytest.mark.anyio
async def test_call_passes_positional_arguments_and_returns_the_result() -> None:
    breaker = make()

    async def add(a: int, b: int) -> int:
        return a + b

    assert await breaker.call(add, 2, 3) == 5


@pytest.mark.anyio
async def test_async_with_lets_the_body_error_through_unwrapped() -> None:
    breaker = make()
    error = Boom("original")
    with pytest.raises(Boom) as info:
        async with breaker:
            raise error
    assert info.value is error
    assert breaker.statistics().failures == 1


@pytest.mark.anyio
async def test_nested_use_of_one_breaker_in_one_task_settles_each_call() -> None:
    breaker = make(minimum_calls=10)
    with pytest.raises(Boom):
        async with breaker:
            async with breaker:
                pass
            raise Boom("outer")
    stats = breaker.statistics()
    assert (stats.calls, stats.successes, stats.failures) == (2, 1, 1)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_rate_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", window_kind="sliding")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CircuitBreaker("x", open_duration_s=10, max_open_duration_s=5)
