"""Which browser ``Origin`` may talk to the daemon (DNS rebinding and cross-site requests).

A web page can make the browser send requests to ``http://127.0.0.1:8079`` — a cross-site
WebSocket needs no permission at all, and DNS rebinding turns ``evil.example`` into a loopback
address. Browsers always say where such a request comes from (``Origin``); MCP clients that
are not browsers send none. So, as the MCP transport spec requires of servers on localhost, a
request (an HTTP request or a WebSocket upgrade, on every door) that carries an ``Origin`` is
served only when that origin is allowed:

* the loopback origins, any port: ``http(s)://localhost``, ``http(s)://127.0.0.1``,
  ``http(s)://[::1]`` (pages served by the user's own tools, such as MCP Inspector);
* each entry of ``EXAI_ALLOWED_ORIGINS``: ``scheme://host[:port]``, with ``*`` for any port.

Anything else is refused with 403 before the request is read further. A request without
``Origin`` is not a browser's and passes (authentication still applies).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

from exai.errors import ConfigError

__all__ = ["OriginPolicy", "parse_origin_entry"]

_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an origin, or ``None`` when it is not one."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def parse_origin_entry(entry: str) -> tuple[str, str, int | None]:
    """One ``EXAI_ALLOWED_ORIGINS`` entry: (scheme, host, port or ``None`` for any).

    Raises:
        ConfigError: not ``http(s)://host[:port|:*]``.
    """
    text = entry.strip()
    wildcard = text.endswith(":*")
    parsed = _split(text[:-2] if wildcard else text)
    if parsed is None:
        raise ConfigError(
            f"EXAI_ALLOWED_ORIGINS: {entry!r} is not an origin (http[s]://host[:port], "
            "':*' for any port)"
        )
    scheme, host, port = parsed
    return scheme, host, None if wildcard else port


@attrs.frozen
class OriginPolicy:
    """The allowed origins (see the module docstring).

    Args:
        entries: ``EXAI_ALLOWED_ORIGINS`` (checked by :func:`parse_origin_entry`).
    """

    allowed: tuple[tuple[str, str, int | None], ...] = ()

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> OriginPolicy:
        return cls(tuple(parse_origin_entry(e) for e in entries))

    def allows(self, origin: str | None) -> bool:
        """Whether a request with this ``Origin`` header (``None``: absent) may be served."""
        if origin is None:
            return True
        parsed = _split(origin.strip())
        if parsed is None:
            return False  # "null" (a file or a sandboxed frame) or garbage
        scheme, host, port = parsed
        if host in _LOOPBACK_HOSTS:
            return True
        return any(
            scheme == s and host == h and (p is None or port == p) for s, h, p in self.allowed
        )
