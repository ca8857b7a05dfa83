"""exai: one trio daemon that serves AI tools over MCP to many clients.

Public names are re-exported here and loaded on first use, so ``import exai`` stays cheap and
``exai.resilience`` can be used on its own::

    from exai import CircuitBreaker, TokenBucket, Settings, Client
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Settings": "exai.config",
    "Secret": "exai.config",
    "CircuitBreaker": "exai.resilience",
    "TokenBucket": "exai.resilience",
    "RedisTokenBucket": "exai.resilience",
    "retrying": "exai.resilience",
    "Client": "exai.client",
    "serve": "exai.server.app",
    "errors": "exai.errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exai' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "errors" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
