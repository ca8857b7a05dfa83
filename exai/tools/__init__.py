"""Tools served by exai and the registry they live in."""

from __future__ import annotations

from exai.tools.base import ToolContext, ToolRegistry, ToolResult, ToolSpec

__all__ = ["ToolContext", "ToolRegistry", "ToolResult", "ToolSpec", "default_registry"]


def default_registry() -> ToolRegistry:
    """Every built-in tool that is available in this build, in ``tools/list`` order."""
    from exai.tools.chat import CHAT
    from exai.tools.core import STATUS, VERSION
    from exai.tools.listmodels import LISTMODELS
    from exai.tools.workflows import register_suite

    reg = ToolRegistry([CHAT])
    register_suite(reg)
    for spec in (LISTMODELS, VERSION, STATUS):
        reg.register(spec)
    return reg
