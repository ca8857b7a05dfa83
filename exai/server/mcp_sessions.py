"""Self-validating ``Mcp-Session-Id`` values for the Streamable HTTP door's initialize era.

A 2025-era client (``initialize`` → ``Mcp-Session-Id`` → every later request carries it) may
be sent by a balancer to any daemon of a deployment, and a daemon may be restarted or killed
between two of its requests. So a session id is not a key into one daemon's memory: it carries
what the session needs and is signed, and any daemon holding the deployment's signing key
(``EXAI_SESSION_SIGNING_KEY``) accepts it::

    v1.<payload>.<mac>       payload = base64url(JSON {"i": identity, "v": version,
                                                       "t": issued at (Unix s), "n": nonce})
                             mac     = base64url(HMAC-SHA256(key, "v1." + payload))

* **identity** — the token name that ran ``initialize``; a request presenting the id must
  authenticate as the same identity (otherwise the id is unknown to it: 404);
* **version** — the protocol version ``initialize`` negotiated (the ``MCP-Protocol-Version``
  header must agree with it; tool argument errors are answered as it wants);
* **issued at** — the id is accepted for ``EXAI_HTTP_SESSION_TTL_S`` after it (wall-clock time:
  the one clock two daemons share; a skew between them shortens or lengthens that by the skew);
* **nonce** — 128 random bits: two sessions never share an id, and it names the session in the
  revocation list.

Ending a session (``DELETE``) cannot be written into the id: it is remembered in
:class:`Revocations` — a bounded list in this daemon (:data:`MAX_LOCAL_REVOCATIONS`, oldest out)
and, with Redis, a key per ended session (``<prefix>mcp-ended:<nonce>``, expiring with the id)
that every daemon reads. Without Redis an ended session stays ended only on the daemon that
ended it; while Redis is unreachable a daemon that did not end it accepts it (each Redis round
trip is bounded and behind a breaker: a dead Redis costs nothing after a few requests).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import attrs

from exai.config.dirs import make_dirs
from exai.errors import CircuitOpenError
from exai.resilience.breaker import CircuitBreaker

__all__ = [
    "MAX_LOCAL_REVOCATIONS",
    "MAX_SESSION_ID_CHARS",
    "STORED_KEY_FILE",
    "McpSession",
    "Revocations",
    "SessionSigner",
    "stored_key",
]

#: the signing key kept in the state directory when ``EXAI_SESSION_SIGNING_KEY`` is not set
STORED_KEY_FILE = "session-signing.key"
#: the longest kept key read (one made here is 64 hex digits); a longer file is not used
MAX_STORED_KEY_BYTES = 4096


def stored_key(state_dir: Path) -> bytes | None:
    """The session-signing key kept in ``state_dir`` (:data:`STORED_KEY_FILE`), made when
    missing — 32 random bytes as hex, mode 0600, published by ``link`` so two daemons starting
    at once on one state directory read the same key — or ``None`` when the directory cannot
    hold one (the caller makes a key for the run). Blocking: called once, at start.

    Why: with a key made per run, every daemon restart (an upgrade, ``systemctl restart``, a
    crash) ended every initialize-era Streamable HTTP session, and the official SDKs do not
    start a new one by themselves: an editor's every call failed ("Session terminated", 404
    ``unknown_session``) until the editor was restarted."""
    path = state_dir / STORED_KEY_FILE
    try:
        if not path.exists():
            make_dirs(state_dir)
            tmp = state_dir / f".{STORED_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_hex(32).encode() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass  # (another daemon made it first: its key is the one)
            finally:
                tmp.unlink(missing_ok=True)
        # a regular file, read up to a bound: a FIFO or a link to /dev/zero put there (by a
        # mistake, or by whoever can write the state directory) blocked or filled the memory
        # of the start-up, which waits for this thread
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            key = os.read(fd, MAX_STORED_KEY_BYTES + 1).strip()
        finally:
            os.close(fd)
    except OSError:
        return None
    return key if 32 <= len(key) <= MAX_STORED_KEY_BYTES else None


_PREFIX = "v1."
#: the longest ``Mcp-Session-Id`` looked at (a signed id is about 200 characters)
MAX_SESSION_ID_CHARS = 512
#: ended sessions one daemon remembers on its own (without Redis, or beside it)
MAX_LOCAL_REVOCATIONS = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attrs.frozen
class McpSession:
    """A verified session id and what it carries."""

    id: str = attrs.field(repr=False)
    identity: str
    version: str
    issued_at: float
    nonce: str
    expires_at: float


class SessionSigner:
    """Mints and verifies session ids with one key.

    Args:
        key: the signing key (the bytes of ``EXAI_SESSION_SIGNING_KEY``, or random per run).
        ttl_s: how long an id is accepted after it was minted (``EXAI_HTTP_SESSION_TTL_S``).
        clock: wall-clock seconds (``time.time``); injected by tests.
    """

    def __init__(self, key: bytes, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        # a key of its own for this purpose, whatever else the configured secret is used for
        self._key = hashlib.sha256(b"exai mcp session id v1\0" + key).digest()
        self.ttl_s = ttl_s
        self.clock = clock

    def _mac(self, signed: str) -> str:
        return _b64(hmac.new(self._key, signed.encode("ascii"), hashlib.sha256).digest())

    def mint(self, identity: str, version: str) -> McpSession:
        """A new session of ``identity`` at ``version``."""
        now = int(self.clock())
        nonce = _b64(secrets.token_bytes(16))
        payload = {"i": identity, "v": version, "t": now, "n": nonce}
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        signed = _PREFIX + body
        return McpSession(
            id=f"{signed}.{self._mac(signed)}",
            identity=identity,
            version=version,
            issued_at=float(now),
            nonce=nonce,
            expires_at=now + self.ttl_s,
        )

    def verify(self, value: str) -> McpSession | str:
        """The session ``value`` names, or why it is not accepted: ``"malformed"``,
        ``"bad_signature"`` or ``"expired"`` (never the key or the expected MAC).

        Constant-time comparison of the MAC; nothing is decoded before the MAC matched.
        """
        if len(value) > MAX_SESSION_ID_CHARS or not value.startswith(_PREFIX):
            return "malformed"
        signed, dot, mac = value.rpartition(".")
        if not dot or signed.count(".") != 1:
            return "malformed"
        if not hmac.compare_digest(mac.encode("ascii", "replace"), self._mac(signed).encode()):
            return "bad_signature"
        try:
            payload = json.loads(_unb64(signed.removeprefix(_PREFIX)))
            identity, version = payload["i"], payload["v"]
            issued, nonce = payload["t"], payload["n"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            return "malformed"  # (signed by us, so this would be a bug: refuse all the same)
        if not (isinstance(identity, str) and isinstance(version, str)):
            return "malformed"
        if not (isinstance(issued, int) and isinstance(nonce, str)):
            return "malformed"
        now = self.clock()
        if not issued - 60 <= now < issued + self.ttl_s:  # (a minute of clock skew allowed)
            return "expired"
        return McpSession(
            id=value,
            identity=identity,
            version=version,
            issued_at=float(issued),
            nonce=nonce,
            expires_at=issued + self.ttl_s,
        )


class _Redis(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(
        self, key: str, value: bytes | str, *, ex_s: float | None = None, nx: bool = False
    ) -> bool: ...


class Revocations:
    """The sessions ended by ``DELETE`` (see the module docstring).

    Args:
        redis: the daemon's bridged Redis client, or ``None``.
        key_prefix: ``EXAI_REDIS_KEY_PREFIX``.
        clock: wall-clock seconds (the ids' expiry is wall-clock time).
        call_bound_s: the longest one Redis round trip may take.
    """

    def __init__(
        self,
        redis: _Redis | None,
        *,
        key_prefix: str,
        clock: Callable[[], float] = time.time,
        call_bound_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.prefix = key_prefix
        self.clock = clock
        self.call_bound_s = call_bound_s
        # nonce → when its id expires (after that the id is refused anyway)
        self._local: OrderedDict[str, float] = OrderedDict()
        self.breaker = CircuitBreaker(
            "redis-sessions",
            minimum_calls=3,
            window_size=10,
            slow_call_duration_s=call_bound_s,
            open_duration_s=1.0,
            max_open_duration_s=30.0,
            record=lambda exc: isinstance(exc, Exception),
        )
        self.errors = 0

    def _key(self, nonce: str) -> str:
        return f"{self.prefix}mcp-ended:{nonce}"

    async def revoke(self, session: McpSession) -> None:
        """Remember that ``session`` ended (here, and in Redis when there is one)."""
        self._local[session.nonce] = session.expires_at
        self._local.move_to_end(session.nonce)
        now = self.clock()
        while self._local and (
            len(self._local) > MAX_LOCAL_REVOCATIONS or next(iter(self._local.values())) <= now
        ):
            self._local.popitem(last=False)
        if self.redis is not None:
            ttl = max(1.0, session.expires_at - now + 60)
            await self._call(self.redis.set, self._key(session.nonce), "1", ex_s=ttl)

    async def revoked(self, session: McpSession) -> bool:
        """Whether ``session`` was ended (by this daemon, or — read in Redis — by another)."""
        if session.nonce in self._local:
            return True
        if self.redis is None:
            return False
        return bool(await self._call(self.redis.get, self._key(session.nonce)))

    async def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """One bounded round trip behind the breaker; ``None`` when Redis did not answer."""
        try:
            async with self.breaker:
                with anyio.fail_after(self.call_bound_s):
                    return await fn(*args, **kw)
        except CircuitOpenError:
            pass
        except Exception:  # unreachable, timed out, a bad reply: not shared now
            self.errors += 1
        return None

    def status(self) -> dict[str, Any]:
        return {
            "ended_here": len(self._local),
            "errors": self.errors,
            "breaker": self.breaker.state,
        }
