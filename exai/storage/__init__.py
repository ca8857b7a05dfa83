"""Conversation storage: the store protocol, SQLite, PostgreSQL, Redis, the spool, the service.

Public names load on first use, so importing :mod:`exai.storage` does not import asyncpg,
redis-py or trio-asyncio (which patches asyncio) until they are needed::

    from exai.storage import ConversationService, Turn, open_asyncio_bridge

See ``docs/storage.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AppendResult": "exai.storage.base",
    "AsyncioBridge": "exai.storage.aio_bridge",
    "BridgedPgPool": "exai.storage.aio_bridge",
    "BridgedRedis": "exai.storage.aio_bridge",
    "ConversationService": "exai.storage.service",
    "ConversationStore": "exai.storage.base",
    "GuardedRedis": "exai.storage.redis_cache",
    "IdempotencyResults": "exai.storage.redis_cache",
    "PostgresStore": "exai.storage.postgres",
    "SQLiteStore": "exai.storage.sqlite",
    "Spool": "exai.storage.spool",
    "Thread": "exai.storage.model",
    "RecentThreads": "exai.storage.recent",
    "ThreadCache": "exai.storage.redis_cache",
    "Turn": "exai.storage.model",
    "migrate_storage": "exai.storage.migrate",
    "open_asyncio_bridge": "exai.storage.aio_bridge",
    "open_spool": "exai.storage.spool",
    "open_store": "exai.storage.stores",
    "store_breaker": "exai.storage.breakers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exai.storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
