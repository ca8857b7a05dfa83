"""One provider: token buckets → circuit breaker → concurrency limiter → connection pool.

A call passes the stages in that order; each can refuse it before any byte leaves:

1. the ``Retry-After`` hold (set by the last 429) and the requests-per-minute bucket;
2. the tokens-per-minute bucket, charged with an *estimate* before the call and settled with the
   usage the provider reports after it (refund of the unused part; an overrun is carried as a
   debt into the next reservation, so the limit holds over time without letting the bucket go
   negative);
3. the circuit breaker (``provider:<name>``);
4. a ``CapacityLimiter`` of ``max_concurrency`` slots (a free one is taken without a scheduler
   round: ``async with limiter`` yields to the loop even when a slot is free, and at
   concurrency 1 every round the call's task waits costs CPU — issue 18);
5. the HTTP/1.1 pool of ``pool_max`` connections (:class:`~exai.providers.client.OpenAIClient`
   over :class:`~exai.providers.transport.H11Pool`).

Across daemons (:meth:`Provider.share_limits`, :mod:`exai.providers.health`): with Redis, the
RPM and TPM buckets are shared by every daemon of the deployment (the TPM one reserve-then-settle:
an overrun is charged to the shared bucket, which goes into debt that every daemon waits out),
and a provider closed on one daemon — breaker trip, ``Retry-After``, exhausted quota — is held
closed on the others from what they read in the background (never on a call).

What the breaker counts (``breaker_records``): only the provider's own failures — a retryable
upstream failure (5xx, reset, timeout, stall, an answer that broke off or never finished) and a
malformed answer. Everything else counts as neither: a 429 holds the breaker open
(``open_until``) and the provider refuses calls locally until ``Retry-After`` has passed; a
"quota exhausted" answer holds it for ``quota_hold_s``; auth failures (401/403) say the key is
wrong, not that the provider is down (a breaker tripped by them would keep failing calls for up
to ``breaker_max_open_s`` after the key was fixed); a filtered, truncated or too large answer is
about the request. Anything the *request* caused — a :class:`~exai.errors.CallerError` such as a
prompt that is not valid Unicode, refused before any upstream call — and any bug of exai's own
never counts: one client's bad input must not take a shared provider away from everyone.
Cancellation counts as neither.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import anyio
import attrs
import httpx

from exai.config import ProviderSettings
from exai.errors import (
    CircuitOpenError,
    InvalidParams,
    RateLimitedError,
    RateLimiterUnavailableError,
    UpstreamMalformedResponse,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRetryableError,
)
from exai.logs import log_event
from exai.providers import tokens
from exai.providers.client import OpenAIClient, host_of
from exai.providers.dialects import dialect_for
from exai.providers.types import ChatRequest, ChatResponse, StreamDelta, Usage, unencodable_field
from exai.resilience import loop as aio
from exai.resilience.breaker import CircuitBreaker
from exai.resilience.bucket import TokenBucket
from exai.resilience.redis_bucket import RedisBucketGroup, RedisTokenBucket

__all__ = ["DEFAULT_OUTPUT_ESTIMATE", "Provider", "breaker_records", "estimate_tokens"]

#: Output tokens reserved when the request sets no ``max_output_tokens``.
DEFAULT_OUTPUT_ESTIMATE = 1024


async def _take_slot(limiter: anyio.CapacityLimiter) -> None:
    """Take one of ``limiter``'s slots: a free one at once (after a cancellation check, as
    ``acquire`` makes), otherwise wait for one in its FIFO. The caller releases it."""
    await aio.checkpoint_if_cancelled()
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        await limiter.acquire()


def breaker_records(exc: BaseException) -> bool:
    """Whether the provider breaker counts ``exc`` as a failure (see the module docstring).

    An allow-list: only upstream outcomes that say the provider is unwell count, so a new kind
    of error (or a bug) can never open a shared breaker by accident.
    """
    return isinstance(exc, UpstreamRetryableError | UpstreamMalformedResponse)


def estimate_tokens(messages: Any, max_output_tokens: int | None) -> int:
    """What a request may cost against a TPM budget: its messages as sent
    (:func:`exai.providers.tokens.estimate`, plus a little for the envelope) and the output
    cap."""
    text = _ESTIMATE_ENCODER.encode(messages)
    return tokens.estimate(text) + 8 + (max_output_tokens or DEFAULT_OUTPUT_ESTIMATE)


#: (one encoder, made once: ``json.dumps`` with any option builds a new one per call)
_ESTIMATE_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def _usage_of(completion: dict[str, Any], sent_chars: int, got_chars: int) -> Usage:
    u = completion.get("usage")
    if isinstance(u, dict):
        try:
            p = int(u.get("prompt_tokens") or 0)
            c = int(u.get("completion_tokens") or 0)
            t = int(u.get("total_tokens") or (p + c))
            return Usage(p, c, t)
        except (TypeError, ValueError):
            pass
    p, c = tokens.for_chars(sent_chars), tokens.for_chars(got_chars)
    return Usage(p, c, p + c, estimated=True)


@attrs.define
class _Counters:
    requests: int = 0  # HTTP requests sent
    ok: int = 0
    failed: int = 0
    refused: int = 0  # refused locally (hold, buckets, breaker)
    tpm_reserved: float = 0.0
    tpm_settled: float = 0.0
    tpm_debt: float = 0.0
    #: tokens a shared settlement could not move (Redis unreachable, fail-closed)
    tpm_unsettled: float = 0.0
    last_error: dict[str, Any] | None = None


class Provider:
    """One LLM endpoint with its limits, breaker and pool.

    Args:
        settings: the endpoint and its limits.
        transport: an httpx transport instead of the network (unit tests).

    Use as an async context manager (it opens and closes the connection pool).

    Resource handling:
        The pool belongs to this object; a concurrency slot and a half-open probe are always
        given back, on error and on cancellation.

    Error handling:
        :meth:`complete` raises :class:`~exai.errors.RateLimitedError` (a local bucket),
        :class:`~exai.errors.UpstreamRateLimited` (held by a ``Retry-After``),
        :class:`~exai.errors.CircuitOpenError`, or the mapped upstream error.
    """

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_answer_bytes: int | None = None,
    ) -> None:
        s = settings
        self.settings = s
        self.name = s.name
        self.dialect = dialect_for(s.kind)
        self.client = OpenAIClient(s, transport=transport)
        if max_answer_bytes is not None:
            self.client.max_answer_bytes = max_answer_bytes
        self.discovered_models: tuple[str, ...] = ()
        self.rpm = TokenBucket(s.rpm / 60.0, max(1.0, s.rpm)) if s.rpm > 0 else None
        self.tpm = TokenBucket(s.tpm / 60.0, max(1.0, s.tpm)) if s.tpm > 0 else None
        self.breaker = CircuitBreaker(
            f"provider:{s.name}",
            failure_rate_threshold=s.breaker_failure_rate,
            minimum_calls=s.breaker_minimum_calls,
            window_size=max(s.breaker_window, 1),
            # a stream may legitimately run for minutes; slowness is bounded by the stall bound
            slow_call_duration_s=max(s.stall_timeout_s * 10, 600.0),
            half_open_max_calls=1,
            open_duration_s=s.breaker_open_s,
            max_open_duration_s=max(s.breaker_max_open_s, s.breaker_open_s),
            record=breaker_records,
            on_transition=self._on_transition,
        )
        #: the requests- and tokens-per-minute limits shared by every daemon through Redis,
        #: when set; they then replace the local buckets (see :meth:`share_limits`)
        self.shared_rpm: RedisTokenBucket | None = None
        self.shared_tpm: RedisTokenBucket | None = None
        self.shared_group: RedisBucketGroup | None = None
        self.limiter: anyio.CapacityLimiter | None = None
        self._hold_until = -math.inf
        self._hold_quota = False  # the hold is for an exhausted quota, not a Retry-After
        self.counters = _Counters()
        #: told ``(provider, kind, seconds)`` whenever this provider closes to calls here on
        #: what this daemon saw itself (breaker trip, Retry-After, quota); set by
        #: :class:`~exai.providers.health.SharedHealth` to publish it to the other daemons
        self.on_opened: Callable[[str, str, float], None] | None = None
        self._quiet = False  # applying a learned hold, or a hold's own breaker hold

    async def __aenter__(self) -> Provider:
        self.limiter = anyio.CapacityLimiter(max(1, self.settings.max_concurrency))
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    @property
    def configured(self) -> bool:
        return self.settings.configured

    def models(self) -> tuple[str, ...]:
        """Models this provider serves: the configured ones, then those ``/models`` reported."""
        seen = dict.fromkeys(self.settings.models)
        seen.update(dict.fromkeys(self.discovered_models))
        return tuple(seen)

    def share_limits(
        self, redis: Any, *, replicas: int, on_redis_error: str, key_prefix: str = "exai:bucket:"
    ) -> None:
        """Enforce ``rpm`` and ``tpm`` across every daemon that uses the same Redis (and key
        prefix).

        Both are reserved in **one** Redis round trip per call (a
        :class:`~exai.resilience.RedisBucketGroup`). TPM is reserve-then-settle: the estimate
        is taken before the call; afterwards the unused part is given back with this daemon's
        next reservation (no round trip of its own), and an overrun is charged at once (the
        shared bucket goes into debt that every daemon then waits out). While Redis is
        unreachable the buckets' policy applies: ``local_share`` admits ``limit / replicas``
        here, ``fail_closed`` refuses.
        """
        s = self.settings
        buckets = []
        for kind, limit in (("rpm", s.rpm), ("tpm", s.tpm)):
            if limit <= 0:
                continue
            bucket = RedisTokenBucket(
                redis,
                kind,
                limit / 60.0,
                max(1.0, limit),
                on_redis_error=on_redis_error,  # type: ignore[arg-type]
                replicas=replicas,
                key_prefix=key_prefix,
                hash_tag=f"provider:{s.name}",
            )
            buckets.append(bucket)
            if kind == "rpm":
                self.shared_rpm, self.rpm = bucket, None
            else:
                self.shared_tpm, self.tpm = bucket, None
        self.shared_group = RedisBucketGroup(buckets) if buckets else None

    async def _admit_shared(self, estimate: int) -> float:
        """The shared RPM token and TPM reservation, in one round trip; returns the TPM cost
        reserved."""
        group = self.shared_group
        if group is None:
            return 0.0
        tpm_cost = min(float(estimate), self.shared_tpm.capacity) if self.shared_tpm else 0.0
        costs = [1.0 if b is self.shared_rpm else tpm_cost for b in group.buckets]
        short, wait = await group.try_acquire(costs)
        if short is not None:
            self.counters.refused += 1
            kind, limit, unit = (
                ("rpm", self.settings.rpm, "requests")
                if group.buckets[short] is self.shared_rpm
                else ("tpm", self.settings.tpm, "tokens")
            )
            raise RateLimitedError(
                f"provider {self.name!r} is at its shared limit of {limit:g} {unit} per minute; "
                f"retry in {wait:.3f}s",
                retry_after_s=wait,
                data={"provider": self.name, "limit": kind, "shared": True},
            )
        self.counters.tpm_reserved += tpm_cost
        return tpm_cost

    def _give_back(self, bucket: RedisTokenBucket | None, tokens: float) -> None:
        """Tokens reserved but not used: they go back with the next reservation."""
        group = self.shared_group
        if group is None or bucket is None:
            return
        group.credit(group.buckets.index(bucket), tokens)

    async def _settle_shared_tpm(self, reserved: float, used: int | None) -> None:
        """Give back the unused part of a shared reservation, or charge the overrun now."""
        bucket = self.shared_tpm
        if bucket is None or reserved <= 0:
            return
        if used is None:
            self.counters.tpm_reserved -= reserved
            self._give_back(bucket, reserved)
            return
        self.counters.tpm_settled += used
        if used <= reserved:
            self._give_back(bucket, reserved - used)
            return
        # an overrun is rare (the estimate is generous) and the other daemons must see it at
        # once: charged now, shielded (bookkeeping of a call that may be being cancelled) and
        # bounded by the bucket's own Redis bound
        with aio.cancel_scope(shield=True):
            try:
                await bucket.charge(used - reserved)
            except RateLimiterUnavailableError:
                self.counters.tpm_unsettled += used - reserved

    def _on_transition(self, name: str, old: str, new: str) -> None:
        log_event("provider.breaker", provider=self.name, old=old, new=new, learned=self._quiet)
        if new == "open" and not self._quiet and self.on_opened is not None:
            self.on_opened(self.name, "breaker", self.breaker.statistics().retry_after_s)

    # -- the call ------------------------------------------------------------------------
    def hold(self, seconds: float, *, quota: bool = False) -> None:
        """Refuse calls locally for ``seconds`` (the provider's ``Retry-After``, or
        ``quota_hold_s`` after a quota-exhausted answer when ``quota``), and tell the other
        daemons (``on_opened``)."""
        self._hold(seconds, quota=quota)
        if self.on_opened is not None:
            self.on_opened(self.name, "quota" if quota else "rate_limited", seconds)

    def _hold(self, seconds: float, *, quota: bool) -> bool:
        """Extend the local hold; True when it now ends later than before."""
        now = aio.current_time()
        extended = now + seconds > self._hold_until
        if now + seconds >= self._hold_until:
            self._hold_quota = quota or (self._hold_quota and now < self._hold_until)
        self._hold_until = max(self._hold_until, now + seconds)
        quiet, self._quiet = self._quiet, True
        try:
            self.breaker.open_until(seconds)  # its transition is this hold, not a trip to share
        finally:
            self._quiet = quiet
        return extended

    def learn(self, kind: str, seconds: float) -> bool:
        """Apply a hold another daemon published (see :mod:`exai.providers.health`).

        ``kind`` is ``"breaker"`` (open the breaker until then, not a trip),
        ``"rate_limited"`` or ``"quota"`` (the local hold). Nothing is re-published. Returns
        True when it closed the provider longer than it already was.
        """
        if not seconds > 0:
            return False
        if kind == "breaker":
            before = self.breaker.statistics()
            was_until = before.retry_after_s if before.state == "open" else 0.0
            quiet, self._quiet = self._quiet, True
            try:
                self.breaker.open_until(seconds)
            finally:
                self._quiet = quiet
            return seconds > was_until + 1e-3
        if kind in ("rate_limited", "quota"):
            return self._hold(seconds, quota=kind == "quota")
        return False

    def _admit(self, estimate: int) -> tuple[float, float]:
        """Stages 1–2: returns (rpm cost, tpm cost) taken; raises when refused."""
        now = aio.current_time()
        if now < self._hold_until:
            wait = self._hold_until - now
            self.counters.refused += 1
            if self._hold_quota:
                raise UpstreamQuotaExhausted(
                    f"provider {self.name!r} said its quota or balance is used up; it is not "
                    f"called again for {wait:.3f}s",
                    provider=self.name,
                    retry_after_s=wait,
                    data={"held": True},
                )
            raise UpstreamRateLimited(
                f"provider {self.name!r} asked to wait (Retry-After); retry in {wait:.3f}s",
                provider=self.name,
                retry_after_s=wait,
            )
        if self.breaker.state == "open":
            # refused before any bucket is touched: no token to give back, and no Redis round
            # trip for a provider that is known to be down
            self.counters.refused += 1
            self.breaker.rejections += 1
            raise CircuitOpenError(self.breaker.name, self.breaker.statistics().retry_after_s)
        rpm_cost = 0.0
        if self.rpm is not None:
            wait = self.rpm.try_acquire(1)
            if wait > 0:
                self.counters.refused += 1
                raise RateLimitedError(
                    f"provider {self.name!r} is at its limit of {self.settings.rpm:g} requests "
                    f"per minute; retry in {wait:.3f}s",
                    retry_after_s=wait,
                    data={"provider": self.name, "limit": "rpm"},
                )
            rpm_cost = 1.0
        tpm_cost = 0.0
        if self.tpm is not None:
            tpm_cost = min(float(estimate) + self.counters.tpm_debt, self.tpm.capacity)
            wait = self.tpm.try_acquire(tpm_cost)
            if wait > 0:
                if self.rpm is not None and rpm_cost:
                    self.rpm.refund(rpm_cost)
                self.counters.refused += 1
                raise RateLimitedError(
                    f"provider {self.name!r} is at its limit of {self.settings.tpm:g} tokens "
                    f"per minute; retry in {wait:.3f}s",
                    retry_after_s=wait,
                    data={"provider": self.name, "limit": "tpm"},
                )
            self.counters.tpm_debt = max(0.0, self.counters.tpm_debt - (tpm_cost - estimate))
            self.counters.tpm_reserved += tpm_cost
        return rpm_cost, tpm_cost

    def _settle_tpm(self, reserved: float, used: int | None) -> None:
        """Give back the unused part of a reservation, or carry an overrun as a debt."""
        if self.tpm is None or reserved <= 0:
            return
        if used is None:  # no answer: the provider charged nothing we know of
            self.tpm.refund(reserved)
            self.counters.tpm_reserved -= reserved
            return
        self.counters.tpm_settled += used
        if used < reserved:
            self.tpm.refund(reserved - used)
        elif used > reserved:
            extra = used - reserved
            if extra > self.tpm.capacity or self.tpm.try_acquire(extra) > 0:
                self.counters.tpm_debt += extra

    async def complete(self, req: ChatRequest, model: str) -> ChatResponse:
        """One call to this provider (with Kimi's web-search loop inside it).

        Bounded by the caller's cancel scope; see the module docstring for the stages.
        """
        bad = unencodable_field(req.messages)
        if bad is not None:
            # The request's fault, found before any limit, breaker or byte is spent on it.
            field, pos = bad
            raise InvalidParams(
                f"{field} is not valid Unicode text (a lone surrogate at character {pos}); "
                "nothing was sent to the provider",
                field=field,
            )
        estimate = estimate_tokens(req.messages, req.max_output_tokens)
        _, tpm_cost = self._admit(estimate)
        try:
            shared_tpm_cost = await self._admit_shared(estimate)
        except BaseException:
            self._settle_tpm(tpm_cost, None)
            raise
        used: int | None = None
        start = aio.current_time()
        try:
            try:
                async with self.breaker:
                    limiter = self.limiter
                    assert limiter is not None
                    await _take_slot(limiter)
                    try:
                        resp = await self._exchange(req, model)
                    finally:
                        limiter.release()
            except BaseException as exc:
                self._after_failure(exc, start, model)
                if isinstance(exc, CircuitOpenError):
                    # nothing was sent: the shared request token goes back too
                    self._give_back(self.shared_rpm, 1.0)
                raise
            used = resp.usage.total_tokens
        finally:
            self._settle_tpm(tpm_cost, used)
            await self._settle_shared_tpm(shared_tpm_cost, used)
        self.counters.ok += 1
        log_event(
            "provider.call",
            provider=self.name,
            model=model,
            outcome="ok",
            elapsed_ms=round((aio.current_time() - start) * 1000, 1),
            tokens=used,
        )
        return resp

    def _after_failure(self, exc: BaseException, start: float, model: str) -> None:
        from exai.errors import ExaiError

        if isinstance(exc, CircuitOpenError):
            # Nothing was sent: give the request-per-minute token back.
            if self.rpm is not None:
                self.rpm.refund(1)
            self.counters.refused += 1
            return
        if not isinstance(exc, Exception):
            return  # cancelled: counts as nothing
        self.counters.failed += 1
        if isinstance(exc, UpstreamRateLimited) and exc.retry_after_s:
            self.hold(exc.retry_after_s)
        if isinstance(exc, UpstreamQuotaExhausted) and not exc.extra.get("held"):
            # No retry cures an empty balance: hold the provider (no request at all) until the
            # configured time has passed, or the provider's own Retry-After if that is longer.
            seconds = max(self.settings.quota_hold_s, exc.retry_after_s or 0.0)
            if seconds > 0:
                self.hold(seconds, quota=True)
                exc.retry_after_s = seconds
        reason = exc.reason if isinstance(exc, ExaiError) else type(exc).__name__
        self.counters.last_error = {
            "reason": reason,
            "message": str(exc)[:300],
            "at_loop_time": round(aio.current_time(), 3),
        }
        log_event(
            "provider.call",
            provider=self.name,
            model=model,
            outcome=reason,
            elapsed_ms=round((aio.current_time() - start) * 1000, 1),
        )

    async def _exchange(self, req: ChatRequest, model: str) -> ChatResponse:
        messages = list(req.messages)
        usage = Usage()
        rounds = 0
        got = 0
        streaming = req.on_delta is not None

        async def on_chunk(text: str, thought: str) -> None:
            nonlocal got
            got += len(text) + len(thought)
            assert req.on_delta is not None
            await req.on_delta(StreamDelta(text, thought, got, self.name, model))

        reasoning: list[str] = []
        while True:
            # (the first round sends the request as it came: no copy of it)
            this = attrs.evolve(req, messages=tuple(messages)) if rounds else req
            body = self.dialect.build_body(this, model, stream=streaming)
            if rounds:  # each web-search round is a request of its own
                if self.rpm is not None:
                    await self.rpm.acquire(1)
                elif self.shared_rpm is not None:
                    await self.shared_rpm.acquire(1)
            self.counters.requests += 1
            completion = await self.client.chat(body, on_chunk=on_chunk if streaming else None)
            choice = completion["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content") or ""
            if message.get("reasoning_content"):
                reasoning.append(str(message["reasoning_content"]))
            sent = sum(len(str(m.get("content") or "")) for m in messages)
            usage = usage + _usage_of(completion, sent, len(content))
            finish = choice.get("finish_reason")
            more = self.dialect.tool_round(message, finish)
            if more is None or rounds >= self.dialect.max_tool_rounds:
                if more is not None and not content:
                    raise UpstreamMalformedResponse(
                        f"provider {self.name!r} kept asking for web search after {rounds} rounds",
                        provider=self.name,
                    )
                key = self.settings.api_key
                return ChatResponse(
                    content=content,
                    reasoning="\n".join(reasoning),
                    model=model,
                    provider=self.name,
                    usage=usage,
                    finish_reason=finish,
                    key_fingerprint=key.fingerprint() if key else "",
                    web_search_rounds=rounds,
                )
            messages.extend(more)
            rounds += 1

    # -- models and status ----------------------------------------------------------------
    async def refresh_models(self) -> tuple[str, ...]:
        """``GET /models``; the ids are kept as discovered models. Bounded by the caller."""
        ids = await self.client.list_models()
        self.discovered_models = tuple(ids)
        return self.discovered_models

    def status(self) -> dict[str, Any]:
        """Health, limits and current use, secrets never included."""
        s = self.settings
        stats = self.breaker.statistics()
        now = aio.current_time()
        limiter = self.limiter
        out: dict[str, Any] = {
            "kind": s.kind,
            "configured": s.configured,
            "host": host_of(s.base_url),
            "models": list(self.models()),
            "key": "set" if s.api_key else "none",
            "key_fingerprint": s.api_key.fingerprint() if s.api_key else None,
            "breaker": attrs.asdict(stats),
            "limits": {
                "rpm": s.rpm or None,
                "tpm": s.tpm or None,
                "max_concurrency": s.max_concurrency,
                "pool_max": s.pool_max,
                "stall_timeout_s": s.stall_timeout_s,
            },
            "use": {
                "in_flight": int(limiter.borrowed_tokens) if limiter else 0,
                "waiting": limiter.statistics().tasks_waiting if limiter else 0,
                "rpm_available": round(self.rpm.statistics().tokens, 3) if self.rpm else None,
                "tpm_available": round(self.tpm.statistics().tokens, 1) if self.tpm else None,
                "tpm_debt": self.counters.tpm_debt,
                "shared_limits": [
                    kind
                    for kind, b in (("rpm", self.shared_rpm), ("tpm", self.shared_tpm))
                    if b is not None
                ],
                "retry_after_s": round(max(0.0, self._hold_until - now), 3),
            },
            "counters": {
                "requests": self.counters.requests,
                "ok": self.counters.ok,
                "failed": self.counters.failed,
                "refused": self.counters.refused,
            },
        }
        if self.counters.last_error:
            out["last_error"] = self.counters.last_error
        return out
