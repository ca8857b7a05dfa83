"""The provider layer's front door: route a request, fall back, retry, all inside one deadline.

::

    async with ProviderRouter(settings) as router:
        resp = await router.complete(ChatRequest(messages=[...], model="auto", tool="chat"))

One call = up to ``attempts`` *passes* over the request's chain (see
:meth:`~exai.providers.registry.ModelRegistry.resolve`). In a pass each (provider, model) is
tried once, in order, until one answers:

* a provider refusing locally (``Retry-After`` hold, RPM/TPM bucket, open breaker) is skipped
  without any network work;
* a retryable failure (5xx, reset, timeout, stall, malformed answer) moves on to the next one;
* an auth failure moves on, and that provider is not tried again in this call;
* a quota-exhausted answer moves on; that provider is held (no request) for its
  ``quota_hold_s``, and the failure alone never starts another pass;
* a bad request (400/404/422, or a request that cannot be sent, such as a prompt that is not
  valid Unicode) ends the call at once: another provider would refuse it too;
* an unusable answer (:class:`~exai.errors.UpstreamAnswerError`: filtered, truncated, too large)
  ends the call at once: the request, not the provider, decides it.

When a pass fails, :func:`exai.resilience.retrying` decides about the next one: it waits at least
the shortest ``retry_after_s`` seen, never sleeps past the deadline, and draws on a shared retry
budget. A pass in which every provider's breaker was open is not retried: the call fails at
once with :class:`~exai.errors.CircuitOpenError` and its ``retry_after_s``.

The deadline is the caller's cancel scope. The router keeps a small margin of it for itself so
that running out of time surfaces as :class:`~exai.errors.DeadlineExceeded` naming what was
tried, instead of a bare cancellation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from exai.config import Settings
from exai.errors import (
    CallerError,
    CircuitOpenError,
    DeadlineExceeded,
    ExaiError,
    NoProviderError,
    RateLimitedError,
    UpstreamAnswerError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.logs import log_event
from exai.providers.health import SharedHealth
from exai.providers.provider import Provider
from exai.providers.registry import ModelRegistry
from exai.providers.transport import Pacer
from exai.providers.types import Attempt, ChatRequest, ChatResponse
from exai.resilience import loop as aio
from exai.resilience.retry import RetryBudget, RetryPolicy, retrying

__all__ = ["ProviderRouter"]

#: Shortest time worth starting a call with.
MIN_CALL_S = 0.005
#: Bound on one provider's ``GET /models`` in :meth:`ProviderRouter.refresh_models`.
REFRESH_MODELS_S = 10.0


def _deadline_margin(remaining: float) -> float:
    """Time kept back from the caller's deadline to report a timeout clearly.

    On a busy machine the event loop may wake only after both deadlines have passed; trio then
    delivers the caller's cancellation (the outer scope wins), which :meth:`ProviderRouter.
    complete` turns into :class:`~exai.errors.DeadlineExceeded` all the same.
    """
    return min(0.25, max(0.01, remaining * 0.05))


def _retry_pass(exc: BaseException) -> bool:
    # Open breakers fail fast; auth and bad requests never get better by retrying.
    return isinstance(
        exc,
        UpstreamRetryableError | UpstreamRateLimited | RateLimitedError | UpstreamMalformedResponse,
    ) and not isinstance(exc, CircuitOpenError)


class _PassFailed:
    """Collects one pass's failures and builds the error that stands for them."""

    def __init__(self) -> None:
        self.errors: list[tuple[Attempt, ExaiError]] = []

    def add(self, attempt: Attempt, exc: ExaiError) -> None:
        self.errors.append((attempt, exc))

    def error(self, what: str) -> ExaiError:
        errs = [e for _, e in self.errors]
        attempts = [a.to_dict() for a, _ in self.errors]
        if len(errs) == 1:
            errs[0].extra.setdefault("attempts", attempts)
            return errs[0]
        summary = "; ".join(
            f"{a.provider}/{a.model}: {a.detail or a.outcome}" for a, _ in self.errors
        )
        hints = [e.retry_after_s for e in errs if e.retry_after_s is not None]
        retry_after = min(hints) if hints else None
        for cls in (UpstreamRetryableError, UpstreamRateLimited, UpstreamMalformedResponse):
            found = [e for e in errs if type(e) is cls]
            if found:
                return cls(
                    f"every provider for {what} failed: {summary}",
                    provider=getattr(found[-1], "provider", None),
                    retry_after_s=retry_after,
                    data={"attempts": attempts},
                )
        if any(isinstance(e, RateLimitedError) for e in errs):
            return RateLimitedError(
                f"every provider for {what} is at its rate limit: {summary}",
                retry_after_s=retry_after,
                data={"attempts": attempts},
            )
        if all(isinstance(e, CircuitOpenError) for e in errs):
            names = ", ".join(e.name for e in errs if isinstance(e, CircuitOpenError))
            err = CircuitOpenError(
                names,
                retry_after if retry_after is not None else 0.0,
                f"every provider for {what} has an open circuit breaker: {summary}",
            )
            err.extra["attempts"] = attempts
            return err
        auth = [e for e in errs if isinstance(e, UpstreamAuthError)]
        if auth:
            return UpstreamAuthError(
                f"every provider for {what} failed: {summary}",
                provider=auth[-1].provider,
                data={"attempts": attempts},
            )
        errs[-1].extra.setdefault("attempts", attempts)
        return errs[-1]


class ProviderRouter:
    """Every configured provider, the model registry, routing, fallbacks and retries.

    Args:
        settings: providers, model classes, default model.
        transports: per provider name, an httpx transport to use instead of the network.
        attempts: passes over the chain per call (1 = no retry).
        retry_budget: shared cap on retries (default: 20 % of calls + 1/s).

    Resource handling:
        ``async with`` opens one bounded ``httpx.AsyncClient`` per configured provider and
        closes them all on exit.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        attempts: int = 3,
        initial_backoff_s: float = 0.2,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self.settings = settings
        transports = transports or {}
        self.providers: dict[str, Provider] = {
            p.name: Provider(
                p, transport=transports.get(p.name), max_answer_bytes=settings.max_answer_bytes
            )
            for p in settings.providers
        }
        self.registry = ModelRegistry(settings, self.providers)
        #: providers the last reload added or gave another ``base_url``: they take effect at
        #: the daemon's restart (``status``: ``daemon.config.not_applied_until_restart``)
        self.needs_restart: list[str] = []
        self._attempts = attempts
        self._initial_backoff_s = initial_backoff_s
        self._budget = retry_budget
        self._policy: RetryPolicy | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        #: set when provider health is shared across daemons (see ``exai.services``)
        self.shared_health: SharedHealth | None = None

    async def __aenter__(self) -> ProviderRouter:
        if self._budget is None:
            self._budget = RetryBudget(ratio=0.2, min_retries_per_s=1.0, window_s=10.0)
        if self._attempts > 1:
            self._policy = retrying(
                attempts=self._attempts,
                initial_backoff_s=self._initial_backoff_s,
                max_backoff_s=5.0,
                retry_if=_retry_pass,
                budget=self._budget,
                on_retry=_log_retry,
            )
        async with contextlib.AsyncExitStack() as stack:
            for p in self.providers.values():
                await stack.enter_async_context(p)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    # -- public API --------------------------------------------------------------------------
    def pace_reads(self, pace: Pacer | None) -> None:
        """Make every provider's reads of an answer take a turn of ``pace`` once their bytes
        are there, before taking them in (``None``: no turn). The daemon passes its
        :class:`~exai.server.pacing.RoundPacer`'s ``reads`` lane, so answers arriving at once
        are taken in bites."""
        for provider in self.providers.values():
            provider.client.pace = pace

    def resolve(
        self,
        model: str | None,
        tool: str = "chat",
        step: str = "single",
        *,
        allow_fallback: bool = True,
    ) -> list[tuple[str, str]]:
        """The (provider, model) chain a call will try. Raises ``NoProviderError``."""
        return self.registry.resolve(model, tool, step, allow_fallback=allow_fallback)

    async def complete(self, req: ChatRequest) -> ChatResponse:
        """Answer ``req`` from the first provider in its chain that can.

        Raises:
            NoProviderError: nothing configured serves the model.
            DeadlineExceeded: the caller's deadline left no time, or ran out (names what was
                tried).
            CircuitOpenError: every provider in the chain has an open breaker
                (``retry_after_s`` says when one will let a probe through).
            UpstreamError: the last pass's failure, when retries are exhausted or would not
                finish before the deadline; ``UpstreamBadRequest`` at once.
            RateLimitedError: every provider refused locally and waiting would not fit.
        """
        chain = self.resolve(req.model, req.tool, req.step, allow_fallback=req.allow_fallback)
        what = req.model if req.model and req.model != "auto" else f"auto/{req.tool}/{req.step}"
        attempts: list[Attempt] = []
        running: list[tuple[str, str]] = []
        now = aio.current_time()
        deadline = aio.current_effective_deadline()
        remaining = deadline - now
        if remaining <= MIN_CALL_S:
            raise DeadlineExceeded(
                f"no time left to call a provider for {what} ({max(remaining, 0) * 1000:.0f} ms "
                "before the deadline)"
            )
        scope = aio.cancel_scope(
            deadline=deadline - _deadline_margin(remaining) if math.isfinite(deadline) else math.inf
        )
        with scope:
            try:
                return await self._with_retries(req, chain, what, attempts, running)
            except anyio.get_cancelled_exc_class():
                # Our deadline has passed, so this is the deadline even when the caller's
                # scope won the race (the loop woke after both): report it as such. Any
                # other cancellation (the caller's, before our deadline) goes on.
                if aio.current_time() < scope.deadline:
                    raise
        tried = "; ".join(f"{a.provider}/{a.model}: {a.outcome}" for a in attempts)
        if running:
            prov, model = running[-1]
            attempts.append(Attempt(prov, model, "timeout", "no answer before the deadline"))
            tried = (tried + "; " if tried else "") + f"{prov}/{model}: no answer in time"
        raise DeadlineExceeded(
            f"the call's deadline ({remaining:.3f}s) passed before a provider answered for "
            f"{what}" + (f" (tried {tried})" if tried else ""),
            data={"attempts": [a.to_dict() for a in attempts]},
        )

    async def _with_retries(
        self,
        req: ChatRequest,
        chain: list[tuple[str, str]],
        what: str,
        attempts: list[Attempt],
        running: list[tuple[str, str]],
    ) -> ChatResponse:
        excluded: set[str] = set()
        try:
            # The first pass runs outside tenacity: a call that succeeds, or fails fast on
            # open breakers, pays nothing for the retry machinery.
            return await self._one_pass(req, chain, what, attempts, excluded, running)
        except Exception as exc:
            if not _retry_pass(exc) or self._policy is None:
                raise
            first: BaseException | None = exc

        async def again() -> ChatResponse:
            nonlocal first
            if first is not None:
                # Hand the first pass's failure to the policy as its attempt 1, so every rule
                # (backoff, Retry-After, deadline, budget) stays in ``retrying``.
                exc, first = first, None
                raise exc
            return await self._one_pass(req, chain, what, attempts, excluded, running)

        return await self._policy.call(again)

    async def _one_pass(
        self,
        req: ChatRequest,
        chain: list[tuple[str, str]],
        what: str,
        attempts: list[Attempt],
        excluded: set[str],
        running: list[tuple[str, str]],
    ) -> ChatResponse:
        failed = _PassFailed()
        for prov_name, model in chain:
            if prov_name in excluded:
                continue
            provider = self.providers[prov_name]
            # Left set when cancelled, so a deadline error can name the call still running.
            running[:] = [(prov_name, model)]
            if req.on_route is not None:
                req.on_route(prov_name, model)
            try:
                resp = await provider.complete(req, model)
            except (CallerError, UpstreamAnswerError) as exc:
                # the request decides these: no other provider, no other pass
                running.clear()
                attempts.append(Attempt(prov_name, model, exc.reason, str(exc)[:200]))
                exc.extra.setdefault("attempts", [a.to_dict() for a in attempts])
                raise
            except (UpstreamError, RateLimitedError, CircuitOpenError) as exc:
                running.clear()
                attempt = Attempt(prov_name, model, exc.reason, str(exc)[:200], exc.retry_after_s)
                attempts.append(attempt)
                failed.add(attempt, exc)
                if isinstance(exc, UpstreamAuthError):
                    excluded.add(prov_name)
                continue
            except Exception:
                running.clear()
                raise
            running.clear()
            attempts.append(Attempt(prov_name, model, "ok"))
            return _with_attempts(resp, attempts)
        if not failed.errors:
            raise NoProviderError(f"no provider left to try for {what}")
        raise failed.error(what)

    async def refresh_models(self) -> dict[str, list[str] | str]:
        """``GET /models`` on every configured provider, concurrently, best effort.

        Each provider gets at most :data:`REFRESH_MODELS_S` (less if the caller's deadline is
        sooner); a failure is reported in the result and the configured models stay.
        """
        out: dict[str, list[str] | str] = {}

        async def one(p: Provider) -> None:
            with aio.move_on_after(REFRESH_MODELS_S) as scope:
                try:
                    out[p.name] = list(await p.refresh_models())
                except ExaiError as exc:
                    out[p.name] = f"error: {exc.reason}"
                    log_event("provider.models", provider=p.name, outcome=exc.reason)
            if scope.cancelled_caught:
                out[p.name] = "error: timeout"

        async with anyio.create_task_group() as tg:
            for p in self.providers.values():
                if p.configured:
                    tg.start_soon(one, p)
        return out

    def share_limits(self, redis: Any) -> None:
        """Enforce each provider's RPM across daemons through ``redis`` (a client with
        awaitable ``evalsha``/``eval``/``script_load``, e.g. the daemon's bridged redis-py)."""
        for p in self.providers.values():
            p.share_limits(
                redis,
                replicas=self.settings.rate_limit_replicas,
                on_redis_error=self.settings.rate_limit_on_redis_error,
                key_prefix=f"{self.settings.redis_key_prefix}bucket:",
            )

    def update_settings(self, settings: Settings) -> None:
        """Take rotated provider keys (and routing) from reloaded settings.

        Keys are read per request, so the next upstream call of each provider uses the new
        one. A provider added or whose ``base_url`` changed needs a restart (logged).
        """
        self.settings = settings
        needs_restart = []
        for new in settings.providers:
            provider = self.providers.get(new.name)
            if provider is None or new.base_url != provider.settings.base_url:
                log_event("provider.reload_needs_restart", provider=new.name)
                needs_restart.append(new.name)
                continue
            provider.settings = new
            provider.client.settings = new
            provider.client.max_answer_bytes = settings.max_answer_bytes
        self.needs_restart = needs_restart
        self.registry.settings = settings

    def metrics_snapshot(self) -> dict[str, Any]:
        """Breakers, buckets and pools for ``/metrics`` (see :mod:`exai.server.metrics`)."""
        buckets: dict[str, dict[str, int]] = {}
        pools: dict[str, dict[str, int]] = {}
        for name, p in self.providers.items():
            for kind, bucket in (("rpm", p.rpm), ("tpm", p.tpm)):
                if bucket is not None:
                    st = bucket.statistics()
                    buckets[f"provider:{name}:{kind}"] = {
                        "waits": st.waited,
                        "rejections": st.rejected,
                    }
            if p.limiter is not None:
                pools[f"provider:{name}"] = {
                    "in_use": int(p.limiter.borrowed_tokens),
                    "size": int(p.limiter.total_tokens),
                }
        return {
            "breakers": [p.breaker.statistics() for p in self.providers.values()],
            "buckets": buckets,
            "pools": pools,
        }

    def status(self) -> dict[str, Any]:
        """Per provider: configured, host, models, breaker, limits and current use."""
        return {
            "providers": {name: p.status() for name, p in self.providers.items()},
            "shared_health": (
                self.shared_health.status() if self.shared_health is not None else None
            ),
            "routing": {
                "default_model": self.settings.default_model,
                "fast_models": list(self.settings.fast_models),
                "quality_models": list(self.settings.quality_models),
            },
        }


def _log_retry(attempt: int, exc: BaseException, sleep_s: float) -> None:
    log_event(
        "provider.retry",
        attempt=attempt,
        sleep_s=round(sleep_s, 3),
        reason=getattr(exc, "reason", type(exc).__name__),
        message=str(exc)[:200],
    )


def _with_attempts(resp: ChatResponse, attempts: list[Attempt]) -> ChatResponse:
    """``attrs.evolve(resp, attempts=tuple(attempts))``, built directly (a third of the time:
    once per answered call; ``tests/providers/test_router.py`` checks every field is carried)."""
    return ChatResponse(
        content=resp.content,
        reasoning=resp.reasoning,
        model=resp.model,
        provider=resp.provider,
        usage=resp.usage,
        attempts=tuple(attempts),
        finish_reason=resp.finish_reason,
        key_fingerprint=resp.key_fingerprint,
        web_search_rounds=resp.web_search_rounds,
    )
