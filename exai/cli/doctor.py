"""``exai doctor``: check the configuration, secrets hygiene and connectivity, and say how to fix
each problem.

Local checks (no network):

* ``git``: an env file (``.env``, ``.env.local``, ``config/.env.prod`` …) tracked by git in the
  current repository (``.env.example`` and other templates excepted), or a ``.env`` not ignored;
* ``secret-files``: a secret file (``*_FILE`` variables, ``EXAI_TOKENS_FILE``, ``EXAI_TLS_KEY``,
  the ``.env`` file when it holds secrets) readable by group or others, or unreadable;
* ``tokens``: client-token entries that are malformed, or plain tokens shorter than
  :data:`MIN_TOKEN_LENGTH` (hashed entries cannot be judged);
* ``bind``: a non-loopback listener without client tokens or without TLS; a ``ws://`` client
  URL to another machine; TLS files that do not load;
* ``storage`` (SQLite): the state directory is not writable.

Network checks (each bounded, all run concurrently):

* ``storage`` (PostgreSQL): TCP connect to host:port within :data:`CONNECT_S`, then ``SELECT 1``;
* ``redis``: ``PING``, then ``TIME`` against this machine's clock (skew over
  :data:`MAX_SKEW_S` is an error: shared rate limits and TTLs assume one clock);
* ``provider:<name>``: ``GET /models`` with its key within :data:`PROVIDER_S` (401/403 means
  the key is refused);
* ``daemon``: when a daemon answers at ``EXAI_URL``, its version and each provider's breaker.

Every text the report prints passes through a scrubber that removes the values of every secret
the settings hold, so no key, token or password is ever shown, even inside an upstream error.
Exit status: 1 when any check is an error (or a warning with ``--strict``), 2 when the settings
themselves cannot be loaded, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import anyio
import anyio.abc
import attrs
import httpx

from exai.client import Client
from exai.client.ws import HandshakeRejected, WebSocketError
from exai.config import Settings, is_loopback, redact_url
from exai.config.hygiene import child_env, secret_values, token_entries
from exai.errors import ConfigError
from exai.server.auth import parse_tokens
from exai.storage.postgres import parse_postgres_url

__all__ = [
    "CONNECT_S",
    "MAX_SKEW_S",
    "MIN_TOKEN_LENGTH",
    "PROVIDER_S",
    "Finding",
    "exit_status",
    "local_findings",
    "main",
    "network_findings",
    "render",
    "run_doctor",
    "secret_file_problem",
    "secret_files",
]

Level = Literal["ok", "warn", "error"]

#: a plain client token shorter than this is an error (``exai token new`` makes 43)
MIN_TOKEN_LENGTH = 32
#: bound on a TCP connect to a store
CONNECT_S = 2.0
#: bound on one whole store check (connect, authenticate, query)
STORE_S = 5.0
#: bound on one provider's ``GET /models``
PROVIDER_S = 5.0
#: bound on asking a running daemon for its status
DAEMON_S = 5.0
#: largest tolerated difference between this machine's clock and Redis ``TIME``
MAX_SKEW_S = 1.0
#: bound on ``git`` commands
GIT_S = 10.0

_ENV_FILE = re.compile(r"(^|/)\.env($|\.)")
_ENV_TEMPLATES = {".env.example", ".env.sample", ".env.template", ".env.dist"}
_SECRET_VARS = re.compile(
    r"^(KIMI_API_KEY|GLM_API_KEY|EXAI_TOKENS?|EXAI_STORAGE_URL|EXAI_REDIS_URL"
    r"|EXAI_PROVIDER_[A-Z0-9]+_API_KEY)$"
)


@attrs.frozen(kw_only=True)
class Finding:
    """One result of a check.

    Attributes:
        level: ``"ok"``, ``"warn"`` or ``"error"``.
        check: which check (``git``, ``secret-files``, ``tokens``, ``bind``, ``storage``,
            ``redis``, ``provider:<name>``, ``daemon``, ``config``).
        message: what was found, for a person. Never contains a secret.
        fix: what to do about it (empty for ``ok``).
    """

    level: Level
    check: str
    message: str
    fix: str = ""


def _ok(check: str, message: str) -> Finding:
    return Finding(level="ok", check=check, message=message)


def _warn(check: str, message: str, fix: str) -> Finding:
    return Finding(level="warn", check=check, message=message, fix=fix)


def _error(check: str, message: str, fix: str) -> Finding:
    return Finding(level="error", check=check, message=message, fix=fix)


# ---------------------------------------------------------------------------------------
# local checks


def check_git(cwd: Path, *, environ: Mapping[str, str] | None = None) -> list[Finding]:
    """Env files tracked by git in the repository that contains ``cwd``."""
    env = child_env(environ)

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIT_S,
            check=False,
        )

    try:
        top = git("rev-parse", "--show-toplevel")
    except FileNotFoundError:
        return [_warn("git", "git is not installed; tracked env files not checked", "install git")]
    except subprocess.TimeoutExpired:
        return [_warn("git", f"git did not answer within {GIT_S:g}s; not checked", "")]
    if top.returncode != 0:
        return [_ok("git", f"{cwd} is not in a git repository; no tracked env files")]
    listed = git("ls-files", "-z", "--full-name", ":/")
    if listed.returncode != 0:
        return [_warn("git", "`git ls-files` failed; tracked env files not checked", "")]
    tracked = [
        p
        for p in listed.stdout.split("\0")
        if p and _ENV_FILE.search(p) and Path(p).name not in _ENV_TEMPLATES
    ]
    out = [
        _error(
            "git",
            f"{path} is tracked by git: everyone with a clone (and its history) can read the "
            "keys and tokens in it",
            f"git rm --cached {path} && echo '{Path(path).name}' >> .gitignore, commit, and "
            "rotate every key the file ever held (it stays in the history)",
        )
        for path in tracked
    ]
    dotenv = cwd / ".env"
    if not tracked and dotenv.is_file() and git("check-ignore", "-q", ".env").returncode == 1:
        out.append(
            _warn(
                "git",
                f"{dotenv} is not ignored by git: one `git add .` away from being committed",
                "add `.env` to .gitignore",
            )
        )
    if not out:
        out.append(_ok("git", "no env file is tracked by git"))
    return out


def _secret_file_vars(env: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted(
        (var, path)
        for var, path in env.items()
        if var.endswith("_FILE")
        and path
        and var != "EXAI_ENV_FILE"
        and _SECRET_VARS.match(var.removesuffix("_FILE"))
    )


def _env_file_has_secrets(path: Path) -> bool:
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError):
        return False
    return any(v and _SECRET_VARS.match(k) for k, v in values.items())


def secret_files(
    settings: Settings, env: Mapping[str, str], env_file: Path | None
) -> list[tuple[str, str]]:
    """``(variable, path)`` of every file holding a secret: each ``*_FILE`` the settings were
    read from (environment, ``.env`` or TOML), ``EXAI_TLS_KEY``, and the ``.env`` file when it
    holds secrets. Sorted by variable."""
    found: dict[str, tuple[str, str]] = {}
    named = list(_secret_file_vars(env))
    named += [
        (var, path)
        for var, path in settings.source_files
        if var not in ("EXAI_ENV_FILE", "EXAI_CONFIG")
    ]
    if settings.tls_key:
        named.append(("EXAI_TLS_KEY", settings.tls_key))
    if env_file is not None and env_file.is_file() and _env_file_has_secrets(env_file):
        named.append(("env file", str(env_file)))
    for var, path in named:
        found.setdefault(os.path.abspath(path), (var, path))
    return sorted(found.values())


def secret_file_problem(var: str, path: str) -> tuple[str, str] | None:
    """What is wrong with the secret file ``path`` (named by ``var``): ``(message, fix)``, or
    ``None`` when only its owner can read it. Blocking (``stat``)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return (
            f"{var} names {path}, which cannot be read ({exc.strerror})",
            f"create the file or correct {var}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o077:
        return None
    who = (
        "group and others"
        if mode & 0o007 and mode & 0o070
        else ("others" if mode & 0o007 else "its group")
    )
    return (
        f"{var} file {path} is readable by {who} (mode {mode:04o}): other accounts "
        "on this machine can read the secret",
        f"chmod 600 {path}",
    )


def check_secret_files(
    settings: Settings, env: Mapping[str, str], env_file: Path | None
) -> list[Finding]:
    """Secret files readable by group or others, or not readable at all."""
    files = secret_files(settings, env, env_file)
    out: list[Finding] = []
    for var, path in files:
        problem = secret_file_problem(var, path)
        if problem is not None:
            out.append(_error("secret-files", *problem))
    if not out:
        what = ", ".join(v for v, _ in files) if files else "none configured"
        out.append(_ok("secret-files", f"secret files private to their owner ({what})"))
    return out


def check_tokens(settings: Settings) -> list[Finding]:
    """Malformed token entries; plain tokens shorter than :data:`MIN_TOKEN_LENGTH`."""
    if not settings.tokens:
        return [_ok("tokens", "no client tokens configured (loopback clients only)")]
    try:
        parse_tokens(settings.tokens)
    except ConfigError as exc:
        return [_error("tokens", f"EXAI_TOKENS: {exc}", "correct the entry named above")]
    out = []
    entries = token_entries(settings.tokens)
    for entry in entries:
        if entry.length is not None and entry.length < MIN_TOKEN_LENGTH:
            out.append(
                _error(
                    "tokens",
                    f"token {entry.name!r} (entry {entry.position}) is {entry.length} characters "
                    f"long; shorter than {MIN_TOKEN_LENGTH} it can be guessed",
                    f"replace it: `exai token new {entry.name}` prints a random token and the "
                    "hashed line for EXAI_TOKENS_FILE",
                )
            )
    if not out:
        hashed = sum(1 for e in entries if e.hashed)
        out.append(
            _ok("tokens", f"{len(entries)} client token(s), {hashed} stored hashed, none short")
        )
    return out


def check_bind(settings: Settings) -> list[Finding]:
    """What the listener exposes; whether the TLS files load; whether clients use TLS."""
    out: list[Finding] = []
    host = settings.host
    if not is_loopback(host):
        if not settings.tokens:
            out.append(
                _error(
                    "bind",
                    f"EXAI_HOST={host} without client tokens: anyone who can reach this address "
                    "could use your provider keys (exai serve refuses to start)",
                    "set EXAI_TOKENS_FILE (see `exai token new NAME`) or bind 127.0.0.1",
                )
            )
        if not settings.tls_cert:
            fix = "set EXAI_TLS_CERT and EXAI_TLS_KEY to serve wss://, or bind 127.0.0.1"
            msg = (
                f"EXAI_HOST={host} without TLS: client tokens and every prompt, file and answer "
                "cross the network in clear text"
            )
            if settings.allow_insecure_bind:
                out.append(_warn("bind", msg + " (allowed by EXAI_ALLOW_INSECURE_BIND)", fix))
            else:
                out.append(_error("bind", msg + " (exai serve refuses to start)", fix))
    if settings.tls_cert:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            out.append(
                _error(
                    "bind",
                    f"EXAI_TLS_CERT/EXAI_TLS_KEY do not load: {exc}",
                    "point them at a PEM certificate chain and its private key",
                )
            )
    if settings.tls_ca and not Path(settings.tls_ca).is_file():
        out.append(
            _error("bind", f"EXAI_TLS_CA {settings.tls_ca} is not a file", "correct EXAI_TLS_CA")
        )
    url = urllib.parse.urlsplit(settings.url)
    if url.scheme == "ws" and url.hostname and not is_loopback(url.hostname):
        out.append(
            _warn(
                "bind",
                f"EXAI_URL {settings.url} is ws:// to another machine: the client token crosses "
                "the network in clear text",
                "serve TLS on the daemon and use wss:// (EXAI_TLS_CA for a private CA)",
            )
        )
    if not out:
        scheme = "wss" if settings.tls_cert else "ws"
        auth = "tokens" if settings.tokens else "no tokens"
        out.append(_ok("bind", f"listener {scheme}://{host}:{settings.port} ({auth})"))
    return out


def check_sqlite(settings: Settings) -> list[Finding]:
    """The SQLite file's directory exists (or can be created) and is writable."""
    url = settings.effective_storage_url
    if not url.startswith("sqlite:"):
        return []
    path = Path(url.removeprefix("sqlite:///").removeprefix("sqlite://"))
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return [
            _error(
                "storage",
                f"SQLite store {path}: {probe} is not writable",
                "set EXAI_STATE_DIR or EXAI_STORAGE_URL=sqlite:///<writable path>",
            )
        ]
    return [_ok("storage", f"SQLite store at {path}")]


def local_findings(
    settings: Settings,
    *,
    cwd: Path,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
) -> list[Finding]:
    """Every check that needs no network (see the module docstring)."""
    env = dict(os.environ if environ is None else environ)
    return [
        *check_git(cwd, environ=env),
        *check_secret_files(settings, env, env_file),
        *check_tokens(settings),
        *check_bind(settings),
        *check_sqlite(settings),
    ]


# ---------------------------------------------------------------------------------------
# network checks


def _resp_encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _RespReader:
    """Just enough RESP2 for AUTH, SELECT, PING and TIME."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = await self.stream.receive(4096)
            self.buf += chunk
            if len(self.buf) > 65536:
                raise ValueError("reply line too long")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    async def reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return _RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += await self.stream.receive(4096)
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data.decode()
        if kind == b"*":
            return [await self.reply() for _ in range(int(rest))]
        raise ValueError(f"unexpected RESP reply type {kind!r}")


class _RedisError(str):
    pass


async def check_redis(settings: Settings) -> list[Finding]:
    """``PING`` and ``TIME`` (clock skew) against ``EXAI_REDIS_URL``."""
    if not settings.redis_url:
        return []
    url = settings.redis_url.reveal()
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        db = parts.path.strip("/") or "0"
        username = urllib.parse.unquote(parts.username) if parts.username else None
        password = urllib.parse.unquote(parts.password) if parts.password else None
    except ValueError:
        return [_error("redis", "EXAI_REDIS_URL is not a valid URL", "correct EXAI_REDIS_URL")]
    fix = f"start Redis at {host}:{port}, or correct or unset EXAI_REDIS_URL"
    try:
        with anyio.fail_after(CONNECT_S):
            stream: anyio.abc.ByteStream
            if parts.scheme == "rediss":
                stream = await anyio.connect_tcp(host, port, tls=True, tls_hostname=host)
            else:
                stream = await anyio.connect_tcp(host, port)
    except TimeoutError:
        return [_error("redis", f"Redis at {shown} did not accept within {CONNECT_S:g}s", fix)]
    except (OSError, anyio.BrokenResourceError, ssl.SSLError) as exc:
        return [_error("redis", f"Redis at {shown} is unreachable ({_oserror(exc)})", fix)]
    async with stream:
        reader = _RespReader(stream)

        async def command(*args: str) -> Any:
            await stream.send(_resp_encode(*args))
            return await reader.reply()

        try:
            with anyio.fail_after(STORE_S):
                if password is not None:
                    auth = ("AUTH", username, password) if username else ("AUTH", password)
                    if isinstance(await command(*auth), _RedisError):
                        return [
                            _error(
                                "redis",
                                f"Redis at {shown} refused the password in EXAI_REDIS_URL",
                                "correct the password in EXAI_REDIS_URL (or its _FILE)",
                            )
                        ]
                if db != "0":
                    await command("SELECT", db)
                pong = await command("PING")
                if pong != "PONG":
                    return [_error("redis", f"Redis at {shown} answered PING with {pong!r}", fix)]
                # The wall clock, on purpose: skew is a difference between two wall clocks.
                t0 = time.time()
                reply = await command("TIME")
                t1 = time.time()
        except TimeoutError:
            return [_error("redis", f"Redis at {shown} did not answer within {STORE_S:g}s", fix)]
        except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, ValueError) as exc:
            return [_error("redis", f"Redis at {shown} broke the connection ({exc!r})", fix)]
    try:
        redis_now = int(reply[0]) + int(reply[1]) / 1e6
    except (TypeError, ValueError, IndexError):
        return [_error("redis", f"Redis at {shown} gave no usable TIME reply", fix)]
    skew = redis_now - (t0 + t1) / 2
    if abs(skew) > MAX_SKEW_S:
        return [
            _error(
                "redis",
                f"clock skew of {skew:+.1f}s against Redis TIME at {shown} (more than "
                f"{MAX_SKEW_S:g}s): shared rate limits, breaker hold times and expiries drift",
                "run NTP (chrony or systemd-timesyncd) on this machine and the Redis host",
            )
        ]
    return [_ok("redis", f"Redis at {shown} answers PING; clock skew {skew * 1000:+.0f} ms")]


def _oserror(exc: BaseException | None) -> str:
    """The most specific reason in an error chain ("Connection refused")."""
    first = exc
    while exc is not None:
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
        exc = exc.__cause__
    return str(first) or type(first).__name__


def _postgres_select_1(dsn: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_S)
        try:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), STORE_S)
        finally:
            await conn.close(timeout=CONNECT_S)

    asyncio.run(go())


async def check_storage(settings: Settings) -> list[Finding]:
    """PostgreSQL: TCP reachability within :data:`CONNECT_S`, then ``SELECT 1``."""
    url = settings.effective_storage_url
    if not url.startswith(("postgresql://", "postgres://")):
        return []
    shown = redact_url(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or 5432
    except ValueError:
        return [_error("storage", "EXAI_STORAGE_URL is not a valid URL", "correct it")]
    fix = f"start PostgreSQL at {host}:{port}, or correct EXAI_STORAGE_URL"
    if host and not host.startswith("/"):
        try:
            with anyio.fail_after(CONNECT_S):
                conn = await anyio.connect_tcp(host, port)
            await conn.aclose()
        except TimeoutError:
            return [
                _error(
                    "storage", f"PostgreSQL at {shown} did not accept within {CONNECT_S:g}s", fix
                )
            ]
        except OSError as exc:
            return [
                _error("storage", f"PostgreSQL at {shown} is unreachable ({_oserror(exc)})", fix)
            ]
    try:
        dsn, _schema = parse_postgres_url(url)
        with anyio.move_on_after(STORE_S + CONNECT_S) as scope:
            # asyncpg is an asyncio library: give it its own short-lived loop in a thread.
            await anyio.to_thread.run_sync(_postgres_select_1, dsn, abandon_on_cancel=True)
    except ConfigError as exc:
        return [_error("storage", str(exc), "correct EXAI_STORAGE_URL")]
    except Exception as exc:
        return [
            _error(
                "storage",
                f"PostgreSQL at {shown} refused SELECT 1: {type(exc).__name__}: {exc}",
                "check the user, password and database in EXAI_STORAGE_URL",
            )
        ]
    if scope.cancelled_caught:
        return [_error("storage", f"PostgreSQL at {shown} did not answer SELECT 1 in time", fix)]
    return [_ok("storage", f"PostgreSQL at {shown} answers SELECT 1")]


def _key_var(name: str) -> str:
    if name in ("kimi", "glm"):
        return f"{name.upper()}_API_KEY"
    return f"EXAI_PROVIDER_{name.upper()}_API_KEY"


async def check_providers(settings: Settings) -> list[Finding]:
    """``GET /models`` on each configured provider, with its key."""
    configured = [p for p in settings.providers if p.configured]
    if not configured:
        return [
            _warn(
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
                _error(
                    check,
                    f"{where} did not answer GET /models within {PROVIDER_S:g}s",
                    "check the network path to the provider and its base URL",
                )
            ]
            return
        except httpx.HTTPError as exc:
            results[i] = [
                _error(
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
                _error(
                    check,
                    f"{where}: key refused (HTTP {code}{fp})",
                    f"set a valid key in {key_var} (or {key_var}_FILE)",
                )
            ]
        elif code == 429:
            results[i] = [
                _warn(check, f"{where}: rate limited (HTTP 429)", "wait, or raise the quota")
            ]
        elif code == 404:
            results[i] = [
                _warn(
                    check,
                    f"{where}: no GET /models (HTTP 404), the key cannot be verified",
                    "check the base URL (it usually ends in /v1)",
                )
            ]
        elif code >= 400:
            results[i] = [
                _error(
                    check,
                    f"{where}: GET /models failed (HTTP {code})",
                    "check the provider's status page and the base URL",
                )
            ]
        else:
            results[i] = [_ok(check, f"{where}: reachable, key accepted (HTTP {code}{fp})")]

    async with (
        httpx.AsyncClient(timeout=None, follow_redirects=False) as client,
        anyio.create_task_group() as tg,
    ):
        for i in range(len(configured)):
            tg.start_soon(one, i, client)
    return [f for r in results for f in r]


async def check_daemon(settings: Settings) -> list[Finding]:
    """When a daemon answers at ``EXAI_URL``: its version and each provider's breaker state."""
    url = settings.url
    try:
        with anyio.fail_after(DAEMON_S):
            async with Client(url=url, settings=settings, client_name="exai-doctor") as client:
                result = await client.call_tool("status", {})
    except HandshakeRejected as exc:
        if exc.status in (401, 403):
            return [
                _warn(
                    "daemon",
                    f"the daemon at {url} refused EXAI_TOKEN (HTTP {exc.status})",
                    "set EXAI_TOKEN to a token listed in the daemon's EXAI_TOKENS",
                )
            ]
        return [
            _warn(
                "daemon",
                f"the daemon at {url} refused the connection (HTTP {exc.status})",
                "see `exai status` once it accepts connections",
            )
        ]
    except (WebSocketError, TimeoutError):
        return [_ok("daemon", f"no daemon answering at {url} (not running?)")]
    except Exception as exc:
        return [
            _warn(
                "daemon",
                f"the daemon at {url} failed the status call ({type(exc).__name__})",
                "look at the daemon's log",
            )
        ]
    try:
        status = json.loads(result["content"][0]["text"])
    except (KeyError, IndexError, TypeError, ValueError):
        return [_warn("daemon", f"the daemon at {url} gave an unreadable status", "")]
    daemon = status.get("daemon", {})
    out = [_ok("daemon", f"daemon at {url} answers (version {daemon.get('version', '?')})")]
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
                _warn(
                    f"provider:{name}",
                    f"the daemon's breaker for {name} is {state.replace('_', '-')}{detail}: "
                    "calls to it fail fast or fall back",
                    f"check {name}'s status, base URL and key; the breaker closes by itself once "
                    "a probe succeeds",
                )
            )
        elif state:
            out.append(_ok(f"provider:{name}", f"the daemon's breaker for {name} is {state}"))
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


# ---------------------------------------------------------------------------------------
# putting it together


def scrub(findings: list[Finding], secrets: Sequence[str]) -> list[Finding]:
    """The findings with every occurrence of a secret value replaced by ``***``."""

    def clean(text: str) -> str:
        for s in secrets:
            if len(s) >= 4:
                text = text.replace(s, "***")
        return text

    return [attrs.evolve(f, message=clean(f.message), fix=clean(f.fix)) for f in findings]


def run_doctor(
    settings: Settings,
    *,
    cwd: Path,
    check_network: bool = True,
    environ: Mapping[str, str] | None = None,
    env_file: Path | None = None,
) -> list[Finding]:
    """Run every check (network ones too unless ``check_network`` is false).

    Synchronous: it starts its own event loop for the network checks, so call it from a
    thread, never from inside a running trio or asyncio loop (use :func:`local_findings` and
    :func:`network_findings` there).

    Args:
        settings: the settings to check.
        cwd: the directory whose git repository is checked for env files.
        check_network: also reach the stores, providers and daemon.
        environ: the environment the settings came from (for ``*_FILE`` variables); default
            ``os.environ``.
        env_file: the ``.env`` file the settings came from, if any.
    """
    findings = local_findings(settings, cwd=cwd, environ=environ, env_file=env_file)
    if check_network:
        findings += anyio.run(network_findings, settings, backend="trio")
    return scrub(findings, secret_values(settings))


_MARK = {"ok": "ok   ", "warn": "WARN ", "error": "ERROR"}


def render(findings: Sequence[Finding]) -> str:
    """The readable report: one line per finding, each problem followed by its fix."""
    lines = ["exai doctor"]
    for f in findings:
        lines.append(f"  {_MARK[f.level]} {f.check}: {f.message}")
        if f.level != "ok" and f.fix:
            lines.append(f"         fix: {f.fix}")
    errors = sum(1 for f in findings if f.level == "error")
    warns = sum(1 for f in findings if f.level == "warn")
    if errors or warns:
        lines.append(f"{errors} error(s), {warns} warning(s)")
    else:
        lines.append("everything checked is fine")
    return "\n".join(lines)


def exit_status(findings: Sequence[Finding], *, strict: bool = False) -> int:
    """1 when any finding is an error (or a warning with ``strict``), else 0."""
    bad = {"error", "warn"} if strict else {"error"}
    return 1 if any(f.level in bad for f in findings) else 0


def _env_file(env: Mapping[str, str], cwd: Path) -> Path | None:
    named = env.get("EXAI_ENV_FILE")
    if named is not None:
        return (cwd / named) if named else None
    default = cwd / ".env"
    return default if default.is_file() else None


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    out: TextIO | None = None,
) -> int:
    """``exai doctor [--strict] [--offline]``: print the report; the exit status.

    ``environ``, ``cwd`` and ``out`` default to the process's own (tests pass their own).
    """
    parser = argparse.ArgumentParser(
        prog="exai doctor",
        description="check configuration, secrets hygiene and connectivity; explain each fix",
    )
    parser.add_argument("--strict", action="store_true", help="warnings also fail (exit 1)")
    parser.add_argument("--offline", action="store_true", help="skip the network checks")
    args = parser.parse_args(list(argv) if argv is not None else None)
    env = dict(os.environ if environ is None else environ)
    where = cwd or Path.cwd()
    stream = out or sys.stdout
    env_file = _env_file(env, where)
    try:
        settings = Settings.from_env(env, env_file=str(env_file) if env_file else "")
    except ConfigError as exc:
        findings = [
            _error(
                "config",
                f"the settings do not load: {exc}",
                "correct the variable named above (`exai config` shows the settings)",
            ),
            *check_git(where, environ=env),
        ]
        print(render(findings), file=stream, flush=True)
        return 2
    findings = run_doctor(
        settings, cwd=where, check_network=not args.offline, environ=env, env_file=env_file
    )
    print(render(findings), file=stream, flush=True)
    return exit_status(findings, strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
