"""Settings: one frozen attrs class holding every setting of exai, with its validation.

Build it with :meth:`Settings.from_env` (the environment, an optional ``.env`` and a TOML file:
see :mod:`exai.config.loader` for the sources and their precedence); change it in tests with
``attrs.evolve``. Units are in the names (``_s`` seconds, ``_bytes`` bytes). Each field's
metadata holds its documentation (``.env.example`` is generated from it), when it is not
``EXAI_<FIELD>``, its environment variable, and ``client``: whether only the client side (the
bridge, ``exai call``/``status``, :class:`exai.Client`) reads it — the daemon never does, so a
reload does not name it among the settings it leaves for a restart.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from exai.config.loader import env_names, load
from exai.config.providers import PROVIDER_FIELDS, ProviderSettings, str_tuple
from exai.config.secret import TOKEN_TEXT_RULE, Secret, is_token_text, redact_url
from exai.errors import ConfigError

__all__ = [
    "Settings",
    "connect_host",
    "default_state_dir",
    "is_loopback",
    "known_env_names",
    "listen_url",
]


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/exai``, else ``~/.local/state/exai``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "exai"


def _field(
    default: Any, doc: str, *, env: str | None = None, client: bool = False, **kw: Any
) -> Any:
    metadata = {"doc": doc, "env": env, "client": client}
    return attrs.field(default=default, metadata=metadata, **kw)


@attrs.frozen(kw_only=True)
class Settings:
    """Every setting of exai. Build it with :meth:`from_env`; change it in tests with
    ``attrs.evolve``. Units are in the names (``_s`` seconds, ``_bytes`` bytes)."""

    # --- listener and admin -------------------------------------------------------------
    host: str = _field("127.0.0.1", "address the MCP WebSocket listener binds")
    port: int = _field(8079, "MCP WebSocket port (0 = a free port)")
    admin_host: str = _field("127.0.0.1", "address of the admin HTTP listener")
    admin_port: int = _field(8080, "admin HTTP port for /healthz /readyz /metrics (0 = free)")
    tokens: Secret | None = _field(
        None, "client tokens, comma-separated; 'name:token' and 'sha256:<hex>' allowed"
    )
    allow_insecure_bind: bool = _field(
        False, "allow a non-loopback bind without TLS (tokens then cross the network in clear)"
    )
    tls_cert: str = _field("", "PEM certificate chain: serve wss:// instead of ws://")
    tls_key: str = _field("", "PEM private key for EXAI_TLS_CERT")
    tls_ca: str = _field("", "PEM CA bundle the bridge and client trust for wss://", client=True)

    # --- admission and sessions ----------------------------------------------------------
    max_connections: int = _field(1024, "open connections (WebSocket and HTTP), in all")
    max_connections_per_ip: int = _field(256, "open connections from one address")
    trusted_proxies: tuple[str, ...] = _field(
        (),
        "addresses or networks of load balancers whose X-Forwarded-For names the client "
        "(per-IP limits, audit); empty = the TCP peer is the client",
        converter=str_tuple,
    )
    allowed_origins: tuple[str, ...] = _field(
        (),
        "browser Origins served besides the loopback ones: http[s]://host[:port], ':*' for any "
        "port (others get 403)",
        converter=str_tuple,
    )
    allowed_hosts: tuple[str, ...] = _field(
        (),
        "Host values served besides the loopback ones (DNS rebinding): name or name:port, "
        "'*' for any; empty = loopback names only while EXAI_HOST is loopback, any otherwise "
        "(others get 421)",
        converter=str_tuple,
    )
    session_signing_key: Secret | None = _field(
        None,
        "key signing Streamable HTTP session ids (Mcp-Session-Id), at least 32 characters; "
        "every daemon of a deployment needs the same (empty = a key kept in the state directory, "
        "session-signing.key, made on first start)",
    )
    http_session_ttl_s: float = _field(
        86400.0, "how long an Mcp-Session-Id is accepted after its initialize"
    )
    http_keepalive_s: float = _field(30.0, "an idle keep-alive HTTP connection is closed after")
    legacy_protocol: bool = _field(
        True, "serve the old daemon's op protocol (hello/call_tool) on ws://host:port/"
    )
    handshake_timeout_s: float = _field(5.0, "bound on the HTTP upgrade (slowloris guard)")
    max_frame_bytes: int = _field(4 * 1024 * 1024, "largest accepted WebSocket message")
    max_json_depth: int = _field(64, "deepest accepted JSON nesting in a message")
    max_json_elements: int = _field(
        100_000, "most JSON values in one message (checked before decoding)"
    )
    session_rate_per_s: float = _field(50.0, "messages per second per connection")
    session_burst: int = _field(100, "message burst per connection")
    session_abuse_limit: int = _field(
        200,
        "rate-limited messages (beyond a tenth of the rate) after which the connection is "
        "closed with 1008",
    )
    session_max_inflight: int = _field(8, "concurrent tools/call per connection")
    session_queue_max: int = _field(
        32, "calls waiting (FIFO, each until its deadline) for one of the connection's slots"
    )
    session_max_pending: int = _field(
        64, "requests admitted on one connection and not yet answered (running, queued, unread)"
    )
    session_max_pending_bytes: int = _field(
        16 * 1024 * 1024, "bytes those may hold on one connection (requests and unread answers)"
    )
    max_pending_bytes: int = _field(
        256 * 1024 * 1024, "bytes all connections' pending requests and unread answers may hold"
    )
    send_timeout_s: float = _field(
        30.0, "a connection whose writer makes no progress this long is closed with 1008"
    )
    max_inflight: int = _field(64, "concurrent tools/call in the daemon")
    round_budget_s: float = _field(
        0.010,
        "a scheduler round that has run this long begins no more calls and takes in no more "
        "answers; they wait for the next rounds, so thousands at once do not stall the loop",
    )
    slot_wait_s: float = _field(
        1.0,
        "longest wait for an identity or daemon-wide slot before 'overloaded' (or the call's "
        "deadline, if sooner: 'timeout')",
    )
    call_timeout_s: float = _field(300.0, "default deadline of a tools/call")
    heartbeat_interval_s: float = _field(5.0, "progress heartbeat while a call runs")
    drain_timeout_s: float = _field(10.0, "on shutdown, how long in-flight calls may finish")
    idempotency_ttl_s: float = _field(600.0, "how long a finished call's result is kept")
    idempotency_max_entries: int = _field(10_000, "results kept for retried requests")
    result_cache_max_bytes: int = _field(
        64 * 1024 * 1024, "bytes of finished results kept for retried requests (oldest out)"
    )
    memory_limit_bytes: int = _field(0, "memory budget when no cgroup limit (0 = none)")
    memory_high_watermark: float = _field(0.90, "fraction of the memory limit that stops admission")
    memory_low_watermark: float = _field(0.80, "fraction of the memory limit that resumes it")
    memory_check_interval_s: float = _field(1.0, "how often memory is read")
    stall_threshold_s: float = _field(0.05, "a loop blocked longer than this is logged as a stall")
    identity_rate_per_s: float = _field(0.0, "messages per second per client identity (0 = off)")
    identity_burst: int = _field(200, "message burst per client identity")
    identity_max_inflight: int = _field(0, "concurrent tools/call per client identity (0 = off)")
    secret_watch_interval_s: float = _field(2.0, "how often secret files are checked for changes")
    max_answer_bytes: int = _field(
        4 * 1024 * 1024,
        "largest answer (content + reasoning, UTF-8 bytes) read from a provider; the read stops "
        "past it with answer_too_large",
    )

    # --- client side (bridge, exai call, exai.Client) ------------------------------------
    url: str = _field(
        "",
        "daemon URL for the bridge, exai call/status and exai.Client (empty = "
        "ws[s]://EXAI_HOST:EXAI_PORT/mcp, a wildcard host read as loopback)",
        client=True,
    )
    token: Secret | None = _field(None, "client token the bridge and client send", client=True)
    connect_wait_s: float = _field(
        5.0,
        "how long the bridge's requests wait for a daemon it has not reached yet before an "
        "error that says how to start it",
        client=True,
    )
    autostart: bool = _field(
        False,
        "the bridge starts exai serve itself when nothing answers on its loopback URL (one "
        "daemon for all bridges; its log is daemon.log in the state directory)",
        client=True,
    )
    autostart_wait_s: float = _field(
        30.0, "how long a bridge waits for the daemon it started to listen", client=True
    )

    # --- logging and state ----------------------------------------------------------------
    log_level: str = _field("info", "debug, info, warning or error")
    log_format: str = _field(
        "auto",
        "json, text, or auto (json when stderr is not a terminal); the start-up lines follow it",
    )
    audit_log: str = _field("", "path of the audit log (one JSON line per call); empty = off")
    state_dir: str = _field("", "where the SQLite store and the spool live (default XDG state)")

    # --- conversations and storage --------------------------------------------------------
    storage_url: Secret | None = _field(
        None, "sqlite:///path or postgresql://… (default: SQLite in the state directory)"
    )
    redis_url: Secret | None = _field(None, "redis://… for cache and shared limits (optional)")
    redis_key_prefix: str = _field("exai:", "prefix of every Redis key exai writes")
    pg_pool_min: int = _field(1, "PostgreSQL pool minimum size")
    pg_pool_max: int = _field(10, "PostgreSQL pool maximum size")
    redis_pool_max: int = _field(20, "Redis connection pool size")
    store_timeout_s: float = _field(5.0, "bound on one store operation")
    conversation_max_turns: int = _field(50, "turns per thread")
    conversation_max_bytes: int = _field(2_000_000, "bytes of content per thread")
    conversation_ttl_s: float = _field(3 * 3600.0, "a thread expires this long after its last turn")
    spool_max_bytes: int = _field(64 * 1024 * 1024, "bound of the local write spool")
    spool_flush_timeout_s: float = _field(
        5.0, "on a graceful shutdown, how long the spool may replay into the store before exit"
    )
    thread_cache_max_bytes: int = _field(
        32 * 1024 * 1024,
        "bytes of recently used threads kept in memory (served while the store is down)",
    )
    conversation_shared_across_identities: bool = _field(
        False,
        "let every client identity continue every thread (default: only the identity that "
        "created it)",
    )
    rate_limit_replicas: int = _field(
        1, "daemons sharing provider limits through Redis (each takes 1/N while Redis is down)"
    )
    rate_limit_on_redis_error: str = _field(
        "local_share", "when Redis is down: local_share (rate/replicas locally) or fail_closed"
    )
    shared_health_poll_s: float = _field(
        0.5,
        "how often a daemon reads the providers' shared 'open until' from Redis (0 = do not "
        "share provider health)",
    )

    # --- files ----------------------------------------------------------------------------
    file_roots: tuple[str, ...] = _field(
        (), "absolute directories tools may read (default: the home directory)", converter=str_tuple
    )
    file_max_bytes: int = _field(256 * 1024, "largest file embedded in a prompt")
    files_max_total_bytes: int = _field(1024 * 1024, "all files of one call together")

    # --- models ---------------------------------------------------------------------------
    default_model: str = _field("auto", "model used when a call names none")
    fast_models: tuple[str, ...] = _field(
        ("glm-4.5-flash", "kimi-k2-turbo-preview"),
        "fallback chain for simple tools and early steps",
        converter=str_tuple,
    )
    quality_models: tuple[str, ...] = _field(
        ("kimi-k2-0905-preview", "glm-4.6"),
        "fallback chain for deep work and final steps",
        converter=str_tuple,
    )

    # --- providers (KIMI_*, GLM_*, EXAI_PROVIDER_<NAME>_*, [providers.<name>]) -----------
    providers: tuple[ProviderSettings, ...] = attrs.field(
        default=(), metadata={"doc": "LLM providers", "env": "-"}
    )

    #: ``(variable, path)`` of every file these settings were read from: the TOML file, the
    #: ``.env`` file and each ``*_FILE`` secret, whichever source named it (set by
    #: :meth:`from_env`). The file sandbox refuses them by identity; ``exai serve`` warns about
    #: those that other accounts can read.
    source_files: tuple[tuple[str, str], ...] = attrs.field(
        default=(), metadata={"doc": "files the settings were read from", "env": "-"}
    )

    # ------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir()

    @property
    def effective_url(self) -> str:
        """Where the client side connects: ``EXAI_URL``, else the address these settings
        listen on (:func:`listen_url`)."""
        return self.url or listen_url(self)

    @property
    def effective_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url.reveal()
        # (quoted: the store reads the URL's path unquoted, and a state directory named with
        # "#", "?" or "%41" put the store elsewhere — "/x/a#b" in "/x/a", outside it)
        return "sqlite:///" + urllib.parse.quote(str(self.state_path / "exai.sqlite3"))

    @property
    def effective_file_roots(self) -> tuple[str, ...]:
        return self.file_roots or (str(Path.home()),)

    def provider(self, name: str) -> ProviderSettings | None:
        return next((p for p in self.providers if p.name == name), None)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        client: bool = False,
    ) -> Settings:
        """Build the settings.

        Args:
            environ: the environment to read (default ``os.environ``).
            env_file: a ``.env`` file; default ``EXAI_ENV_FILE`` or ``./.env`` if present.
            config_file: a TOML file; default ``EXAI_CONFIG``.
            client: for a client command (the bridge, ``exai call``/``status``,
                ``exai.Client``): the daemon's secrets (``EXAI_TOKENS[_FILE]``, the storage and
                Redis URLs, the signing key, providers' API keys) are left unset and their
                files not read — the client may not be allowed to read them. ``EXAI_TOKEN``
                (``_FILE``) is read as ever.

        Raises:
            ConfigError: an unknown ``EXAI_*`` name or TOML key, a value of the wrong type,
                an unreadable secret file. The message names the variable, never a secret.
        """
        settings = load(cls, environ, env_file=env_file, config_file=config_file, client=client)
        _validate(settings)
        return settings

    def display(self) -> dict[str, Any]:
        """Every effective setting, secrets redacted: what ``exai config`` prints."""
        out: dict[str, Any] = {}
        for f in attrs.fields(Settings):
            if f.name in ("providers", "source_files"):
                continue
            out[f.name] = _display_value(getattr(self, f.name))
        out["effective_url"] = redact_url(self.effective_url)
        out["effective_storage_url"] = redact_url(self.effective_storage_url)
        out["providers"] = {
            p.name: {k: _display_value(getattr(p, k)) for k in PROVIDER_FIELDS if hasattr(p, k)}
            | {"configured": p.configured}
            for p in self.providers
        }
        return out


def _display_value(v: Any) -> Any:
    if isinstance(v, Secret):
        return v.redacted()
    if isinstance(v, tuple):
        return list(v)
    return v


def known_env_names() -> list[str]:
    """Every ``EXAI_*`` variable name exai understands (``*_FILE`` variants included)."""
    return env_names(Settings)


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
#: a listener bound here accepts connections on every address: a client connects to loopback
#: (``::`` binds IPv6 only under trio, hence ``::1`` for it)
_WILDCARD_CONNECT = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a listener bound to ``host``: a wildcard
    (``0.0.0.0``, ``::``, empty) read as loopback; an IPv6 address without brackets."""
    host = host.strip()
    return _WILDCARD_CONNECT.get(host, host).strip("[]")


def listen_url(settings: Settings) -> str:
    """The URL a client on this machine reaches the listener of ``settings`` at:
    ``ws[s]://EXAI_HOST:EXAI_PORT/mcp``, a wildcard host (``0.0.0.0``, ``::``) read as loopback.
    (``EXAI_PORT=0`` picks a free port at start, which no setting can name: the URL then says
    port 0, and ``exai doctor`` says so.)"""
    host = connect_host(settings.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "wss" if settings.tls_cert else "ws"
    return f"{scheme}://{host}:{settings.port}/mcp"


#: an EXAI_ALLOWED_ORIGINS entry: scheme://host[:port|:*] (exai.server.origins reads it)
_ORIGIN_ENTRY = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]@?#]+)(:(\d{1,5}|\*))?/?$")


#: an EXAI_ALLOWED_HOSTS entry: name[:port] or [v6][:port] (exai.server.origins reads it)
_HOST_ENTRY = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?$")


def is_loopback(host: str) -> bool:
    return host in _LOOPBACK or host.startswith("127.")


def _validate(s: Settings) -> None:
    for name in (
        "max_connections",
        "max_connections_per_ip",
        "max_frame_bytes",
        "session_max_inflight",
        "max_inflight",
        "max_json_depth",
        "max_answer_bytes",
        "max_json_elements",
        "session_max_pending",
        "session_max_pending_bytes",
        "max_pending_bytes",
        "result_cache_max_bytes",
    ):
        if getattr(s, name) < 1:
            raise ConfigError(f"EXAI_{name.upper()} must be at least 1")
    for name in (
        "call_timeout_s",
        "connect_wait_s",
        "autostart_wait_s",
        "handshake_timeout_s",
        "slot_wait_s",
        "session_rate_per_s",
        "send_timeout_s",
    ):
        if getattr(s, name) <= 0:
            raise ConfigError(f"EXAI_{name.upper()} must be greater than 0")
    if not s.round_budget_s >= 0:
        raise ConfigError("EXAI_ROUND_BUDGET_S must be 0 or more")
    if s.session_queue_max < 0:
        raise ConfigError("EXAI_SESSION_QUEUE_MAX must be 0 or more")
    if s.session_max_pending < s.session_max_inflight:
        raise ConfigError(
            "EXAI_SESSION_MAX_PENDING must be at least EXAI_SESSION_MAX_INFLIGHT (every running "
            "call is a pending request)"
        )
    if not 0 < s.memory_low_watermark < s.memory_high_watermark <= 1:
        raise ConfigError(
            "EXAI_MEMORY_LOW_WATERMARK must be below EXAI_MEMORY_HIGH_WATERMARK, both in (0, 1]"
        )
    if s.store_timeout_s <= 0:
        raise ConfigError("EXAI_STORE_TIMEOUT_S must be greater than 0")
    for name in ("spool_flush_timeout_s", "thread_cache_max_bytes", "spool_max_bytes"):
        if getattr(s, name) < 0:
            raise ConfigError(f"EXAI_{name.upper()} must not be negative")
    if s.rate_limit_on_redis_error not in ("local_share", "fail_closed"):
        raise ConfigError("EXAI_RATE_LIMIT_ON_REDIS_ERROR must be local_share or fail_closed")
    if s.rate_limit_replicas < 1:
        raise ConfigError("EXAI_RATE_LIMIT_REPLICAS must be at least 1")
    if not 0 <= s.shared_health_poll_s <= 60:
        raise ConfigError("EXAI_SHARED_HEALTH_POLL_S must be between 0 (off) and 60")
    if s.log_format not in ("auto", "json", "text"):
        raise ConfigError("EXAI_LOG_FORMAT must be auto, json or text")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("EXAI_TLS_CERT and EXAI_TLS_KEY must be set together")
    for name in ("http_session_ttl_s", "http_keepalive_s"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"EXAI_{name.upper()} must be greater than 0")
    for origin in s.allowed_origins:
        if not _ORIGIN_ENTRY.match(origin):
            raise ConfigError(
                f"EXAI_ALLOWED_ORIGINS: {origin!r} is not an origin (http[s]://host[:port], "
                "':*' for any port)"
            )
    for host in s.allowed_hosts:
        if host.strip() != "*" and not _HOST_ENTRY.match(host.strip()):
            raise ConfigError(
                f"EXAI_ALLOWED_HOSTS: {host!r} is not a host (name, name:port, [v6]:port, or * "
                "for any)"
            )
    if s.session_signing_key and len(s.session_signing_key.reveal()) < 32:
        raise ConfigError(
            "EXAI_SESSION_SIGNING_KEY must be at least 32 characters (`exai token new signing` "
            "prints a suitable random value)"
        )
    for proxy in s.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"EXAI_TRUSTED_PROXIES: {proxy!r} is not an IP address or network"
            ) from None
    for root in s.file_roots:
        if not os.path.isabs(root):
            raise ConfigError(f"EXAI_FILE_ROOTS: {root!r} is not an absolute path")
    for p in s.providers:
        if not p.quota_hold_s >= 0:
            raise ConfigError(f"provider {p.name!r}: quota_hold_s must be at least 0")
    if s.token and not is_token_text(s.token.reveal()):
        raise ConfigError(f"EXAI_TOKEN: {TOKEN_TEXT_RULE}")
