"""Which store a storage URL names, and opening it: :func:`store_kind`, :func:`open_store`.

The stores (:mod:`~exai.storage.sqlite`, :mod:`~exai.storage.postgres`) implement the protocol
of :mod:`exai.storage.base` and sit below this module; adding a store means a module beside
them, a scheme in :func:`store_kind` and a branch in :func:`open_store`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from exai.config import Settings
from exai.errors import ConfigError
from exai.storage.base import ConversationStore

if TYPE_CHECKING:
    from exai.storage.aio_bridge import AsyncioBridge

__all__ = ["open_store", "store_kind"]


def store_kind(url: str) -> str:
    """``"sqlite"`` or ``"postgres"`` for a storage URL.

    Raises:
        ConfigError: the scheme is neither.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgres"
    raise ConfigError(
        f"EXAI_STORAGE_URL: unsupported scheme {scheme!r}; use sqlite:///path or postgresql://…"
    )


@asynccontextmanager
async def open_store(
    settings: Settings, bridge: AsyncioBridge | None = None
) -> AsyncIterator[ConversationStore]:
    """Open the store ``settings.effective_storage_url`` names.

    ``sqlite:///abs/path`` (or ``sqlite:///relative``) needs no bridge. ``postgresql://…`` runs
    asyncpg through ``bridge`` and applies pending migrations before yielding.

    Raises:
        ConfigError: an unsupported URL, or PostgreSQL without a bridge.
        StoreUnavailableError: PostgreSQL cannot be reached.
    """
    url = settings.effective_storage_url
    kind = store_kind(url)
    store: ConversationStore
    if kind == "sqlite":
        from exai.storage.sqlite import SQLiteStore

        store = SQLiteStore.from_url(url, settings)
    else:
        if bridge is None:
            raise ConfigError("a PostgreSQL store needs the asyncio bridge (open_asyncio_bridge)")
        from exai.storage.postgres import PostgresStore

        store = PostgresStore.from_url(url, settings, bridge)
    async with store:
        yield store
