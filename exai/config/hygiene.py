"""Secrets hygiene: which values the settings hold are secrets, and what a child process (git, a
formatter, a hook) may inherit.

Shared by several layers on purpose: tools that start a process (and plugins that do) use
:func:`child_env`; ``exai doctor`` uses :func:`child_env`, :func:`secret_values` and
:func:`token_entries`. It belongs with the settings because it is a statement about them.

exai holds provider keys, client tokens and database passwords. A child process needs none of
them, and a child that logs its environment (or crashes with it in a core dump) must not be able
to leak them. :func:`child_env` builds the environment to pass to ``subprocess``::

    subprocess.run(["git", "ls-files"], env=child_env(settings=settings), ...)

It removes, by name:

* every ``KIMI_*`` and ``GLM_*`` variable (keys, key files, base URLs);
* ``EXAI_TOKEN``, ``EXAI_TOKENS`` and anything starting with them (``*_FILE``);
* every ``EXAI_*`` setting whose value is a :class:`~exai.config.Secret` (storage and Redis
  URLs, which may carry a password), with its ``_FILE`` variant;
* ``EXAI_PROVIDER_<NAME>_API_KEY`` and ``…_API_KEY_FILE``;
* any ``*_API_KEY`` / ``*_API_KEY_FILE`` (``OPENAI_API_KEY`` and friends);

and, when ``settings`` is given, by value: any variable whose value equals, or contains, a
secret the settings hold (each client token on its own, each provider key, each URL and the
password inside it). Values read from ``*_FILE`` never enter ``os.environ`` in the first place
(see :mod:`exai.config`); this catches the ones a user exported under another name.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping

import attrs

from exai.config.secret import Secret
from exai.config.settings import Settings

__all__ = ["TokenEntry", "child_env", "is_secret_name", "secret_values", "token_entries"]

_DROP_PREFIXES = ("KIMI_", "GLM_", "EXAI_TOKEN")
_PROVIDER_KEY = re.compile(r"^EXAI_PROVIDER_[A-Z0-9]+_API_KEY(_FILE)?$")
_ANY_API_KEY = re.compile(r"^[A-Za-z0-9_]*API_KEY(_FILE)?$", re.IGNORECASE)
#: a secret shorter than this is matched only as a whole value, never as a substring
#: (a 3-character "password" would otherwise strip half the environment)
_MIN_SUBSTRING = 8


def _secret_setting_names() -> frozenset[str]:
    names: set[str] = set()
    for f in attrs.fields(Settings):
        if "Secret" in str(f.type):
            var = f.metadata.get("env") or "EXAI_" + f.name.upper()
            names.update({var, var + "_FILE"})
    return frozenset(names)


_SECRET_SETTINGS = _secret_setting_names()


@attrs.frozen(kw_only=True)
class TokenEntry:
    """One client-token entry as written in ``EXAI_TOKENS`` (see :mod:`exai.server.auth`).

    ``length`` is the length of a plain token (``None`` for a ``sha256:`` entry, whose strength
    cannot be judged). The value itself is deliberately not an attribute.
    """

    position: int
    name: str
    hashed: bool
    length: int | None


def _split_entries(raw: str) -> list[tuple[int, str]]:
    out = []
    for lineno, line in enumerate(raw.replace(",", "\n").splitlines(), start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append((lineno, entry))
    return out


def _entry_parts(entry: str) -> tuple[str | None, str]:
    """``(name, value)`` the way :func:`exai.server.auth.parse_tokens` splits an entry."""
    if not entry.startswith("sha256:") and ":" in entry:
        name, value = entry.split(":", 1)
        return name.strip(), value
    return None, entry


def token_entries(tokens: Secret | None) -> list[TokenEntry]:
    """Describe each token entry without exposing it: name, hashed or not, length."""
    if not tokens:
        return []
    out = []
    for position, (_lineno, entry) in enumerate(_split_entries(tokens.reveal()), start=1):
        name, value = _entry_parts(entry)
        hashed = value.startswith("sha256:")
        out.append(
            TokenEntry(
                position=position,
                name=name or f"client-{position}",
                hashed=hashed,
                length=None if hashed else len(value),
            )
        )
    return out


def _plain_tokens(tokens: Secret) -> list[str]:
    values = []
    for _lineno, entry in _split_entries(tokens.reveal()):
        _name, value = _entry_parts(entry)
        if value and not value.startswith("sha256:"):
            values.append(value)
    return values


def secret_values(settings: Settings) -> list[str]:
    """Every secret string ``settings`` holds, longest first: whole secrets, each plain client
    token, and the password part of each URL. For scrubbing text and filtering environments;
    never print the result."""
    found: set[str] = set()
    secrets: list[Secret | None] = [
        settings.tokens,
        settings.token,
        settings.storage_url,
        settings.redis_url,
        settings.session_signing_key,
    ]
    secrets.extend(p.api_key for p in settings.providers)
    for secret in secrets:
        if not secret:
            continue
        value = secret.reveal()
        found.add(value)
        if "://" in value:
            try:
                password = urllib.parse.urlsplit(value).password
            except ValueError:
                password = None
            if password:
                found.add(password)
                found.add(urllib.parse.unquote(password))
    if settings.tokens:
        found.update(_plain_tokens(settings.tokens))
    return sorted((v for v in found if v), key=len, reverse=True)


def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret (or, for ``*_FILE``, names
    a file holding one): what :func:`child_env` drops by name."""
    return _drop_by_name(name)


def _drop_by_name(name: str) -> bool:
    return (
        name.startswith(_DROP_PREFIXES)
        or name in _SECRET_SETTINGS
        or bool(_PROVIDER_KEY.match(name))
        or bool(_ANY_API_KEY.match(name))
    )


def _carries_secret(value: str, secrets: Iterable[str]) -> bool:
    for secret in secrets:
        if value == secret or (len(secret) >= _MIN_SUBSTRING and secret in value):
            return True
    return False


def child_env(
    environ: Mapping[str, str] | None = None, *, settings: Settings | None = None
) -> dict[str, str]:
    """The environment to give a child process: ``environ`` without secrets.

    Args:
        environ: the environment to filter (default ``os.environ``); not modified.
        settings: when given, also drop every variable whose value is, or contains, one of its
            secrets (see :func:`secret_values`).

    Returns:
        A new dict, safe to pass as ``subprocess.run(..., env=...)``.
    """
    env = os.environ if environ is None else environ
    secrets = secret_values(settings) if settings is not None else []
    return {
        name: value
        for name, value in env.items()
        if not _drop_by_name(name) and not _carries_secret(value, secrets)
    }
