"""The doctor's local checks: nothing here touches the network.

* ``git``: an env file (``.env``, ``.env.local``, ``config/.env.prod`` …) tracked by git in the
  current repository (``.env.example`` and other templates excepted), or a ``.env`` not ignored;
* ``secret-files``: a secret file (``*_FILE`` variables, ``EXAI_TOKENS_FILE``, ``EXAI_TLS_KEY``,
  the ``.env`` file when it holds secrets) readable by group or others, or unreadable;
* ``tokens``: client-token entries that are malformed, or plain tokens shorter than
  :data:`MIN_TOKEN_LENGTH` (hashed entries cannot be judged);
* ``bind``: a non-loopback listener without client tokens or without TLS; a ``ws://`` client
  URL to another machine; TLS files that do not load;
* ``client-url``: the URL the client side would use (``EXAI_URL``, else derived from
  ``EXAI_HOST``/``EXAI_PORT``) does not reach the listener these settings describe (another
  port, host or scheme), or cannot name it (``EXAI_PORT=0``);
* ``storage`` (SQLite): the state directory is not writable; the store (or its ``-wal``/``-shm``)
  can be read by group or others — every conversation is in it (a store made before exai
  created it ``0600``).

Blocking (``git``, ``stat``): run them from a thread when a loop is running.
"""

from __future__ import annotations

import os
import re
import shlex
import ssl
import stat
import subprocess
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from exai.cli.doctor.report import Finding, error, ok, warn
from exai.config import Settings, is_loopback, listen_url, redact_url
from exai.config.hygiene import child_env, token_entries
from exai.errors import ConfigError
from exai.server.auth import parse_tokens

__all__ = [
    "GIT_S",
    "MIN_TOKEN_LENGTH",
    "check_bind",
    "check_client_url",
    "check_git",
    "check_secret_files",
    "check_sqlite",
    "check_tokens",
    "local_findings",
    "secret_file_problem",
    "secret_files",
]

#: a plain client token shorter than this is an error (``exai token new`` makes 43)
MIN_TOKEN_LENGTH = 32
#: bound on ``git`` commands
GIT_S = 10.0

_ENV_FILE = re.compile(r"(^|/)\.env($|\.)")
_ENV_TEMPLATES = {".env.example", ".env.sample", ".env.template", ".env.dist"}
_SECRET_VARS = re.compile(
    r"^(KIMI_API_KEY|GLM_API_KEY|EXAI_TOKENS?|EXAI_STORAGE_URL|EXAI_REDIS_URL"
    r"|EXAI_PROVIDER_[A-Z0-9]+_API_KEY)$"
)


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
        return [warn("git", "git is not installed; tracked env files not checked", "install git")]
    except subprocess.TimeoutExpired:
        return [warn("git", f"git did not answer within {GIT_S:g}s; not checked", "")]
    if top.returncode != 0:
        return [ok("git", f"{cwd} is not in a git repository; no tracked env files")]
    listed = git("ls-files", "-z", "--full-name", ":/")
    if listed.returncode != 0:
        return [warn("git", "`git ls-files` failed; tracked env files not checked", "")]
    tracked = [
        p
        for p in listed.stdout.split("\0")
        if p and _ENV_FILE.search(p) and Path(p).name not in _ENV_TEMPLATES
    ]
    out = [
        error(
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
            warn(
                "git",
                f"{dotenv} is not ignored by git: one `git add .` away from being committed",
                "add `.env` to .gitignore",
            )
        )
    if not out:
        out.append(ok("git", "no env file is tracked by git"))
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
    read from (environment, ``.env`` or TOML), ``EXAI_TLS_KEY``, the ``.env`` file when it
    holds secrets, and the session-signing key kept in the state directory when
    ``EXAI_SESSION_SIGNING_KEY`` is not set. Sorted by variable."""
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
    if not settings.session_signing_key:
        # the key the daemon keeps in its state directory when none is configured: whoever
        # reads it can sign a Streamable HTTP session id (an older file, or one copied with
        # its directory, may be readable by all)
        from exai.server.mcp_sessions import STORED_KEY_FILE

        kept = settings.state_path / STORED_KEY_FILE
        if kept.is_file():
            named.append(("session signing key", str(kept)))
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
        f"chmod 600 {shlex.quote(path)}",  # (a command a shell runs as it is: "my dir")
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
            out.append(error("secret-files", *problem))
    if not out:
        what = ", ".join(v for v, _ in files) if files else "none configured"
        out.append(ok("secret-files", f"secret files private to their owner ({what})"))
    return out


def check_tokens(settings: Settings) -> list[Finding]:
    """Malformed token entries; plain tokens shorter than :data:`MIN_TOKEN_LENGTH`."""
    if not settings.tokens:
        return [ok("tokens", "no client tokens configured (loopback clients only)")]
    try:
        parse_tokens(settings.tokens)
    except ConfigError as exc:
        return [error("tokens", f"EXAI_TOKENS: {exc}", "correct the entry named above")]
    out = []
    entries = token_entries(settings.tokens)
    for entry in entries:
        if entry.length is not None and entry.length < MIN_TOKEN_LENGTH:
            out.append(
                error(
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
            ok("tokens", f"{len(entries)} client token(s), {hashed} stored hashed, none short")
        )
    return out


def check_bind(settings: Settings) -> list[Finding]:
    """What the listener exposes; whether the TLS files load; whether clients use TLS."""
    out: list[Finding] = []
    host = settings.host
    if not is_loopback(host):
        if not settings.tokens:
            out.append(
                error(
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
                out.append(warn("bind", msg + " (allowed by EXAI_ALLOW_INSECURE_BIND)", fix))
            else:
                out.append(error("bind", msg + " (exai serve refuses to start)", fix))
    if settings.tls_cert:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            out.append(
                error(
                    "bind",
                    f"EXAI_TLS_CERT/EXAI_TLS_KEY do not load: {exc}",
                    "point them at a PEM certificate chain and its private key",
                )
            )
    if settings.tls_ca and not Path(settings.tls_ca).is_file():
        out.append(
            error("bind", f"EXAI_TLS_CA {settings.tls_ca} is not a file", "correct EXAI_TLS_CA")
        )
    url = urllib.parse.urlsplit(settings.effective_url)
    if url.scheme == "ws" and url.hostname and not is_loopback(url.hostname):
        out.append(
            warn(
                "bind",
                f"EXAI_URL {redact_url(settings.effective_url)} is ws:// to another machine: "
                "the client token crosses the network in clear text",
                "serve TLS on the daemon and use wss:// (EXAI_TLS_CA for a private CA)",
            )
        )
    if not out:
        scheme = "wss" if settings.tls_cert else "ws"
        auth = "tokens" if settings.tokens else "no tokens"
        out.append(ok("bind", f"listener {scheme}://{host}:{settings.port} ({auth})"))
    return out


#: a listener bound to one of these accepts connections on every address of the machine
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def check_client_url(settings: Settings) -> list[Finding]:
    """The URL the bridge, ``exai call``, ``exai status`` and :class:`exai.Client` would use
    (``EXAI_URL``, else derived from ``EXAI_HOST``/``EXAI_PORT``) against the address these
    settings make ``exai serve`` listen on."""
    listens = listen_url(settings)
    if not settings.url:
        if settings.port == 0:
            return [
                warn(
                    "client-url",
                    "EXAI_PORT=0: the daemon picks a free port at each start, which the bridge, "
                    "exai call and exai status cannot know",
                    "set EXAI_PORT to a fixed port, or give the clients EXAI_URL from the "
                    "daemon's 'listening on' line",
                )
            ]
        return [ok("client-url", f"clients connect to {listens} (from EXAI_HOST/EXAI_PORT)")]
    shown = redact_url(settings.url)
    url = urllib.parse.urlsplit(settings.url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        return [
            error(
                "client-url",
                f"EXAI_URL {shown} is not a ws:// or wss:// URL",
                f"set EXAI_URL to {listens}, or unset it (then EXAI_HOST/EXAI_PORT are used)",
            )
        ]
    try:
        port = url.port or (443 if url.scheme == "wss" else 80)
    except ValueError:
        port = -1
    differences = []
    if settings.port and port != settings.port:
        differences.append(f"port {port} where EXAI_PORT is {settings.port}")
    host = settings.host.strip().strip("[]")
    if settings.host.strip() not in _WILDCARD_HOSTS:
        same = url.hostname == host or (is_loopback(url.hostname) and is_loopback(host))
        if not same:
            differences.append(f"host {url.hostname} where EXAI_HOST is {settings.host}")
    if url.scheme == "wss" and not settings.tls_cert:
        differences.append("wss:// where the daemon serves ws:// (no EXAI_TLS_CERT)")
    elif url.scheme == "ws" and settings.tls_cert:
        differences.append("ws:// where the daemon serves wss:// (EXAI_TLS_CERT is set)")
    if url.path.rstrip("/") != "/mcp":
        differences.append(f"path {url.path or '/'!r} where the MCP door is /mcp")
    if differences:
        return [
            warn(
                "client-url",
                f"EXAI_URL {shown} does not reach the daemon these settings start "
                f"({listens}): {'; '.join(differences)}. The bridge, exai call and exai status "
                "would connect elsewhere",
                f"unset EXAI_URL (the client side then derives {listens} from EXAI_HOST/"
                "EXAI_PORT) or correct it; if it names a daemon elsewhere on purpose, ignore this",
            )
        ]
    return [ok("client-url", f"clients connect to {shown} (EXAI_URL), where the daemon listens")]


def check_sqlite(settings: Settings) -> list[Finding]:
    """The SQLite file's directory exists (or can be created) and is writable."""
    url = settings.effective_storage_url
    if not url.startswith("sqlite:"):
        return []
    from exai.storage.sqlite import sqlite_path

    try:
        # the file the store opens (its URL's path unquoted: ``my%20dir`` is ``my dir``), not
        # the URL's text — the check looked at a file that was not there and said "ok"
        path = sqlite_path(url)
    except ConfigError as exc:
        return [error("storage", str(exc), "EXAI_STORAGE_URL=sqlite:////absolute/path")]
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return [
            error(
                "storage",
                f"SQLite store {path}: {probe} is not writable",
                "set EXAI_STATE_DIR or EXAI_STORAGE_URL=sqlite:///<writable path>",
            )
        ]
    exposed = []
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(file.stat().st_mode)
        except OSError:
            continue
        if mode & 0o077:
            exposed.append((file, mode))
    if exposed:
        shown = ", ".join(f"{file} (mode {mode:04o})" for file, mode in exposed)
        return [
            warn(
                "storage",
                f"SQLite store {path}: other accounts on this machine can read every "
                f"conversation in {shown}",
                "chmod 600 " + " ".join(shlex.quote(str(file)) for file, _ in exposed),
            )
        ]
    return [ok("storage", f"SQLite store at {path}")]


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
        *check_client_url(settings),
        *check_sqlite(settings),
    ]
