"""Which browser ``Origin`` and which ``Host`` may talk to the daemon (cross-site requests, DNS
rebinding).

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

**Host (DNS rebinding).** A rebinding page's own requests are same-origin for the browser: a
``GET`` (an SSE stream, say) carries no ``Origin`` at all — but its ``Host`` names the
attacker's domain (``Host: attacker.example:8079``). A daemon bound to a loopback address
(``EXAI_HOST``: ``127.x.x.x``, ``::1``, ``localhost``) therefore serves only requests whose
``Host`` is a loopback name or address (``localhost``, ``127.x.x.x``, ``[::1]``), any port, or
an entry of ``EXAI_ALLOWED_HOSTS`` (``name`` for any port, ``name:port``; the public names a
trusted balancer forwards); an absolute-form target's authority stands for ``Host`` (RFC 9112
§3.2.2: :func:`~exai.server.http11.request_host`). Anything else is refused with 421
(Misdirected Request) before ``Origin``, the token or the body are looked at, on the WebSocket
upgrade (both the MCP and the old op protocol's door) and on every HTTP request. A request
without ``Host`` (HTTP/1.0: never a browser's) passes. A daemon bound elsewhere (a LAN
address, ``0.0.0.0``) checks ``Host`` only against a list it is given — its clients name it by
names exai cannot guess — as the official MCP Python SDK does; ``EXAI_ALLOWED_HOSTS=*`` turns
the check off on loopback too. The admin listener is not checked: it serves only health and
aggregate counters, read-only, no secret.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs

from exai.config import Settings, is_loopback
from exai.errors import ConfigError

__all__ = ["OriginPolicy", "parse_host_entry", "parse_origin_entry", "split_host"]

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


#: a host name as a Host header carries it (letters, digits, ``-``, ``.``, ``_``)
_NAME = re.compile(r"[a-z0-9_.-]+")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port or None)`` of a ``Host`` value (``name``, ``name:port``, ``[v6]:port``);
    the host lower-case, an IPv6 address without its brackets. ``None``: not one."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
        if _NAME.fullmatch(host) is None:
            return None
    if not rest:
        return host, None
    digits = rest[1:]
    if rest[0] != ":" or not digits.isdigit() or len(digits) > 5 or int(digits) > 65535:
        return None
    return host, int(digits)


def _loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_entry(entry: str) -> tuple[str, int | None]:
    """One ``EXAI_ALLOWED_HOSTS`` entry other than ``*``: (host, port or ``None`` for any).

    Raises:
        ConfigError: not ``name``, ``name:port``, ``[v6]`` or ``[v6]:port``.
    """
    parsed = split_host(entry)
    if parsed is None or not entry.strip():
        raise ConfigError(
            f"EXAI_ALLOWED_HOSTS: {entry!r} is not a host (name, name:port, [v6]:port, or * "
            "for any)"
        )
    return parsed


@attrs.frozen
class OriginPolicy:
    """The allowed origins and ``Host`` values (see the module docstring).

    Args:
        allowed: ``EXAI_ALLOWED_ORIGINS`` (checked by :func:`parse_origin_entry`).
        hosts: the ``Host`` values served besides the loopback ones (:func:`parse_host_entry`);
            ``None``: any ``Host``.
    """

    allowed: tuple[tuple[str, str, int | None], ...] = ()
    hosts: tuple[tuple[str, int | None], ...] | None = None

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> OriginPolicy:
        return cls(tuple(parse_origin_entry(e) for e in entries))

    @classmethod
    def from_settings(cls, settings: Settings) -> OriginPolicy:
        """``EXAI_ALLOWED_ORIGINS``, and ``EXAI_ALLOWED_HOSTS`` as the listener's address
        makes it (the module docstring)."""
        entries = [e.strip() for e in settings.allowed_hosts]
        hosts: tuple[tuple[str, int | None], ...] | None
        if "*" in entries or not (entries or is_loopback(settings.host.strip().strip("[]"))):
            hosts = None
        else:
            hosts = tuple(parse_host_entry(e) for e in entries)
        return cls(tuple(parse_origin_entry(e) for e in settings.allowed_origins), hosts)

    def allows_host(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header (``None``: absent) may be served."""
        if host is None or self.hosts is None:
            return True
        return _host_allowed(self.hosts, host)

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


@functools.lru_cache(maxsize=1024)
def _host_allowed(hosts: tuple[tuple[str, int | None], ...], host: str) -> bool:
    # (remembered: a client names the same Host in every request, and reading one costs
    # ≈ 5-10 µs — the per-request work of the HTTP door is counted, issue 18)
    parsed = split_host(host)
    if parsed is None:
        return False
    name, port = parsed
    if _loopback_host(name):
        return True
    return any(name == h and (p is None or port == p) for h, p in hosts)
