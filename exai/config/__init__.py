"""exai's settings: one frozen attrs :class:`Settings`, read from the environment, an optional
``.env`` and a TOML file; secrets that never show themselves.

::

    settings = Settings.from_env()        # EXAI_*, KIMI_*, GLM_*, .env, EXAI_CONFIG
    settings.provider("kimi").api_key     # a Secret: reveal() only where it leaves

The package, lowest first: :mod:`~exai.config.secret` (:class:`Secret`, URL redaction, the
token text rule), :mod:`~exai.config.providers` (:class:`ProviderSettings`),
:mod:`~exai.config.loader` (the sources and their precedence), :mod:`~exai.config.settings`
(:class:`Settings` and its validation), :mod:`~exai.config.hygiene` (which values are secrets,
and the environment a child process may inherit).
"""

from exai.config.loader import env_name
from exai.config.providers import BUILTIN_PROVIDERS, PROVIDER_FIELDS, ProviderSettings
from exai.config.secret import TOKEN_TEXT_RULE, Secret, is_token_text, redact_url
from exai.config.settings import (
    Settings,
    default_state_dir,
    is_loopback,
    known_env_names,
    listen_url,
)

__all__ = [
    "BUILTIN_PROVIDERS",
    "PROVIDER_FIELDS",
    "TOKEN_TEXT_RULE",
    "ProviderSettings",
    "Secret",
    "Settings",
    "default_state_dir",
    "env_name",
    "is_loopback",
    "is_token_text",
    "known_env_names",
    "listen_url",
    "redact_url",
]
