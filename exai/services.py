"""Shared services the daemon hands to tools: providers, conversations, idempotency results.

:func:`open_services` is the one place that starts them, each an async context manager owned
by the daemon's run, and closes them in reverse order on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from exai.config import Settings

__all__ = ["open_services"]


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """Yield ``{"providers": …, "conversations": …, "idempotency": …}`` for the daemon."""
    from exai.providers import ProviderRouter

    services: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        services["providers"] = await stack.enter_async_context(ProviderRouter(settings))
        yield services
