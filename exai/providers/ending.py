"""How an answer ended: the one place that decides, for every route and every dialect.

The HTTP client (:mod:`exai.providers.client`) only moves bytes. Whatever the route — a
streamed answer (SSE) or a plain one, OpenAI, Kimi or GLM — it hands this module the same facts:
the assembled ``chat.completion``, the error documents the provider sent inside it (a top-level
``error`` in a chunk or a 200 body, an SSE ``event: error`` frame) and how the read stopped.
:func:`judge` returns only for a complete answer; anything else raises, so a truncated,
filtered, failed or empty answer can never reach a tool as a success (and so is never stored as
a conversation turn). :func:`error_for` maps an error document — from a non-2xx status or
embedded in a 200 — to one exai error, by HTTP status and the provider's ``code``/``type``,
never by its message text.

============================================  ===================================  ==========
how the answer ended                          exai error (``reason``)              retried
============================================  ===================================  ==========
``finish_reason`` stop/tool_calls/… , text    — (the answer)                        —
no ``finish_reason`` (stream ended early,     ``UpstreamRetryableError``            yes
``[DONE]`` without one, ``finish_reason:      (``upstream_unavailable``)
null`` in a body)
``network_error``, ``error`` (generation      ``UpstreamRetryableError``            yes
broke)                                        (``upstream_unavailable``)
an error document (``error`` member,          by status and code: see below         …
``event: error``)
``content_filter``, ``sensitive``, …          ``UpstreamContentFiltered``           no (ends
                                              (``content_filtered``)                the call)
``length`` with no text but reasoning         ``UpstreamTruncated`` (``answer_      no (ends
                                              truncated``, ``cause: reasoning``)    the call)
``length`` with text                          ``UpstreamTruncated`` (``cause:       no (ends
                                              output_limit``)                       the call)
a complete ending with no text and no         ``UpstreamMalformedResponse``         yes
tool call                                     (``upstream_malformed``)
============================================  ===================================  ==========

Error documents (:func:`error_for`), first match wins: a quota/balance code → ``quota_exhausted``
(not retried, provider held); a content-filter code → ``content_filtered``; 401/403 or an auth
code → ``upstream_auth``; 429 (HTTP or embedded ``code: 429``) or a rate-limit code →
``upstream_rate_limited`` (``Retry-After`` honoured); 408/5xx → ``upstream_unavailable``; other
4xx → ``upstream_bad_request``; an embedded error with nothing recognisable →
``upstream_unavailable`` (an attempt that failed, retried like a dropped connection).

A ``finish_reason`` this table does not know is taken as a complete ending (providers add
their own, e.g. ``eos``), still subject to the empty-answer rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from exai.errors import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamContentFiltered,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRetryableError,
    UpstreamTruncated,
)

__all__ = [
    "BROKEN",
    "FILTERED",
    "TRUNCATED",
    "ErrorDoc",
    "answer_bytes",
    "error_for",
    "judge",
    "read_error_doc",
]

#: Longest provider error text carried into an exai error message.
MAX_ERROR_TEXT = 300

#: finish reasons that say the generation broke off (GLM ``network_error``, OpenRouter ``error``)
BROKEN = frozenset({"network_error", "error"})
#: finish reasons that say a content filter stopped the answer
FILTERED = frozenset({"content_filter", "sensitive", "safety", "prohibited_content", "recitation"})
#: finish reasons that say the output budget ran out
TRUNCATED = frozenset({"length", "max_tokens", "model_context_window_exceeded"})

# Provider error codes and types, lower-case. Moonshot: ``exceeded_current_quota_error``
# (429 "insufficient balance"); OpenAI: ``insufficient_quota``; GLM: 1113 (account in arrears),
# 1301 (unsafe or sensitive content), 1302/1303/1305 (concurrency / frequency too high).
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "exceeded_current_quota_error",
        "insufficient_balance",
        "insufficient_balance_error",
        "quota_exceeded",
        "billing_hard_limit_reached",
        "1113",
    }
)
FILTER_CODES = frozenset({"content_filter", "content_policy_violation", "sensitive", "1301"})
RATE_CODES = frozenset(
    {"rate_limit_exceeded", "rate_limit_error", "engine_overloaded_error", "1302", "1303", "1305"}
)
AUTH_CODES = frozenset(
    {"invalid_api_key", "authentication_error", "invalid_authentication_error", "1000", "1001"}
)

Ended = Literal["done", "finished", "eof", "error", "body"]
_HOW_ENDED: dict[str, str] = {
    "done": "ended its stream ([DONE])",
    "finished": "stopped sending",
    "eof": "closed the connection",
    "error": "sent an error",
    "body": "answered",
}


@attrs.frozen
class ErrorDoc:
    """A provider's error document: ``{"error": {"message", "code", "type"}}`` or an SSE
    ``event: error`` frame, read leniently (``code`` may be a number, a string or absent).

    Attributes:
        message: the provider's text ("" when none); scrubbed and cut before it is shown.
        code: the provider's ``code`` as a string, or ``None``.
        type: the provider's ``type``, or ``None``.
        status: an HTTP status carried inside the document (``code: 429``, ``status: 503``).
    """

    message: str
    code: str | None = None
    type: str | None = None
    status: int | None = None

    def keys(self) -> set[str]:
        return {k.lower() for k in (self.code, self.type) if k}


def _status_of(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 400 <= value <= 599:
        return value
    if isinstance(value, str) and len(value) == 3 and value.isdigit() and value[0] in "45":
        return int(value)
    return None


def read_error_doc(value: Any) -> ErrorDoc | None:
    """The error document in ``value`` (an ``error`` member, or a whole body holding one), or
    ``None`` when there is none (``error: null``, no ``error`` key)."""
    if isinstance(value, Mapping) and "error" in value:
        value = value["error"]
    if value is None or value is False or value == "" or value == {}:
        return None  # some providers send "error": null (or empty) in every healthy chunk
    if isinstance(value, str):
        return ErrorDoc(message=value)
    if not isinstance(value, Mapping):
        return ErrorDoc(message=str(value)[:MAX_ERROR_TEXT])
    code = value.get("code")
    type_ = value.get("type")
    status = None
    for name in ("status", "status_code", "http_status", "code"):
        status = _status_of(value.get(name))
        if status is not None:
            break
    message = value.get("message")
    return ErrorDoc(
        message=str(message) if message is not None else "",
        code=None if code is None or isinstance(code, dict | list) else str(code),
        type=str(type_) if isinstance(type_, str) else None,
        status=status,
    )


def scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` masked (providers sometimes echo keys)."""
    if secret and len(secret) >= 4 and secret in text:
        text = text.replace(secret, "***")
    return text


def error_for(
    provider: str,
    doc: ErrorDoc,
    *,
    http_status: int | None = None,
    retry_after_s: float | None = None,
    secret: str | None = None,
    where: str = "",
) -> UpstreamError:
    """The exai error for a provider's error document.

    Args:
        provider: the provider's name (in the message and ``data.provider``).
        doc: the document (:func:`read_error_doc`).
        http_status: the response's status when it is not 2xx; ``None`` for an error carried
            inside a 200 answer (then ``doc.status`` is used).
        retry_after_s: the response's ``Retry-After``, if any.
        secret: the provider's key, masked wherever the provider echoed it.
        where: how the error arrived, for the message (``"inside an HTTP 200 answer"``).
    """
    status = http_status if http_status is not None else doc.status
    keys = doc.keys()
    text = scrub(doc.message[:MAX_ERROR_TEXT].strip(), secret)
    code = f" [code {doc.code}]" if doc.code and doc.code != str(status) else ""
    detail = f": {text}{code}" if text else code
    how = f"HTTP {status}" if status is not None else "an error"
    if http_status is None:
        how = f"{how} {where}".strip() if where else how
    data: dict[str, Any] = {}
    if status is not None:
        data["status"] = status
    if doc.code:
        data["provider_code"] = doc.code
    if doc.type:
        data["provider_type"] = doc.type
    if http_status is None:
        data["embedded"] = True
    if keys & QUOTA_CODES:
        return UpstreamQuotaExhausted(
            f"provider {provider!r} says its quota or balance is used up ({how}){detail}; "
            "no retry will help until it is topped up",
            provider=provider,
            retry_after_s=retry_after_s,
            data=data,
        )
    if keys & FILTER_CODES:
        return UpstreamContentFiltered(
            f"provider {provider!r} refused the content: its content filter stopped it "
            f"({how}){detail}",
            provider=provider,
            data={**data, "ending": "filtered"},
        )
    if status in (401, 403) or keys & AUTH_CODES:
        return UpstreamAuthError(
            f"provider {provider!r} refused the API key ({how}){detail}; "
            "check the provider's API key",
            provider=provider,
            data=data,
        )
    if status == 429 or keys & RATE_CODES:
        when = f"; retry after {retry_after_s:.3f}s" if retry_after_s is not None else ""
        return UpstreamRateLimited(
            f"provider {provider!r} is rate limiting ({how}){when}{detail}",
            provider=provider,
            retry_after_s=retry_after_s,
            data=data,
        )
    if status is not None and (status == 408 or status >= 500):
        return UpstreamRetryableError(
            f"provider {provider!r} is unavailable ({how}){detail}",
            provider=provider,
            retry_after_s=retry_after_s,
            data=data,
        )
    if status is not None and 400 <= status < 500:
        return UpstreamBadRequest(
            f"provider {provider!r} rejected the request ({how}){detail}",
            provider=provider,
            data=data,
        )
    if http_status is not None:
        return UpstreamMalformedResponse(
            f"provider {provider!r} answered with unexpected HTTP {http_status}",
            provider=provider,
            data=data,
        )
    return UpstreamRetryableError(
        f"provider {provider!r} reported {how}{detail}",
        provider=provider,
        retry_after_s=retry_after_s,
        data={**data, "ending": "failed"},
    )


def answer_bytes(message: Mapping[str, Any]) -> int:
    """UTF-8 bytes of an assistant message's text: content, reasoning and tool-call arguments
    (what ``EXAI_MAX_ANSWER_BYTES`` limits)."""
    n = 0
    for key in ("content", "reasoning_content"):
        value = message.get(key)
        if isinstance(value, str):
            n += len(value.encode("utf-8", "surrogatepass"))
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        args = fn.get("arguments") if isinstance(fn, Mapping) else None
        if isinstance(args, str):
            n += len(args.encode("utf-8", "surrogatepass"))
    return n


def judge(
    provider: str,
    completion: Mapping[str, Any],
    *,
    errors: Sequence[ErrorDoc] = (),
    ended: Ended = "body",
    retry_after_s: float | None = None,
    secret: str | None = None,
) -> None:
    """Return when ``completion`` is a complete answer; raise the error that says how it ended
    otherwise (see the module docstring's table).

    Args:
        provider: the provider's name.
        completion: a ``chat.completion`` (validated shape: ``choices[0].message`` a dict).
        errors: error documents the provider sent with it, in order.
        ended: how the read stopped (``"body"`` for a non-streamed answer).
        retry_after_s: the response's ``Retry-After``, for an embedded 429.
        secret: the provider's key, masked in any text it echoed.

    Raises:
        UpstreamError: a subclass per the module docstring.
    """
    if errors:
        where = "inside an HTTP 200 answer" if ended == "body" else "in the middle of its stream"
        raise error_for(
            provider, errors[0], retry_after_s=retry_after_s, secret=secret, where=where
        )
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or ""
    got = f"{len(content)} characters of answer"
    if reasoning:
        got += f" and {len(reasoning)} of reasoning"
    if not isinstance(finish, str) or not finish:
        raise UpstreamRetryableError(
            f"provider {provider!r} ended the answer early: it {_HOW_ENDED[ended]} without a "
            f"finish reason after {got}; an unfinished answer is never used",
            provider=provider,
            data={"ending": "incomplete"},
        )
    data = {"ending": "", "finish_reason": finish}
    reason = finish.lower()
    if reason in BROKEN:
        raise UpstreamRetryableError(
            f"provider {provider!r} broke off the answer (finish_reason {finish!r}) after {got}",
            provider=provider,
            data={**data, "ending": "failed"},
        )
    if reason in FILTERED:
        raise UpstreamContentFiltered(
            f"provider {provider!r} withheld the answer: its content filter stopped it "
            f"(finish_reason {finish!r}) after {got}",
            provider=provider,
            data={**data, "ending": "filtered"},
        )
    if reason in TRUNCATED:
        if not content.strip() and reasoning:
            raise UpstreamTruncated(
                f"provider {provider!r}: the model spent its whole output budget on reasoning "
                f"({len(reasoning)} characters) and wrote no answer (finish_reason {finish!r}); "
                "lower thinking_mode or ask for less",
                provider=provider,
                data={**data, "ending": "truncated", "cause": "reasoning"},
            )
        raise UpstreamTruncated(
            f"provider {provider!r} cut the answer at the model's output limit "
            f"(finish_reason {finish!r}) after {got}; ask for a shorter answer",
            provider=provider,
            data={**data, "ending": "truncated", "cause": "output_limit"},
        )
    if not content.strip() and not message.get("tool_calls"):
        raise UpstreamMalformedResponse(
            f"provider {provider!r} answered with an empty message (finish_reason {finish!r}"
            + (f", {len(reasoning)} characters of reasoning" if reasoning else "")
            + ")",
            provider=provider,
            data={**data, "ending": "empty"},
        )
