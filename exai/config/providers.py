"""One LLM provider endpoint and its limits: :class:`ProviderSettings`, its fields
(:data:`PROVIDER_FIELDS`, the ``KIMI_<FIELD>`` / ``EXAI_PROVIDER_<NAME>_<FIELD>`` names) and the
built-in Kimi and GLM endpoints (:data:`BUILTIN_PROVIDERS`).
"""

from __future__ import annotations

from typing import Any

import attrs

from exai.config.secret import Secret

__all__ = ["BUILTIN_PROVIDERS", "PROVIDER_FIELDS", "ProviderSettings", "str_tuple"]


def str_tuple(v: Any) -> tuple[str, ...]:
    """A comma-separated string (or any iterable) as a tuple of non-empty strings."""
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    return tuple(str(x) for x in v)


PROVIDER_FIELDS = (
    "base_url",
    "api_key",
    "models",
    "kind",
    "rpm",
    "tpm",
    "max_concurrency",
    "pool_max",
    "connect_timeout_s",
    "stall_timeout_s",
    "breaker_failure_rate",
    "breaker_minimum_calls",
    "breaker_window",
    "breaker_open_s",
    "breaker_max_open_s",
    "quota_hold_s",
)


@attrs.frozen(kw_only=True)
class ProviderSettings:
    """One LLM provider endpoint and its limits.

    ``kind`` is ``"kimi"``, ``"glm"`` or ``"openai"`` (any OpenAI-compatible endpoint).
    ``rpm``/``tpm`` of 0 mean unlimited.
    """

    name: str
    kind: str = "openai"
    base_url: str
    api_key: Secret | None = None
    models: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)
    rpm: float = 0.0
    tpm: float = 0.0
    max_concurrency: int = 8
    pool_max: int = 16
    connect_timeout_s: float = 5.0
    stall_timeout_s: float = 60.0
    breaker_failure_rate: float = 0.5
    breaker_minimum_calls: int = 5
    breaker_window: int = 20
    breaker_open_s: float = 5.0
    breaker_max_open_s: float = 120.0
    #: after a "quota exhausted / insufficient balance" answer, no request is sent to this
    #: provider for this long (a longer ``Retry-After`` wins)
    quota_hold_s: float = 300.0

    @property
    def configured(self) -> bool:
        """True when the provider can be called: a key is set (or the endpoint needs none)."""
        return bool(self.api_key) or self.kind == "openai"


BUILTIN_PROVIDERS: dict[str, dict[str, Any]] = {
    "kimi": {
        "kind": "kimi",
        "base_url": "https://api.moonshot.ai/v1",
        "models": (
            "kimi-k2-0905-preview",
            "kimi-k2-turbo-preview",
            "kimi-thinking-preview",
            "moonshot-v1-8k",
            "moonshot-v1-32k",
            "moonshot-v1-128k",
        ),
        "max_concurrency": 6,
    },
    "glm": {
        "kind": "glm",
        "base_url": "https://api.z.ai/api/paas/v4",
        "models": ("glm-4.6", "glm-4.5", "glm-4.5-flash", "glm-4.5-air", "glm-4.5v"),
        "max_concurrency": 4,
    },
}
