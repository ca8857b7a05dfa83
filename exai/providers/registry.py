"""Which provider serves which model, and which (provider, model) chain a call tries.

Sources, in order: each provider's configured ``models``, then what its ``GET /models``
reported. A model served by several providers is tried on each, in settings order. Providers
that are not configured (Kimi or GLM without a key) are never routed to.

Routing (:meth:`ModelRegistry.resolve`):

* ``"auto"`` (or no model, with ``EXAI_DEFAULT_MODEL=auto``): the *quality* class
  (``EXAI_QUALITY_MODELS``) for deep-work tools (``thinkdeep``, ``consensus``) and for final
  workflow steps; the *fast* class (``EXAI_FAST_MODELS``) for everything else. The chain is that
  class's models in order, then the other class's as a last resort.
* an explicit model always comes first; when it belongs to a class, the rest of that class
  follows as its fallback chain (``allow_fallback=False`` tries only the named model).
* ``"<provider>/<model>"`` pins one provider, with no fallback.

Unknown models are routed by name to the builtin kind that owns the prefix (``kimi-`` and
``moonshot-`` to Kimi, ``glm-`` to GLM) so a newly released model works without configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from exai.config import Settings
from exai.errors import NoProviderError
from exai.providers.provider import Provider

__all__ = ["QUALITY_TOOLS", "ModelClass", "ModelRegistry"]

ModelClass = Literal["fast", "quality"]

#: Tools whose every call is deep work and gets the quality class under ``auto``.
QUALITY_TOOLS = frozenset({"thinkdeep", "consensus"})

_PREFIX_KIND = (("kimi-", "kimi"), ("moonshot-", "kimi"), ("glm-", "glm"))


class ModelRegistry:
    """Maps models to providers and resolves a request's fallback chain.

    Args:
        settings: ``fast_models``, ``quality_models``, ``default_model``.
        providers: every provider by name, in settings order (configured or not).
    """

    def __init__(self, settings: Settings, providers: Mapping[str, Provider]) -> None:
        self.settings = settings
        self.providers = dict(providers)

    # -- lookups ---------------------------------------------------------------------------
    def configured(self) -> list[str]:
        return [n for n, p in self.providers.items() if p.configured]

    def providers_for(self, model: str) -> list[str]:
        """Configured providers serving ``model``, in settings order."""
        names = [n for n, p in self.providers.items() if p.configured and model in p.models()]
        if names:
            return names
        low = model.lower()
        for prefix, kind in _PREFIX_KIND:
            if low.startswith(prefix):
                return [
                    n for n, p in self.providers.items() if p.configured and p.settings.kind == kind
                ]
        return []

    def models(self) -> dict[str, list[str]]:
        """Every known model and the providers that list it (configured or not)."""
        out: dict[str, list[str]] = {}
        for name, p in self.providers.items():
            for m in p.models():
                out.setdefault(m, []).append(name)
        return out

    def class_of(self, model: str) -> ModelClass | None:
        if model in self.settings.quality_models:
            return "quality"
        if model in self.settings.fast_models:
            return "fast"
        return None

    def class_models(self, cls: ModelClass) -> tuple[str, ...]:
        s = self.settings
        return s.quality_models if cls == "quality" else s.fast_models

    @staticmethod
    def auto_class(tool: str, step: str) -> ModelClass:
        """The class ``auto`` picks for a tool and step."""
        if tool in QUALITY_TOOLS or step == "final":
            return "quality"
        return "fast"

    # -- resolution ------------------------------------------------------------------------
    def resolve(
        self,
        model: str | None,
        tool: str = "chat",
        step: str = "single",
        *,
        allow_fallback: bool = True,
    ) -> list[tuple[str, str]]:
        """The (provider, model) chain a call will try, in order.

        Raises:
            NoProviderError: nothing configured serves the model (the message says which
                providers are configured and how to add one).
        """
        name = (model or "").strip() or self.settings.default_model or "auto"
        if name.lower() == "auto":
            first = self.auto_class(tool, step)
            other: ModelClass = "fast" if first == "quality" else "quality"
            chain = self._expand([*self.class_models(first), *self.class_models(other)])
            if not chain:
                # none of the fast/quality models is served (say, only a local endpoint is
                # configured): use what the configured providers do serve, in settings order
                served = [
                    (n, m) for n, p in self.providers.items() if p.configured for m in p.models()
                ]
                chain = served[:1] + [c for c in served[1:] if c[0] != served[0][0]]
            if not chain:
                raise self._no_provider(f"auto ({first} models)", self.class_models(first))
            return chain
        pinned = self._pinned(name)
        if pinned is not None:
            return [pinned]
        models = [name]
        cls = self.class_of(name)
        if allow_fallback and cls is not None:
            models += [m for m in self.class_models(cls) if m != name]
        chain = self._expand(models)
        if not chain or (not allow_fallback and chain[0][1] != name):
            raise self._no_provider(repr(name), (name,))
        return chain

    def _pinned(self, name: str) -> tuple[str, str] | None:
        prov, sep, model = name.partition("/")
        if not sep or prov not in self.providers or not model:
            return None
        if not self.providers[prov].configured:
            raise self._no_provider(repr(name), (model,))
        return prov, model

    def _expand(self, models: Iterable[str]) -> list[tuple[str, str]]:
        chain: list[tuple[str, str]] = []
        for m in models:
            for p in self.providers_for(m):
                if (p, m) not in chain:
                    chain.append((p, m))
        return chain

    def _no_provider(self, what: str, models: Iterable[str]) -> NoProviderError:
        configured = self.configured()
        listed = sorted(self.models())
        return NoProviderError(
            f"no configured provider serves {what}. Configured providers: "
            f"{', '.join(configured) or 'none'}; known models: {', '.join(listed) or 'none'}. "
            "Add one with KIMI_API_KEY=… or GLM_API_KEY=…, or an OpenAI-compatible endpoint "
            "with EXAI_PROVIDER_<NAME>_BASE_URL=… (and EXAI_PROVIDER_<NAME>_MODELS=…).",
            data={"configured": configured, "models": list(models)},
        )
