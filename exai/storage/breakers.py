"""The breakers in front of the stores: how they are made (:func:`store_breaker`) and how the
service hears that one closed (:func:`on_close`: the replay of the spool starts on that
transition, not on a poll)."""

from __future__ import annotations

from exai.config import Settings
from exai.resilience import CircuitBreaker
from exai.resilience.backoff import Wakeup

__all__ = ["on_close", "store_breaker"]


def store_breaker(name: str, settings: Settings) -> CircuitBreaker:
    """The default breaker in front of a store: opens at a 50 % failure rate over the last 10
    calls (after 4), or when every call of the window took ``store_timeout_s``; open 1 s at
    first, doubling to 30 s."""
    return CircuitBreaker(
        name,
        failure_rate_threshold=0.5,
        slow_call_rate_threshold=1.0,
        slow_call_duration_s=settings.store_timeout_s,
        minimum_calls=4,
        window_size=10,
        half_open_max_calls=1,
        open_duration_s=1.0,
        max_open_duration_s=30.0,
    )


def on_close(breaker: CircuitBreaker, wakeup: Wakeup) -> None:
    """Chain a breaker's transition hook so ``wakeup`` is set when it closes."""
    previous = breaker.on_transition

    def hook(name: str, old: str, new: str) -> None:
        if previous is not None:
            previous(name, old, new)  # type: ignore[arg-type]
        if new == "closed":
            wakeup.set()

    breaker.on_transition = hook
