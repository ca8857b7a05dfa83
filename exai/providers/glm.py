"""ZhipuAI / Z.ai GLM: the ``web_search`` tool object and ``thinking``.

GLM runs web search server-side when the request declares
``{"type": "web_search", "web_search": {"enable": true}}``; no loop is needed. The glm-4.5 and
glm-4.6 families think when asked with ``thinking: {"type": "enabled"}``; ``thinking_mode
"minimal"`` turns it off explicitly, any other mode turns it on. Reasoning arrives as
``reasoning_content``.
"""

from __future__ import annotations

from typing import Any

from exai.providers.dialect import Dialect
from exai.providers.types import ChatRequest

__all__ = ["WEB_SEARCH_TOOL", "GLMDialect", "supports_thinking"]

WEB_SEARCH_TOOL = {"type": "web_search", "web_search": {"enable": True}}


def supports_thinking(model: str) -> bool:
    """True for the glm-4.5 / glm-4.6 families (``thinking`` parameter)."""
    m = model.lower()
    return m.startswith(("glm-4.5", "glm-4.6"))


class GLMDialect(Dialect):
    """GLM's differences from plain OpenAI."""

    kind = "glm"
    stream_usage_option = False  # GLM sends usage in the last chunk unasked

    def add_features(self, body: dict[str, Any], req: ChatRequest, model: str) -> None:
        if req.use_websearch:
            body["tools"] = [WEB_SEARCH_TOOL]
        if req.thinking_mode and supports_thinking(model):
            kind = "disabled" if req.thinking_mode == "minimal" else "enabled"
            body["thinking"] = {"type": kind}
