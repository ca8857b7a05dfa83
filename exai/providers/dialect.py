"""How a request is phrased for one kind of OpenAI-compatible provider.

A :class:`Dialect` builds the ``/chat/completions`` body for a :class:`ChatRequest` and decides
what to do when the answer asks for a tool call (Kimi's ``$web_search`` builtin is answered by
echoing it back). :class:`OpenAIDialect` is the plain OpenAI wire format; ``kimi.py`` and
``glm.py`` hold the two providers' differences. Dialects are pure: no I/O, easy to test.
Which dialect speaks for a provider kind is decided above them, in :mod:`exai.providers.dialects`.
"""

from __future__ import annotations

from typing import Any

from exai.providers.types import ChatRequest

__all__ = ["Dialect", "OpenAIDialect"]


class Dialect:
    """Base: the plain OpenAI chat-completions format."""

    kind = "openai"
    #: Builtin tool round trips allowed per call (web search); the loop is bounded.
    max_tool_rounds = 3
    #: Ask for usage in the last stream chunk (``stream_options.include_usage``).
    stream_usage_option = True

    def build_body(self, req: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        """The request body for ``model``."""
        body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in req.messages]}
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.max_output_tokens is not None:
            body["max_tokens"] = req.max_output_tokens
        if stream:
            body["stream"] = True
            if self.stream_usage_option:
                body["stream_options"] = {"include_usage": True}
        self.add_features(body, req, model)
        return body

    def add_features(self, body: dict[str, Any], req: ChatRequest, model: str) -> None:
        """Provider-specific additions (web search, thinking). Plain OpenAI: none."""

    def tool_round(
        self, message: dict[str, Any], finish_reason: str | None
    ) -> list[dict[str, Any]] | None:
        """Messages to append and send again when the answer is a builtin tool call.

        ``None`` means the answer is final.
        """
        return None


class OpenAIDialect(Dialect):
    """Any OpenAI-compatible endpoint (vLLM, Ollama, OpenRouter, the exai mock)."""
