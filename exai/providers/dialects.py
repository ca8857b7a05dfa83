"""Which :class:`~exai.providers.dialect.Dialect` speaks for each ``ProviderSettings.kind``.

The base dialect and the providers' own (:mod:`~exai.providers.kimi`, :mod:`~exai.providers.glm`)
sit below this module; adding a provider dialect means a module beside them and one line in
:data:`DIALECTS`.
"""

from __future__ import annotations

from exai.providers.dialect import Dialect, OpenAIDialect
from exai.providers.glm import GLMDialect
from exai.providers.kimi import KimiDialect

__all__ = ["DIALECTS", "dialect_for"]

#: provider kind → its dialect; any other kind speaks plain OpenAI
DIALECTS: dict[str, type[Dialect]] = {"kimi": KimiDialect, "glm": GLMDialect}


def dialect_for(kind: str) -> Dialect:
    """The dialect for a ``ProviderSettings.kind``; unknown kinds speak plain OpenAI."""
    return DIALECTS.get(kind, OpenAIDialect)()
