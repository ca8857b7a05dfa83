"""Value objects of the provider layer: the request a tool makes and the answer it gets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
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


def _path(frames: list[tuple[Any, bool, bool, Any]], *last: tuple[bool, Any]) -> str:
    """``messages[1].parts[0]``: the step (a key in a dict, else an index) into each open
    container but the outermost, then ``last``."""
    steps = [(f[2], f[3]) for f in frames[1:]]
    return "messages" + "".join(f".{k}" if d else f"[{k}]" for d, k in [*steps, *last])


def unencodable_field(messages: Iterable[Any]) -> tuple[str, int] | None:
    """The first string in ``messages`` that is not valid Unicode (it holds a lone surrogate,
    so it cannot be sent as UTF-8), as ``("messages[1].content", character index)``; ``None``
    when every string is fine. Bounded: at most 100,000 strings are looked at.

    One depth-first walk in message order (a dict's non-ASCII key just before its value;
    every value, containers too, counts against the bound). It keeps one frame per open
    container — its items' iterator, whether it is a dict, and the step that reached it — and
    spells the field's name out only once a bad string is found (building it for every value
    was most of the walk's cost for every request)."""
    items = messages if isinstance(messages, list | tuple) else list(messages)
    # (items' iterator, a dict?, the parent a dict?, the key or index into the parent)
    frames: list[tuple[Iterator[tuple[Any, Any]], bool, bool, Any]] = [
        (enumerate(items), False, False, None)
    ]
    seen = 0
    while frames:
        frame = frames[-1]
        in_dict = frame[1]
        for label, value in frame[0]:
            if in_dict and isinstance(label, str) and not label.isascii():
                if seen >= _MAX_STRINGS:
                    return None
                seen += 1
                try:
                    label.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return f"{_path(frames)} (a key)", exc.start
            if seen >= _MAX_STRINGS:
                return None
            seen += 1
            if isinstance(value, str):
                if value.isascii():
                    continue
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    return _path(frames, (in_dict, label)), exc.start
                continue
            if isinstance(value, dict):
                frames.append((iter(value.items()), True, in_dict, label))
                break
            if isinstance(value, list | tuple):
                frames.append((enumerate(value), False, in_dict, label))
                break
        else:
            frames.pop()
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
        on_route: called with ``(provider, model)`` as each provider is tried, before it
            answers (so a call cancelled or timed out on the way still knows where it went).
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
    on_route: Callable[[str, str], None] | None = attrs.field(default=None, eq=False, repr=False)


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
        """``{"prompt_tokens", "completion_tokens", "total_tokens", "estimated"}``, in that order
        (``attrs.asdict``'s dict, built directly: twice per ``chat`` call)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "estimated": self.estimated,
        }


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
