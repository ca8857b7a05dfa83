"""retrying and RetryBudget under trio's MockClock."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio.testing

from exai.errors import (
    CircuitOpenError,
    InvalidParams,
    UpstreamAuthError,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.resilience import RetryBudget, retrying


@pytest.fixture
def anyio_backend() -> Any:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class Flaky:
    """Fails with the given errors in turn, then succeeds; records when each attempt started."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.attempts: list[float] = []

    async def __call__(self) -> str:
        self.attempts.append(anyio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def down(n: int = 1) -> list[BaseException]:
    return [UpstreamRetryableError("502", provider="kimi") for _ in range(n)]


@pytest.mark.anyio
async def test_retries_retryable_errors_until_success() -> None:
    flaky = Flaky(*down(2))
    assert await retrying(attempts=3).call(flaky) == "ok"
    assert len(flaky.attempts) == 3


@pytest.mark.anyio
async def test_async_for_form_retries_the_block() -> None:
    flaky = Flaky(*down(1))
    async for attempt in retrying(attempts=3):
        with attempt:
            result = await flaky()
    assert result == "ok"
    assert len(flaky.attempts) == 2


@pytest.mark.anyio
async def test_gives_up_after_the_last_attempt_with_the_last_error() -> None:
    errors = down(3)
    flaky = Flaky(*errors)
    with pytest.raises(UpstreamRetryableError) as info:
        await retrying(attempts=3).call(flaky)
    assert info.value is errors[2]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        UpstreamAuthError("401", provider="kimi"),
        InvalidParams("bad", field="model"),
        ValueError("a bug"),
    ],
)
async def test_does_not_retry_errors_that_are_not_retryable(error: Exception) -> None:
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        await retrying(attempts=5).call(flaky)
    assert len(flaky.attempts) == 1


@pytest.mark.anyio
async def test_retry_if_predicate_replaces_the_default() -> None:
    flaky = Flaky(ValueError("flaky"))
    policy = retrying(attempts=2, retry_if=lambda exc: isinstance(exc, ValueError))
    assert await policy.call(flaky) == "ok"


@pytest.mark.anyio
async def test_backoff_grows_exponentially_with_jitter_inside_its_bounds() -> None:
    flaky = Flaky(*down(4))
    await retrying(attempts=5, initial_backoff_s=1.0, max_backoff_s=3.0, jitter=0.5).call(flaky)
    gaps = [b - a for a, b in zip(flaky.attempts, flaky.attempts[1:], strict=False)]
    ceilings = [1.0, 2.0, 3.0, 3.0]
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        assert ceiling * 0.5 <= gap <= ceiling


@pytest.mark.anyio
async def test_waits_at_least_the_errors_retry_after() -> None:
    limited = UpstreamRateLimited("429", provider="glm", retry_after_s=7.5)
    flaky = Flaky(limited)
    await retrying(attempts=2, initial_backoff_s=0.1).call(flaky)
    assert flaky.attempts[1] - flaky.attempts[0] == pytest.approx(7.5)


@pytest.mark.anyio
async def test_gives_up_rather_than_honour_a_retry_after_above_the_cap() -> None:
    flaky = Flaky(CircuitOpenError("provider:kimi", 300.0))
    with pytest.raises(CircuitOpenError):
        await retrying(attempts=3, max_retry_after_s=60.0).call(flaky)
    assert len(flaky.attempts) == 1


@pytest.mark.anyio
async def test_never_sleeps_past_the_deadline_and_fails_with_the_last_error_early() -> None:
    limited = UpstreamRateLimited("429", provider="glm", retry_after_s=5.0)
    flaky = Flaky(*down(1), limited, *down(5))
    start = anyio.current_time()
    with anyio.fail_after(6.0), pytest.raises(UpstreamRateLimited) as info:
        await retrying(attempts=10, initial_backoff_s=1.0, jitter=0.0).call(flaky)
    # attempt 1 at 0, attempt 2 at 1 s; a 5 s wait would end at 6 s = the deadline: give up now
    assert info.value is limited
    assert anyio.current_time() - start == pytest.approx(1.0)
    assert len(flaky.attempts) == 2


@pytest.mark.anyio
async def test_does_not_give_up_while_a_retry_still_fits_in_the_deadline() -> None:
    flaky = Flaky(*down(2))
    with anyio.fail_after(3.5):
        await retrying(attempts=3, initial_backoff_s=1.0, jitter=0.0).call(flaky)
    assert len(flaky.attempts) == 3  # slept 1 s + 2 s, inside 3.5 s


@pytest.mark.anyio
async def test_cancellation_is_never_retried() -> None:
    calls = 0

    async def hangs() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep_forever()

    with anyio.move_on_after(1.0) as scope:
        await retrying(attempts=5).call(hangs)
    assert scope.cancelled_caught
    assert calls == 1


# -- the budget ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_budget_caps_retries_at_a_fraction_of_recent_calls() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.0, window_s=10.0)
    policy = retrying(attempts=3, initial_backoff_s=0.0, budget=budget)
    attempts = 0

    async def always_down() -> None:
        nonlocal attempts
        attempts += 1
        raise UpstreamRetryableError("503", provider="kimi")

    for _ in range(10):
        with pytest.raises(UpstreamRetryableError):
            await policy.call(always_down)
    # 10 calls earn 2 retries; without a budget it would have been 20
    assert attempts == 12
    stats = budget.statistics()
    assert (stats.calls, stats.retries) == (10, 2)
    assert stats.refused == 10  # 8 calls refused their first retry, 2 their second


@pytest.mark.anyio
async def test_budget_keeps_a_minimum_of_retries_per_second_when_traffic_is_low() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_s=0.5, window_s=10.0)  # 5 per window
    assert [budget.try_spend() for _ in range(6)] == [True] * 5 + [False]


@pytest.mark.anyio
async def test_budget_forgets_calls_and_retries_older_than_its_window() -> None:
    budget = RetryBudget(ratio=0.5, min_retries_per_s=0.0, window_s=10.0)
    for _ in range(4):
        budget.record_call()
    assert budget.try_spend() and budget.try_spend()
    assert not budget.try_spend()
    await anyio.sleep(10.0)
    assert budget.statistics().calls == 0
    assert not budget.try_spend()
    budget.record_call()
    budget.record_call()
    assert budget.try_spend()


@pytest.mark.anyio
async def test_one_policy_serves_concurrent_calls_independently() -> None:
    policy = retrying(attempts=2, initial_backoff_s=1.0)
    results = []

    async def one() -> None:
        results.append(await policy.call(Flaky(*down(1))))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert results == ["ok"] * 10


@pytest.mark.anyio
async def test_on_retry_hears_each_retry_before_its_sleep() -> None:
    heard: list[tuple[int, str, float]] = []
    flaky = Flaky(*down(2))
    policy = retrying(
        attempts=3,
        initial_backoff_s=1.0,
        jitter=0.0,
        on_retry=lambda n, exc, sleep_s: heard.append((n, type(exc).__name__, sleep_s)),
    )
    await policy.call(flaky)
    assert heard == [(1, "UpstreamRetryableError", 1.0), (2, "UpstreamRetryableError", 2.0)]
