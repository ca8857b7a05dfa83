"""The one exai error tree.

Every boundary (WebSocket, JSON-RPC, httpx, asyncpg, redis, sqlite, the file system) maps the
errors of the layer below into these classes with ``raise X(...) from exc``. Each error carries
what a caller needs: a machine-readable ``reason``, a message a person understands, the JSON-RPC
``code`` it is reported with, and ``retry_after_s`` where waiting would help.

::

    ExaiError
    ├── ConfigError                      settings are invalid (start-up error)
    ├── CallerError                      the caller's input is wrong; never trips a breaker
    │   ├── InvalidRequest               -32600
    │   ├── MethodNotFound               -32601
    │   ├── InvalidParams                -32602 (names the field)
    │   ├── UnsupportedProtocolVersion   -32022 (MCP 2026-07-28: names the supported ones)
    │   ├── ConversationNotFound         continuation unknown or expired
    │   ├── FileAccessError              a path outside the allowed roots
    │   └── UpstreamBadRequest           the provider said 400 (also an UpstreamError)
    ├── RejectedError                    refused before any work; retry later
    │   ├── OverloadedError              no slot, no room in a budget, memory backstop
    │   ├── RateLimitedError             a token bucket said no
    │   ├── CircuitOpenError             a breaker is open (carries the breaker's name)
    │   ├── RateLimiterUnavailableError  a shared (Redis) limiter is unreachable; fail closed
    │   └── StorageUnavailableError      primary store down and spool full
    ├── DeadlineExceeded                 the call's deadline passed
    ├── UpstreamError                    an LLM provider failed
    │   ├── UpstreamAuthError            401/403: the key is wrong; never retried
    │   ├── UpstreamRateLimited          429 with Retry-After
    │   ├── UpstreamRetryableError       5xx, reset, timeout, stall
    │   ├── UpstreamBadRequest           400/404/422
    │   ├── UpstreamMalformedResponse    a body that is not what the API promises (or empty)
    │   ├── UpstreamQuotaExhausted       balance or quota used up: not retried, provider held
    │   └── UpstreamAnswerError          the answer itself is unusable: the call ends
    │       ├── UpstreamContentFiltered  content_filtered (the provider's filter stopped it)
    │       ├── UpstreamTruncated        answer_truncated (output budget spent, e.g. reasoning)
    │       └── AnswerTooLarge           answer_too_large (over EXAI_MAX_ANSWER_BYTES)
    ├── StoreError                       a conversation store failed
    │   ├── StoreUnavailableError        the store cannot be reached (retryable)
    │   └── ScriptNotLoadedError         Redis does not know a script's SHA (NOSCRIPT)
    ├── NoProviderError                  no configured provider serves the model
    └── ToolError                        a tool failed for a reason of its own
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AnswerTooLarge",
    "CallerError",
    "CircuitOpenError",
    "ConfigError",
    "ConversationNotFound",
    "DeadlineExceeded",
    "ExaiError",
    "FileAccessError",
    "InvalidParams",
    "InvalidRequest",
    "MethodNotFound",
    "NoProviderError",
    "OverloadedError",
    "RateLimitedError",
    "RateLimiterUnavailableError",
    "RejectedError",
    "ScriptNotLoadedError",
    "StorageUnavailableError",
    "StoreError",
    "StoreUnavailableError",
    "ToolError",
    "UnsupportedProtocolVersion",
    "UpstreamAnswerError",
    "UpstreamAuthError",
    "UpstreamBadRequest",
    "UpstreamContentFiltered",
    "UpstreamError",
    "UpstreamMalformedResponse",
    "UpstreamQuotaExhausted",
    "UpstreamRateLimited",
    "UpstreamRetryableError",
    "UpstreamTruncated",
    "unwrap_exception",
]

#: JSON-RPC code used for every exai-specific error; ``data.reason`` tells them apart.
SERVER_ERROR = -32000


class ExaiError(Exception):
    """Base of every error exai raises on purpose.

    Args:
        message: what went wrong, for a person. Never contains a secret.
        retry_after_s: seconds after which a retry may succeed, when that is known.
        data: extra machine-readable fields merged into the JSON-RPC ``error.data``.
    """

    code: int = SERVER_ERROR
    reason: str = "internal_error"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.extra: dict[str, Any] = dict(data or {})

    def to_error_data(self) -> dict[str, Any]:
        """The ``error.data`` object reported to a JSON-RPC client."""
        data: dict[str, Any] = {"reason": self.reason}
        if self.retry_after_s is not None:
            data["retry_after_s"] = round(max(0.0, self.retry_after_s), 3)
        data.update(self.extra)
        return data

    def __str__(self) -> str:
        return self.message


class ConfigError(ExaiError):
    """The settings are invalid; the daemon refuses to start (or keeps the old ones on reload)."""

    reason = "config_error"


class CallerError(ExaiError):
    """The caller's input is wrong. Retrying the same input fails the same way.

    Breakers never count these: a bad request says nothing about a dependency's health.
    """

    reason = "invalid_request"


class InvalidRequest(CallerError):
    """Not a valid JSON-RPC request (-32600)."""

    code = -32600
    reason = "invalid_request"


class MethodNotFound(CallerError):
    """The method does not exist (-32601)."""

    code = -32601
    reason = "method_not_found"


class InvalidParams(CallerError):
    """The params are invalid (-32602). ``field`` names the offending one when known."""

    code = -32602
    reason = "invalid_params"

    def __init__(self, message: str, *, field: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.field = field
        if field is not None:
            self.extra.setdefault("field", field)


class UnsupportedProtocolVersion(CallerError):
    """The request names an MCP protocol version this daemon does not serve (-32022).

    The code and ``data`` (``supported``, ``requested``) are the 2026-07-28 spec's, so a client
    that negotiates per request can pick a version from ``supported`` and retry.
    """

    code = -32022
    reason = "unsupported_protocol_version"

    def __init__(self, requested: str, supported: list[str], message: str | None = None) -> None:
        default = f"protocol version {requested!r} is not supported; use one of " + ", ".join(
            supported
        )
        super().__init__(
            message or default,
            data={"supported": list(supported), "requested": requested},
        )
        self.requested = requested
        self.supported = list(supported)


class ConversationNotFound(CallerError):
    """The ``continuation_id`` does not exist or has expired."""

    code = -32602
    reason = "continuation_not_found"


class FileAccessError(CallerError):
    """A file path was refused (outside the allowed roots, a symlink, ``..``, a denied name)."""

    code = -32602
    reason = "file_denied"


class RejectedError(ExaiError):
    """Refused before any work was done; retrying after ``retry_after_s`` may succeed."""

    reason = "rejected"
    retryable = True


class OverloadedError(RejectedError):
    """No capacity within the bound (limiter slot, memory watermark, connection cap)."""

    reason = "overloaded"


class RateLimitedError(RejectedError):
    """A token bucket refused the request."""

    reason = "rate_limited"


class CircuitOpenError(RejectedError):
    """A circuit breaker is open (or its half-open probes are taken).

    Args:
        name: the breaker's name, e.g. ``"provider:kimi"``.
        retry_after_s: seconds until the breaker lets a probe through.
    """

    reason = "circuit_open"

    def __init__(self, name: str, retry_after_s: float, message: str | None = None) -> None:
        super().__init__(
            message or f"circuit breaker {name!r} is open; retry in {retry_after_s:.3f}s",
            retry_after_s=retry_after_s,
            data={"breaker": name},
        )
        self.name = name


class RateLimiterUnavailableError(RejectedError):
    """A shared rate limiter (Redis) cannot be reached and its policy is to fail closed.

    Nothing was admitted: the limit cannot be checked, so the call is refused rather than let
    every process spend the full limit on its own.
    """

    reason = "rate_limiter_unavailable"


class StorageUnavailableError(RejectedError):
    """The primary store is down and the spool cannot take more: nothing was written."""

    reason = "storage_unavailable"


class DeadlineExceeded(ExaiError):
    """The call's deadline passed before it finished."""

    reason = "timeout"
    retryable = True


class UpstreamError(ExaiError):
    """An LLM provider failed. ``provider`` names it."""

    reason = "upstream_error"

    def __init__(self, message: str, *, provider: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.provider = provider
        if provider is not None:
            self.extra.setdefault("provider", provider)


class UpstreamAuthError(UpstreamError):
    """The provider refused the key (401/403). Never retried; fix the key."""

    reason = "upstream_auth"


class UpstreamRateLimited(UpstreamError):
    """The provider said 429; ``retry_after_s`` comes from its ``Retry-After``."""

    reason = "upstream_rate_limited"
    retryable = True


class UpstreamRetryableError(UpstreamError):
    """5xx, connection reset, timeout or a stalled stream: another try may succeed."""

    reason = "upstream_unavailable"
    retryable = True


class UpstreamBadRequest(UpstreamError, CallerError):
    """The provider rejected the request as malformed (400/404/422)."""

    reason = "upstream_bad_request"


class UpstreamMalformedResponse(UpstreamError):
    """The provider answered with a body that is not what its API promises."""

    reason = "upstream_malformed"


class UpstreamQuotaExhausted(UpstreamError):
    """The provider says the account's balance or quota is used up (Moonshot's 429
    ``exceeded_current_quota_error``, OpenAI's ``insufficient_quota``, GLM code 1113).

    No retry cures it: it is never retried, and the provider is held (refused locally, no
    request sent) for its ``quota_hold_s``; ``retry_after_s`` says when it is tried again.
    """

    reason = "quota_exhausted"


class UpstreamAnswerError(UpstreamError):
    """The provider answered, but the answer cannot be used as one: the call ends (neither
    retried nor answered by another provider) and nothing is stored. ``data.ending`` says how
    the answer ended; it never counts against the provider's breaker."""

    reason = "upstream_answer_unusable"


class UpstreamContentFiltered(UpstreamAnswerError):
    """The provider's content filter stopped the answer (``finish_reason`` ``content_filter``
    or GLM's ``sensitive``, or an error code saying so)."""

    reason = "content_filtered"


class UpstreamTruncated(UpstreamAnswerError):
    """The answer was cut at the output token limit (``finish_reason: "length"``);
    ``data.cause`` is ``"reasoning"`` when the whole budget went to reasoning."""

    reason = "answer_truncated"


class AnswerTooLarge(UpstreamAnswerError):
    """The answer passed ``EXAI_MAX_ANSWER_BYTES``; the read was stopped there."""

    reason = "answer_too_large"


class StoreError(ExaiError):
    """A conversation store failed."""

    reason = "store_error"


class StoreUnavailableError(StoreError):
    """The store cannot be reached right now."""

    reason = "store_unavailable"
    retryable = True


class ScriptNotLoadedError(StoreError):
    """Redis answered ``NOSCRIPT``: its script cache does not hold the SHA (a fresh or restarted
    server, ``SCRIPT FLUSH``, a failover). The caller runs the script with ``EVAL`` instead.

    Recognised by type, never by message text: the message names the store and may change.
    """


class NoProviderError(ExaiError):
    """No configured provider serves the requested model (or all of them failed)."""

    reason = "no_provider"


class ToolError(ExaiError):
    """A tool failed for a reason of its own."""

    reason = "tool_error"


def unwrap_exception(exc: BaseException) -> BaseException:
    """The one error a caller should see: groups of one are unwrapped, an ExaiError preferred.

    A nursery reports a task's failure as an exception group; a boundary that answers one
    request (a tool call, ``exai serve`` at start-up) reports the error inside it.
    """
    while isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions
        preferred = [e for e in inner if isinstance(e, ExaiError)]
        exc = preferred[0] if preferred else inner[0]
    return exc
