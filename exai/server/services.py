"""Shared services the daemon hands to tools: providers, conversations, idempotency results.

:func:`open_services` is the one place that starts them, each an async context manager owned
by the daemon's run, and closes them in reverse order on exit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from exai.config import Settings

__all__ = ["open_services"]


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """Yield ``{"providers": …, "conversations": …, "idempotency": …}`` for the daemon."""
    from exai.providers import ProviderRouter
    from exai.storage.base import store_kind
    from exai.storage.service import ConversationService
    from exai.tools.sandbox import FileSandbox

    services: dict[str, Any] = {"files": FileSandbox(settings)}
    async with AsyncExitStack() as stack:
        bridge = None
        if settings.redis_url or store_kind(settings.effective_storage_url) == "postgres":
            from exai.storage.aio_bridge import open_asyncio_bridge

            bridge = await stack.enter_async_context(open_asyncio_bridge())
        conversations = await stack.enter_async_context(
            ConversationService.open(settings, bridge=bridge)
        )
        services["conversations"] = conversations
        if conversations.idempotency is not None:
            services["idempotency"] = conversations.idempotency
        router = await stack.enter_async_context(ProviderRouter(settings))
        if conversations.redis is not None:
            router.share_limits(conversations.redis)
        services["providers"] = router
        # learn what each configured provider serves (GET /models), bounded per provider, in
        # the background: start-up does not wait for a slow or unreachable endpoint
        background = await stack.enter_async_context(trio.open_nursery())
        stack.callback(background.cancel_scope.cancel)
        background.start_soon(router.refresh_models)
        yield services
