"""Value objects of the provider layer: the request a tool makes and the answer it gets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal

import attrs

__all__ = [
    "Attempt",
    "ChatRequest",
    "ChatResponse",
    "DeltaCallback",
    "StreamDelta",
    "Usage",
    "unencodable_field",
]

Step = Literal["single", "early", "final"]
THINKING_MODES = ("minimal", "low", "medium", "high", "max")


def _messages(value: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    return tuple(value)


#: Strings looked at by :func:`unencodable_field` before it gives up (a bound on the walk).
_MAX_STRINGS = 100_000


def _all_encodable(messages: Sequence[Any]) -> bool:
    """Whether every string :func:`unencodable_field` looks at is valid Unicode — the same walk
    and bound, without the paths it names (built only once a bad string is known to be there:
    they were most of the walk's cost for every request)."""
    stack: list[Any] = list(reversed(messages))  # (popped in the same order as there)
    seen = 0
    while stack and seen < _MAX_STRINGS:
        value = stack.pop()
        seen += 1
        if isinstance(value, str):
            if value.isascii():
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(value, dict):
            for key, child in reversed(list(value.items())):
                stack.append(child)
                if isinstance(key, str) and not key.isascii():
                    stack.append(key)
        elif isinstance(value, list | tuple):
            stack.extend(reversed(value))
    return True


def unencodable_field(messages: Iterable[Any]) -> tuple[str, int] | None:
    """The first string in ``messages`` that is not valid Unicode (it holds a lone surrogate,
    so it cannot be sent as UTF-8), as ``("messages[1].content", character index)``; ``None``
    when every string is fine. Bounded: at most 100,000 strings are looked at."""
    messages = messages if isinstance(messages, list | tuple) else list(messages)
    if _all_encodable(messages):
        return None
    stack: list[tuple[str, Any]] = [
        (f"messages[{i}]", m) for i, m in reversed(list(enumerate(messages)))
    ]
    seen = 0
    while stack and seen < _MAX_STRINGS:
        path, value = stack.pop()
        seen += 1
        if isinstance(value, str):
            if value.isascii():
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return path, exc.start
        elif isinstance(value, dict):
            for key, child in reversed(list(value.items())):
                stack.append((f"{path}.{key}", child))
                if isinstance(key, str) and not key.isascii():
                    stack.append((f"{path} (a key)", key))
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", c) for i, c in reversed(list(enumerate(value))))
    return None


@attrs.frozen
class StreamDelta:
    """One streamed piece of an answer.

    Attributes:
        content: answer text in this chunk.
        reasoning: reasoning text in this chunk (thinking models).
        chars_received: answer and reasoning characters received so far in this attempt.
        provider: the provider streaming.
        model: the model streaming.
    """

    content: str
    reasoning: str
    chars_received: int
    provider: str
    model: str


DeltaCallback = Callable[[StreamDelta], Awaitable[None]]


@attrs.frozen(kw_only=True)
class ChatRequest:
    """What a tool asks of the provider layer.

    Attributes:
        messages: OpenAI-style chat messages (``role``/``content``).
        model: a model name, ``"provider/model"`` to pin a provider, or ``"auto"``.
        tool: the calling tool; ``auto`` routing uses it.
        step: ``"single"`` for one-shot tools, ``"early"``/``"final"`` for workflow steps.
        temperature: 0–1, or ``None`` for the provider's default.
        thinking_mode: ``minimal`` … ``max`` or ``None``; mapped per provider.
        use_websearch: enable the provider's web search (Kimi ``$web_search``, GLM
            ``web_search``).
        max_output_tokens: cap on generated tokens, or ``None``.
        on_delta: called for each streamed piece; when given, the call streams.
        allow_fallback: when false only the named model is tried (its providers, retried).
    """

    messages: tuple[dict[str, Any], ...] = attrs.field(converter=_messages)
    model: str = "auto"
    tool: str = "chat"
    step: Step = "single"
    temperature: float | None = None
    thinking_mode: str | None = None
    use_websearch: bool = False
    max_output_tokens: int | None = None
    on_delta: DeltaCallback | None = attrs.field(default=None, eq=False, repr=False)
    allow_fallback: bool = True


@attrs.frozen
class Usage:
    """Token counts of one answer; ``estimated`` when the provider reported none."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            self.estimated or other.estimated,
        )

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Attempt:
    """One (provider, model) tried for a call and how it ended.

    ``outcome`` is ``"ok"`` or the ``reason`` of the error (``circuit_open``,
    ``upstream_unavailable``, ``upstream_rate_limited``, ``rate_limited``, ``upstream_auth`` …).
    """

    provider: str
    model: str
    outcome: str
    detail: str = ""
    retry_after_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "provider": self.provider,
            "model": self.model,
            "outcome": self.outcome,
        }
        if self.detail:
            out["detail"] = self.detail
        if self.retry_after_s is not None:
            out["retry_after_s"] = round(self.retry_after_s, 3)
        return out


@attrs.frozen(kw_only=True)
class ChatResponse:
    """The answer to a :class:`ChatRequest`.

    Attributes:
        content: the answer text.
        reasoning: reasoning content of a thinking model ("" when none).
        model: the model that served the answer.
        provider: the provider that served it.
        usage: token counts (summed over a web-search loop).
        attempts: every (provider, model) tried, in order, the last one being the answer.
        finish_reason: as the provider reported it.
        key_fingerprint: :meth:`exai.config.Secret.fingerprint` of the key used, or "".
        web_search_rounds: builtin web-search round trips made.
    """

    content: str
    reasoning: str = ""
    model: str
    provider: str
    usage: Usage = Usage()
    attempts: tuple[Attempt, ...] = ()
    finish_reason: str | None = None
    key_fingerprint: str = ""
    web_search_rounds: int = 0
