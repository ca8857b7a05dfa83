"""Moonshot Kimi: the ``$web_search`` builtin tool loop and thinking models.

Web search on Kimi is a builtin function the model calls; the server runs the search itself and
only needs the call echoed back: the assistant message with its ``tool_calls``, then one
``role: tool`` message per call whose content is the call's arguments. The loop is bounded by
:attr:`KimiDialect.max_tool_rounds`.

Thinking models (``kimi-thinking-preview``, ``kimi-k2-thinking``) return ``reasoning_content``
beside ``content``; the client keeps it and the echo carries it back as the API asks.

Kimi rejected requests whose headers exceeded about 4 KB, so nothing rides in headers but the
key and the accept type.
"""

from __future__ import annotations

import json
from typing import Any

from exai.providers.client import loads
from exai.providers.dialect import Dialect
from exai.providers.types import ChatRequest

__all__ = ["WEB_SEARCH_TOOL", "KimiDialect"]

WEB_SEARCH_TOOL = {"type": "builtin_function", "function": {"name": "$web_search"}}


class KimiDialect(Dialect):
    """Kimi's differences from plain OpenAI."""

    kind = "kimi"
    # Kimi reports usage inside the final chunk's choice; it does not document stream_options.
    stream_usage_option = False

    def add_features(self, body: dict[str, Any], req: ChatRequest, model: str) -> None:
        if req.use_websearch:
            body["tools"] = [WEB_SEARCH_TOOL]

    def tool_round(
        self, message: dict[str, Any], finish_reason: str | None
    ) -> list[dict[str, Any]] | None:
        calls = message.get("tool_calls") or []
        if finish_reason != "tool_calls" or not calls:
            return None
        if not all(_name(c) == "$web_search" for c in calls):
            return None  # a tool we did not declare: return the answer as it is
        echo: dict[str, Any] = {
            "role": "assistant",
            "content": message.get("content") or "",
            "tool_calls": calls,
        }
        if message.get("reasoning_content"):
            echo["reasoning_content"] = message["reasoning_content"]
        out: list[dict[str, Any]] = [echo]
        for call in calls:
            args = (call.get("function") or {}).get("arguments") or "{}"
            try:
                parsed = loads(args)
            except ValueError:
                parsed = {}
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": call.get("id", ""),
                    "name": "$web_search",
                    "content": json.dumps(parsed, ensure_ascii=False),
                }
            )
        return out


def _name(call: dict[str, Any]) -> str:
    return str((call.get("function") or {}).get("name") or "")
