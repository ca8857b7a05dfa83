"""Secrets and what may travel: :class:`Secret` (a value that never shows itself),
:func:`redact_url`, and the rule a client token's text obeys (:data:`TOKEN_TEXT_RULE`).

The lowest module of the settings: it imports nothing of exai.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse

import attrs

__all__ = ["TOKEN_TEXT_RULE", "Secret", "is_token_text", "redact_url"]


@attrs.frozen(repr=False, eq=False)
class Secret:
    """A value that never shows itself in ``repr``, ``str``, logs, errors or status output.

    Use :meth:`reveal` at the one place that needs the value (an HTTP header, a connect call).
    """

    _value: str

    def reveal(self) -> str:
        """The secret value. Call it only where the value leaves for its destination."""
        return self._value

    def fingerprint(self) -> str:
        """A short, stable, non-reversible tag that tells two secrets apart in logs."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:8]

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return (
            hashlib.sha256(self._value.encode()).digest()
            == hashlib.sha256(other._value.encode()).digest()
        )

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._value.encode()).digest())

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def redacted(self) -> str:
        """For display: a URL keeps scheme, host and path with its password masked;
        anything else is fully masked."""
        return redact_url(self._value) if "://" in self._value else "**********"


def redact_url(url: str) -> str:
    """``postgresql://u:pw@h/db`` → ``postgresql://u:***@h/db``; query strings are dropped."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "**********"
    if parts.password is None:
        return url.split("?", 1)[0]  # nothing to mask (and sqlite:////abs/path stays intact)
    netloc = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:  # (not a number, or out of range: the URL is shown as unusable)
        return "**********"
    if port:
        netloc = f"{netloc}:{port}"
    if parts.username:
        user = parts.username + (":***" if parts.password else "")
        netloc = f"{user}@{netloc}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")
#: What a client token may be made of, and why (used by the daemon's tokens and EXAI_TOKEN).
TOKEN_TEXT_RULE = (
    "a token must be printable ASCII without spaces (letters, digits and punctuation): it "
    "travels in an HTTP header, where clients disagree on how to encode other characters "
    "(UTF-8 or Latin-1), so such a token would work for some clients and not others"
)


def is_token_text(value: str) -> bool:
    """Whether ``value`` may be used as a client token (see :data:`TOKEN_TEXT_RULE`)."""
    return bool(_TOKEN_TEXT.fullmatch(value))
