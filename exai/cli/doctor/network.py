"""The doctor's network checks, each bounded, all run concurrently; each one reaches what the
daemon reaches the way the daemon does — through the daemon's own clients.

* ``storage`` (PostgreSQL): a connection through the daemon's pool adapter
  (:class:`~exai.storage.aio_bridge.BridgedPgPool`, asyncpg on the trio-asyncio bridge) within
  :data:`CONNECT_S`, then ``SELECT 1`` within :data:`STORE_S`;
* ``redis``: ``PING`` through the daemon's Redis adapter
  (:class:`~exai.storage.aio_bridge.BridgedRedis`), then ``TIME`` against this machine's clock
  (skew over :data:`MAX_SKEW_S` is an error: shared rate limits and TTLs assume one clock);
* ``provider:<name>``: ``GET /models`` with its key within :data:`PROVIDER_S` (401/403 means
  the key is refused);
* ``daemon``: when a daemon answers at the client URL (``EXAI_URL``, else derived from
  ``EXAI_HOST``/``EXAI_PORT``), its version and each provider's breaker
  (through :class:`exai.Client`).

The asyncio bridge is opened only when PostgreSQL or Redis is configured. Must run under trio.
"""

from __future__ import annotations

import importlib
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from exai.cli.doctor.report import Finding, error, ok, warn
from exai.client import Client
from exai.client.ws import HandshakeRejected, NotTheMcpDoor, WebSocketError
from exai.config import Settings, redact_url
from exai.errors import ConfigError, StoreError, StoreUnavailableError

if TYPE_CHECKING:
    from exai.storage.aio_bridge import AsyncioBridge

__all__ = [
    "CONNECT_S",
    "DAEMON_S",
    "MAX_SKEW_S",
    "PROVIDER_S",
    "STORE_S",
    "check_daemon",
    "check_providers",
    "check_redis",
    "check_storage",
    "network_findings",
]

#: bound on connecting to a store
CONNECT_S = 2.0
#: bound on one whole store check (connect, authenticate, query)
STORE_S = 5.0
#: bound on one provider's ``GET /models``
PROVIDER_S = 5.0
#: bound on asking a running daemon for its status
DAEMON_S = 5.0
#: largest tolerated difference between this machine's clock and Redis ``TIME``
MAX_SKEW_S = 1.0


_IMPORT_LIMITER = anyio.CapacityLimiter(1)


async def _load_drivers() -> None:
    """Import the storage adapters (asyncpg, redis-py, trio-asyncio) in a worker thread: the
    first import takes a tenth of a second, too long for the event loop. Only a check that
    needs them loads them (trio-asyncio patches asyncio)."""
    await anyio.to_thread.run_sync(
        importlib.import_module, "exai.storage.postgres", limiter=_IMPORT_LIMITER
    )


@asynccontextmanager
async def _asyncio_bridge() -> AsyncIterator[AsyncioBridge]:
    await _load_drivers()
    from exai.storage.aio_bridge import open_asyncio_bridge

    async with open_asyncio_bridge() as bridge:
        yield bridge


def _caused_by(exc: BaseException | None, kinds: type[BaseException] | tuple[type, ...]) -> bool:
    """Whether ``exc`` or an exception it was raised from is one of ``kinds``."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, kinds):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _oserror(exc: BaseException | None) -> str:
    """The most specific reason in an error chain ("Connection refused"), else the type of the
    driver's own error (never its text, which may quote the URL)."""
    innermost = exc
    for _ in range(20):
        if exc is None:
            break
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
        innermost = exc
        exc = exc.__cause__ or exc.__context__
    return type(innermost).__name__


async def check_redis(settings: Settings) -> list[Finding]:
    """``PING`` and ``TIME`` (clock skew) against ``EXAI_REDIS_URL``."""
    if not settings.redis_url:
        return []
    await _load_drivers()
    import redis.exceptions as redis_exc

    from exai.storage.aio_bridge import BridgedRedis

    url = settings.redis_url.reveal()
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    except ValueError:
        return [error("redis", "EXAI_REDIS_URL is not a valid URL", "correct EXAI_REDIS_URL")]
    fix = f"start Redis at {host}:{port}, or correct or unset EXAI_REDIS_URL"
    async with _asyncio_bridge() as bridge:
        try:
            redis = BridgedRedis.from_url(
                bridge,
                url,
                max_connections=1,
                socket_timeout_s=STORE_S,
                connect_timeout_s=CONNECT_S,
            )
        except ValueError:
            return [error("redis", "EXAI_REDIS_URL is not a valid URL", "correct EXAI_REDIS_URL")]
        try:
            with anyio.fail_after(STORE_S):
                await redis.ping()
                # The wall clock, on purpose: skew is a difference between two wall clocks.
                t0 = time.time()
                reply = await redis.time()
                t1 = time.time()
        except TimeoutError:
            return [error("redis", f"Redis at {shown} did not answer within {STORE_S:g}s", fix)]
        except StoreError as exc:
            if _caused_by(exc, redis_exc.AuthenticationError):
                return [
                    error(
                        "redis",
                        f"Redis at {shown} refused the password in EXAI_REDIS_URL",
                        "correct the password in EXAI_REDIS_URL (or its _FILE)",
                    )
                ]
            if _caused_by(exc, (redis_exc.TimeoutError, TimeoutError)):
                return [error("redis", f"Redis at {shown} did not answer within {STORE_S:g}s", fix)]
            if isinstance(exc, StoreUnavailableError):
                return [error("redis", f"Redis at {shown} is unreachable ({_oserror(exc)})", fix)]
            return [error("redis", f"Redis at {shown} refused PING: {exc}", fix)]
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CONNECT_S):
                await redis.aclose()
    try:
        redis_now = int(reply[0]) + int(reply[1]) / 1e6
    except (TypeError, ValueError, IndexError):
        return [error("redis", f"Redis at {shown} gave no usable TIME reply", fix)]
    skew = redis_now - (t0 + t1) / 2
    if abs(skew) > MAX_SKEW_S:
        return [
            error(
                "redis",
                f"clock skew of {skew:+.1f}s against Redis TIME at {shown} (more than "
                f"{MAX_SKEW_S:g}s): shared rate limits, breaker hold times and expiries drift",
                "run NTP (chrony or systemd-timesyncd) on this machine and the Redis host",
            )
        ]
    return [ok("redis", f"Redis at {shown} answers PING; clock skew {skew * 1000:+.0f} ms")]


async def check_storage(settings: Settings) -> list[Finding]:
    """PostgreSQL: a connection within :data:`CONNECT_S`, then ``SELECT 1``."""
    url = settings.effective_storage_url
    if not url.startswith(("postgresql://", "postgres://")):
        return []
    await _load_drivers()
    from exai.storage.aio_bridge import BridgedPgPool
    from exai.storage.postgres import parse_postgres_url

    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or 5432
        dsn, _schema = parse_postgres_url(url)
    except ValueError:
        return [error("storage", "EXAI_STORAGE_URL is not a valid URL", "correct it")]
    except ConfigError as exc:
        return [error("storage", str(exc), "correct EXAI_STORAGE_URL")]
    fix = f"start PostgreSQL at {host}:{port}, or correct EXAI_STORAGE_URL"
    async with _asyncio_bridge() as bridge:
        try:
            with anyio.fail_after(CONNECT_S + STORE_S):
                pool = await BridgedPgPool.create(
                    bridge,
                    dsn,
                    min_size=1,
                    max_size=1,
                    connect_timeout_s=CONNECT_S,
                    release_timeout_s=CONNECT_S,
                )
                try:
                    with anyio.fail_after(STORE_S):
                        await pool.run(_select_1)
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(CONNECT_S):
                        await pool.close()
        except TimeoutError:
            return [error("storage", f"PostgreSQL at {shown} did not answer SELECT 1 in time", fix)]
        except StoreUnavailableError as exc:
            if _caused_by(exc, TimeoutError):
                return [
                    error(
                        "storage",
                        f"PostgreSQL at {shown} did not accept within {CONNECT_S:g}s",
                        fix,
                    )
                ]
            return [
                error("storage", f"PostgreSQL at {shown} is unreachable ({_oserror(exc)})", fix)
            ]
        except StoreError as exc:
            cause = exc.__cause__
            return [
                error(
                    "storage",
                    f"PostgreSQL at {shown} refused SELECT 1: {type(cause).__name__}: {cause}",
                    "check the user, password and database in EXAI_STORAGE_URL",
                )
            ]
    return [ok("storage", f"PostgreSQL at {shown} answers SELECT 1")]


async def _select_1(conn: Any) -> Any:
    return await conn.fetchval("SELECT 1")


def _key_var(name: str) -> str:
    if name in ("kimi", "glm"):
        return f"{name.upper()}_API_KEY"
    return f"EXAI_PROVIDER_{name.upper()}_API_KEY"


async def check_providers(settings: Settings) -> list[Finding]:
    """``GET /models`` on each configured provider, with its key."""
    configured = [p for p in settings.providers if p.configured]
    if not configured:
        return [
            warn(
                "providers",
                "no provider is configured: tools that need a model will fail",
                "set KIMI_API_KEY or GLM_API_KEY (or their _FILE), or "
                "EXAI_PROVIDER_<NAME>_BASE_URL for an OpenAI-compatible endpoint",
            )
        ]
    results: list[list[Finding]] = [[] for _ in configured]

    async def one(i: int, client: httpx.AsyncClient) -> None:
        p = configured[i]
        check = f"provider:{p.name}"
        url = p.base_url.rstrip("/") + "/models"
        headers = {"Authorization": f"Bearer {p.api_key.reveal()}"} if p.api_key else {}
        key_var = _key_var(p.name)
        where = f"{p.name} ({redact_url(p.base_url)})"
        try:
            with anyio.fail_after(PROVIDER_S):
                resp = await client.get(url, headers=headers)
        except TimeoutError:
            results[i] = [
                error(
                    check,
                    f"{where} did not answer GET /models within {PROVIDER_S:g}s",
                    "check the network path to the provider and its base URL",
                )
            ]
            return
        except httpx.HTTPError as exc:
            results[i] = [
                error(
                    check,
                    f"{where} is unreachable ({type(exc).__name__})",
                    f"check {p.name}'s base URL and the network",
                )
            ]
            return
        code = resp.status_code
        fp = f", key {p.api_key.fingerprint()}" if p.api_key else ""
        if code in (401, 403):
            results[i] = [
                error(
                    check,
                    f"{where}: key refused (HTTP {code}{fp})",
                    f"set a valid key in {key_var} (or {key_var}_FILE)",
                )
            ]
        elif code == 429:
            results[i] = [
                warn(check, f"{where}: rate limited (HTTP 429)", "wait, or raise the quota")
            ]
        elif code == 404:
            results[i] = [
                warn(
                    check,
                    f"{where}: no GET /models (HTTP 404), the key cannot be verified",
                    "check the base URL (it usually ends in /v1)",
                )
            ]
        elif code >= 400:
            results[i] = [
                error(
                    check,
                    f"{where}: GET /models failed (HTTP {code})",
                    "check the provider's status page and the base URL",
                )
            ]
        else:
            results[i] = [ok(check, f"{where}: reachable, key accepted (HTTP {code}{fp})")]

    async with (
        httpx.AsyncClient(timeout=None, follow_redirects=False) as client,
        anyio.create_task_group() as tg,
    ):
        for i in range(len(configured)):
            tg.start_soon(one, i, client)
    return [f for r in results for f in r]


async def check_daemon(settings: Settings) -> list[Finding]:
    """When a daemon answers at the client URL (:attr:`Settings.effective_url`): its version and
    each provider's breaker state."""
    url = redact_url(settings.effective_url)
    try:
        with anyio.fail_after(DAEMON_S):
            async with Client(settings=settings, client_name="exai-doctor") as client:
                result = await client.call_tool("status", {})
    except HandshakeRejected as exc:
        if exc.status in (401, 403):
            # (with no EXAI_TOKEN set, "refused EXAI_TOKEN" sent the reader to a token they
            # never gave)
            what = (
                f"refused EXAI_TOKEN (HTTP {exc.status})"
                if settings.token is not None
                else f"wants a client token (HTTP {exc.status}) and EXAI_TOKEN is not set"
            )
            return [
                warn(
                    "daemon",
                    f"the daemon at {url} {what}",
                    "set EXAI_TOKEN (or EXAI_TOKEN_FILE) to a token listed in the daemon's "
                    "EXAI_TOKENS",
                )
            ]
        return [
            warn(
                "daemon",
                f"the daemon at {url} refused the connection (HTTP {exc.status})",
                "see `exai status` once it accepts connections",
            )
        ]
    except NotTheMcpDoor as exc:
        # something answers there: "no daemon answering" was untrue
        return [warn("daemon", str(exc), "set EXAI_URL to the MCP door, or unset it")]
    except (WebSocketError, TimeoutError):
        return [ok("daemon", f"no daemon answering at {url} (not running?)")]
    except Exception as exc:
        return [
            warn(
                "daemon",
                f"the daemon at {url} failed the status call ({type(exc).__name__})",
                "look at the daemon's log",
            )
        ]
    try:
        status = json.loads(result["content"][0]["text"])
    except (KeyError, IndexError, TypeError, ValueError):
        return [warn("daemon", f"the daemon at {url} gave an unreadable status", "")]
    daemon = status.get("daemon", {})
    out = [ok("daemon", f"daemon at {url} answers (version {daemon.get('version', '?')})")]
    providers = (status.get("providers") or {}).get("providers") or {}
    for name, p in sorted(providers.items()):
        breaker = (p or {}).get("breaker") or {}
        state = breaker.get("state")
        if state in ("open", "half_open"):
            last = p.get("last_error")
            if isinstance(last, dict):
                last = last.get("message")
            detail = f" (last error: {last})" if last else ""
            out.append(
                warn(
                    f"provider:{name}",
                    f"the daemon's breaker for {name} is {state.replace('_', '-')}{detail}: "
                    "calls to it fail fast or fall back",
                    f"check {name}'s status, base URL and key; the breaker closes by itself once "
                    "a probe succeeds",
                )
            )
        elif state:
            out.append(ok(f"provider:{name}", f"the daemon's breaker for {name} is {state}"))
    return out


async def network_findings(settings: Settings) -> list[Finding]:
    """Every network check, run concurrently, each within its own bound."""
    checks: list[Callable[[Settings], Any]] = [
        check_storage,
        check_redis,
        check_providers,
        check_daemon,
    ]
    results: list[list[Finding]] = [[] for _ in checks]

    async def run(i: int) -> None:
        results[i] = await checks[i](settings)

    async with anyio.create_task_group() as tg:
        for i in range(len(checks)):
            tg.start_soon(run, i)
    return [f for r in results for f in r]
