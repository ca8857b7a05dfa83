"""Client authentication: bearer tokens looked up by their SHA-256 digests.

Token entries (``EXAI_TOKENS``, comma- or newline-separated, or ``EXAI_TOKENS_FILE``, one per
line, ``#`` comments allowed) take four forms::

    s3cret-token                 anonymous entry, named client-<n>
    alice:s3cret-token           named entry
    sha256:<64 hex>              stored hash of a token
    alice:sha256:<64 hex>        named stored hash

A plain token must be printable ASCII without spaces (see :data:`exai.config.TOKEN_TEXT_RULE`).
Only digests are kept in memory after parsing; the plain value is never logged or shown.

:func:`check_bind` refuses a listener address that would expose the daemon without tokens or
without TLS (``exai serve``, the reloader and ``exai doctor``'s advice follow the same rule).
"""

from __future__ import annotations

import hashlib
import re

import attrs

from exai.config import TOKEN_TEXT_RULE, Secret, Settings, is_loopback, is_token_text
from exai.errors import ConfigError

__all__ = ["Identity", "TokenTable", "check_bind", "parse_tokens"]

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


@attrs.frozen
class Identity:
    """Who a connection authenticated as. ``name`` is safe to log; the token never is."""

    name: str
    digest: bytes = attrs.field(repr=False)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_tokens(secret: Secret | None) -> tuple[Identity, ...]:
    """Parse token entries.

    Raises:
        ConfigError: an entry is malformed (the message gives its line number, never its value).
    """
    if not secret:
        return ()
    out: list[Identity] = []
    raw = secret.reveal().replace(",", "\n")
    for lineno, line in enumerate(raw.splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        name, value = f"client-{len(out) + 1}", entry
        if not entry.startswith("sha256:") and ":" in entry:
            name, value = entry.split(":", 1)
            name = name.strip()
            if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
                raise ConfigError(f"token entry {lineno}: the name must be 1-64 of [A-Za-z0-9_.@-]")
        if value.startswith("sha256:"):
            hexpart = value.removeprefix("sha256:")
            if not _HEX64.match(hexpart):
                raise ConfigError(f"token entry {lineno}: sha256: needs 64 hex digits")
            out.append(Identity(name, bytes.fromhex(hexpart)))
        else:
            if not value:
                raise ConfigError(f"token entry {lineno}: empty token")
            if not is_token_text(value):
                raise ConfigError(f"token entry {lineno}: {TOKEN_TEXT_RULE}")
            out.append(Identity(name, _digest(value)))
    # (a set, not names.count(name) for each name: that was quadratic, hours of one loop step
    # for a file of 200,000 entries)
    seen: set[str] = set()
    for ident in out:
        if ident.name in seen:
            raise ConfigError(f"token name {ident.name!r} is used twice")
        seen.add(ident.name)
    return tuple(out)


class TokenTable:
    """The accepted client tokens. Replaceable as a whole on reload."""

    def __init__(self, identities: tuple[Identity, ...] = ()) -> None:
        self.identities = identities
        #: digest → identity (the last entry of a digest given twice, as a scan finds it;
        #: made with the table: a reload makes it in its thread)
        self._by_digest = {i.digest: i for i in identities}
        #: every accepted digest
        self.digests = self._by_digest.keys()

    @property
    def enabled(self) -> bool:
        return bool(self.identities)

    def authenticate(self, authorization: str | None) -> Identity | None:
        """The identity for an ``Authorization`` header value, or None.

        The presented token's SHA-256 digest is looked up among the stored digests. The time
        taken depends on that digest only, never on a stored token: an attacker who could
        steer the digest's bytes (to learn a stored digest a byte at a time) would need SHA-256
        preimages, and a stored digest is not a token anyway — the argument for keeping and
        matching token hashes (as GitHub's and Django's token stores do). A scan comparing
        every digest with ``hmac.compare_digest`` cost one loop step linear in the table:
        ≈ 110 ms per connection attempt, authenticated or not, with 200,000 tokens.
        """
        if not self.identities:
            return Identity("anonymous", b"")
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_digest.get(_digest(token.strip()))


def check_bind(settings: Settings, tokens: TokenTable) -> None:
    """Refuse an unsafe bind with a message saying what it would expose.

    Raises:
        ConfigError: non-loopback without tokens; or non-loopback without TLS unless
            ``EXAI_ALLOW_INSECURE_BIND`` is set.
    """
    if is_loopback(settings.host):
        return
    if not tokens.enabled:
        raise ConfigError(
            f"refusing to listen on {settings.host}: no client tokens are configured, so anyone "
            "who can reach this address could use your provider keys. Set EXAI_TOKENS or "
            "EXAI_TOKENS_FILE (see `exai token new NAME`), or bind 127.0.0.1."
        )
    if not settings.tls_cert and not settings.allow_insecure_bind:
        raise ConfigError(
            f"refusing to listen on {settings.host} without TLS: client tokens and every "
            "prompt, file and answer would cross the network in clear text. Set EXAI_TLS_CERT "
            "and EXAI_TLS_KEY, or EXAI_ALLOW_INSECURE_BIND=1 if the network is trusted."
        )
