"""The ``listmodels`` tool: providers, their models, breaker states and limits, and routing."""

from __future__ import annotations

from typing import Any

from exai.errors import NoProviderError, ToolError
from exai.tools.base import ToolContext, ToolResult, ToolSpec

__all__ = ["LISTMODELS"]

HOW_TO_ADD = (
    "Set KIMI_API_KEY or GLM_API_KEY, or add an OpenAI-compatible endpoint with "
    "EXAI_PROVIDER_<NAME>_BASE_URL and EXAI_PROVIDER_<NAME>_MODELS (or [providers.<name>] in "
    "the TOML config)."
)


def _route(router: Any, tool: str, step: str) -> list[str] | str:
    try:
        return [f"{p}/{m}" for p, m in router.resolve("auto", tool, step)]
    except NoProviderError as exc:
        return f"unavailable: {exc.message}"


async def _listmodels(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    router = ctx.services.get("providers")
    if router is None:
        raise ToolError("no provider layer is configured in this daemon")
    status = router.status()
    providers: dict[str, Any] = {}
    for name, st in status["providers"].items():
        br = st["breaker"]
        providers[name] = {
            "configured": st["configured"],
            "kind": st["kind"],
            "host": st["host"],
            "models": st["models"],
            "breaker": br["state"],
            "retry_after_s": max(br["retry_after_s"], st["use"]["retry_after_s"]) or None,
            "limits": st["limits"],
            "in_flight": st["use"]["in_flight"],
        }
    data = {
        "providers": providers,
        "auto": {
            "fast (simple tools, early steps)": _route(router, "chat", "early"),
            "quality (thinkdeep, consensus, final steps)": _route(router, "thinkdeep", "final"),
        },
        "default_model": status["routing"]["default_model"],
        "how_to_add_a_provider": HOW_TO_ADD,
    }
    return ToolResult.json(data)


LISTMODELS = ToolSpec(
    name="listmodels",
    title="List models",
    description=(
        "The configured providers, the models each serves, each provider's circuit-breaker "
        "state and limits, and the chains 'auto' routes to."
    ),
    input_schema={"type": "object", "properties": {}, "additionalProperties": False},
    handler=_listmodels,
    timeout_s=10.0,
)
