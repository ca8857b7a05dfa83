"""``exai migrate``: open the configured store, which applies its pending migrations, and say
what was done (secrets redacted). The daemon applies them at start too."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from exai.config import Settings
from exai.storage.stores import open_store, store_kind

__all__ = ["migrate_storage"]


async def migrate_storage(settings: Settings, *, bridge: Any = None) -> dict[str, Any]:
    """Open the configured store, applying pending migrations (``exai migrate``); what was
    done, secrets redacted."""
    async with AsyncExitStack() as stack:
        if bridge is None and store_kind(settings.effective_storage_url) == "postgres":
            from exai.storage.aio_bridge import open_asyncio_bridge

            bridge = await stack.enter_async_context(open_asyncio_bridge())
        store = await stack.enter_async_context(open_store(settings, bridge))
        applied = list(getattr(store, "migrations_applied", []))
        return {"store": store.status(), "applied": applied}
