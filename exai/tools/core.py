"""Local tools of the daemon core: ``version`` and ``status``.

Both read the daemon through the narrow view it hands its tools (``ctx.services["daemon"]``, a
:class:`~exai.tools.base.DaemonView`): its status and the protocol versions it speaks.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

import anyio
import anyio.to_thread

from exai import __version__
from exai.tools.base import ToolContext, ToolResult, ToolSpec

__all__ = ["STATUS", "VERSION"]

_EMPTY: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def _dist_version(name: str) -> str:
    """The installed distribution's version (anyio has no ``__version__``), read once at
    import, before the event loop runs."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_ANYIO_VERSION = _dist_version("anyio")

_platform: str | None = None
_PLATFORM_LIMITER = anyio.CapacityLimiter(1)


async def platform_name() -> str:
    """``platform.platform()``, computed once in a worker thread: it reads the interpreter's
    binary and may run ``uname``, which must not happen on the event loop."""
    global _platform
    if _platform is None:
        _platform = await anyio.to_thread.run_sync(platform.platform, limiter=_PLATFORM_LIMITER)
    return _platform


async def _version(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    import trio

    daemon = ctx.services.get("daemon")
    versions = getattr(daemon, "protocol_versions", ())
    return ToolResult.json(
        {
            "exai": __version__,
            "python": sys.version.split()[0],
            "platform": await platform_name(),
            "trio": trio.__version__,
            "anyio": _ANYIO_VERSION,
            "protocol_versions": list(versions),
        }
    )


async def _status(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    out: dict[str, Any] = {}
    daemon = ctx.services.get("daemon")
    if daemon is not None:
        out["daemon"] = daemon.status()
    for name in ("providers", "conversations", "files"):
        svc = ctx.services.get(name)
        if svc is not None and hasattr(svc, "status"):
            res = svc.status()
            if hasattr(res, "__await__"):
                res = await res
            out[name] = res
    return ToolResult.json(out)


VERSION = ToolSpec(
    name="version",
    description="Version of exai, its runtime and the MCP protocol versions it speaks.",
    input_schema=_EMPTY,
    handler=_version,
    timeout_s=5.0,
)

STATUS = ToolSpec(
    name="status",
    description=(
        "Health of the daemon: connections, in-flight calls, limits, uptime, providers "
        "(breaker states) and conversation stores."
    ),
    input_schema=_EMPTY,
    handler=_status,
    timeout_s=10.0,
)
