"""Settings: one frozen attrs class, from the environment, an optional ``.env`` and a TOML file.

Precedence, lowest first: built-in defaults, the TOML file named by ``EXAI_CONFIG``, the ``.env``
file (``EXAI_ENV_FILE``, default ``./.env`` when it exists), the process environment.

Every field maps to one environment variable (``EXAI_<FIELD>`` unless its metadata names
another). Secrets (:class:`Secret`) may also come from ``<NAME>_FILE``, a path whose content is
the value; a value read from a file is never copied into ``os.environ``. An ``EXAI_*`` variable
that names no setting is a start-up error that suggests the closest valid name, so a typo is
never silently ignored.

Extra OpenAI-compatible providers come from ``[providers.<name>]`` tables in the TOML file or
from ``EXAI_PROVIDER_<NAME>_<FIELD>`` variables (``BASE_URL``, ``API_KEY``, ``MODELS``, ``RPM``,
``TPM``, ``MAX_CONCURRENCY``, …). Kimi and GLM use ``KIMI_<FIELD>`` and ``GLM_<FIELD>``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from exai.errors import ConfigError

__all__ = ["ProviderSettings", "Secret", "Settings", "default_state_dir"]


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
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        user = parts.username + (":***" if parts.password else "")
        netloc = f"{user}@{netloc}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/exai``, else ``~/.local/state/exai``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "exai"


def _field(default: Any, doc: str, *, env: str | None = None, **kw: Any) -> Any:
    return attrs.field(default=default, metadata={"doc": doc, "env": env}, **kw)


def _tuple(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split(",") if p.strip())
    return tuple(str(x) for x in v)


PROVIDER_FIELDS = (
    "base_url",
    "api_key",
    "models",
    "kind",
    "rpm",
    "tpm",
    "max_concurrency",
    "pool_max",
    "connect_timeout_s",
    "stall_timeout_s",
    "breaker_failure_rate",
    "breaker_minimum_calls",
    "breaker_window",
    "breaker_open_s",
    "breaker_max_open_s",
    "quota_hold_s",
)


@attrs.frozen(kw_only=True)
class ProviderSettings:
    """One LLM provider endpoint and its limits.

    ``kind`` is ``"kimi"``, ``"glm"`` or ``"openai"`` (any OpenAI-compatible endpoint).
    ``rpm``/``tpm`` of 0 mean unlimited.
    """

    name: str
    kind: str = "openai"
    base_url: str
    api_key: Secret | None = None
    models: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    rpm: float = 0.0
    tpm: float = 0.0
    max_concurrency: int = 8
    pool_max: int = 16
    connect_timeout_s: float = 5.0
    stall_timeout_s: float = 60.0
    breaker_failure_rate: float = 0.5
    breaker_minimum_calls: int = 5
    breaker_window: int = 20
    breaker_open_s: float = 5.0
    breaker_max_open_s: float = 120.0
    #: after a "quota exhausted / insufficient balance" answer, no request is sent to this
    #: provider for this long (a longer ``Retry-After`` wins)
    quota_hold_s: float = 300.0

    @property
    def configured(self) -> bool:
        """True when the provider can be called: a key is set (or the endpoint needs none)."""
        return bool(self.api_key) or self.kind == "openai"


_BUILTIN_PROVIDERS: dict[str, dict[str, Any]] = {
    "kimi": {
        "kind": "kimi",
        "base_url": "https://api.moonshot.ai/v1",
        "models": (
            "kimi-k2-0905-preview",
            "kimi-k2-turbo-preview",
            "kimi-thinking-preview",
            "moonshot-v1-8k",
            "moonshot-v1-32k",
            "moonshot-v1-128k",
        ),
        "max_concurrency": 6,
    },
    "glm": {
        "kind": "glm",
        "base_url": "https://api.z.ai/api/paas/v4",
        "models": ("glm-4.6", "glm-4.5", "glm-4.5-flash", "glm-4.5-air", "glm-4.5v"),
        "max_concurrency": 4,
    },
}


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
    tls_ca: str = _field("", "PEM CA bundle the bridge and client trust for wss://")

    # --- admission and sessions ----------------------------------------------------------
    max_connections: int = _field(1024, "open WebSocket connections, in all")
    max_connections_per_ip: int = _field(256, "open WebSocket connections from one address")
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
    slot_wait_s: float = _field(
        1.0, "longest wait for an identity or daemon-wide slot before 'overloaded'"
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
    stall_threshold_s: float = _field(0.05, "a loop step longer than this is logged as a stall")
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
    url: str = _field("ws://127.0.0.1:8079/mcp", "daemon URL for the bridge and client")
    token: Secret | None = _field(None, "client token the bridge and client send")

    # --- logging and state ----------------------------------------------------------------
    log_level: str = _field("info", "debug, info, warning or error")
    log_format: str = _field("auto", "json, text, or auto (json when not on a terminal)")
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

    # --- files ----------------------------------------------------------------------------
    file_roots: tuple[str, ...] = _field(
        (), "absolute directories tools may read (default: the home directory)", converter=_tuple
    )
    file_max_bytes: int = _field(256 * 1024, "largest file embedded in a prompt")
    files_max_total_bytes: int = _field(1024 * 1024, "all files of one call together")

    # --- models ---------------------------------------------------------------------------
    default_model: str = _field("auto", "model used when a call names none")
    fast_models: tuple[str, ...] = _field(
        ("glm-4.5-flash", "kimi-k2-turbo-preview"),
        "fallback chain for simple tools and early steps",
        converter=_tuple,
    )
    quality_models: tuple[str, ...] = _field(
        ("kimi-k2-0905-preview", "glm-4.6"),
        "fallback chain for deep work and final steps",
        converter=_tuple,
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
    def effective_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url.reveal()
        return "sqlite:///" + str(self.state_path / "exai.sqlite3")

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
    ) -> Settings:
        """Build the settings.

        Args:
            environ: the environment to read (default ``os.environ``).
            env_file: a ``.env`` file; default ``EXAI_ENV_FILE`` or ``./.env`` if present.
            config_file: a TOML file; default ``EXAI_CONFIG``.

        Raises:
            ConfigError: an unknown ``EXAI_*`` name or TOML key, a value of the wrong type,
                an unreadable secret file. The message names the variable, never a secret.
        """
        env = dict(os.environ if environ is None else environ)
        merged: dict[str, str] = {}
        sources: list[tuple[str, str]] = []
        ef = env_file if env_file is not None else env.get("EXAI_ENV_FILE")
        if ef is None and Path(".env").is_file():
            ef = ".env"
        if ef:
            merged.update(_read_env_file(Path(ef)))
            sources.append(("EXAI_ENV_FILE", os.path.abspath(ef)))
        merged.update(env)
        cf = config_file if config_file is not None else merged.get("EXAI_CONFIG")
        toml_data = _read_toml(Path(cf)) if cf else {}
        if cf:
            sources.append(("EXAI_CONFIG", os.path.abspath(cf)))
        return _build(cls, merged, toml_data, sources)

    def display(self) -> dict[str, Any]:
        """Every effective setting, secrets redacted: what ``exai config`` prints."""
        out: dict[str, Any] = {}
        for f in attrs.fields(Settings):
            if f.name in ("providers", "source_files"):
                continue
            out[f.name] = _display_value(getattr(self, f.name))
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


# ---------------------------------------------------------------------------------------
# loading

_META_VARS = {"EXAI_CONFIG", "EXAI_ENV_FILE"}
_PROVIDER_ENV = re.compile(r"^EXAI_PROVIDER_([A-Z0-9]+)_(.+)$")


def env_name(field: attrs.Attribute[Any]) -> str:
    return field.metadata.get("env") or "EXAI_" + field.name.upper()


def known_env_names() -> list[str]:
    """Every ``EXAI_*`` variable name exai understands (``*_FILE`` variants included)."""
    names = set(_META_VARS)
    for f in attrs.fields(Settings):
        if f.metadata.get("env") == "-":
            continue
        n = env_name(f)
        names.add(n)
        if _is_secret(f):
            names.add(n + "_FILE")
    return sorted(names)


def _is_secret(f: attrs.Attribute[Any]) -> bool:
    return "Secret" in str(f.type)


def _read_env_file(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    try:
        values = dotenv_values(path)
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from exc
    return {k: v for k, v in values.items() if v is not None}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _read_secret_file(var: str, path: str, sources: list[tuple[str, str]]) -> str:
    """The content of the secret file ``path`` named by ``var``, recorded in ``sources``.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, or is empty (an empty tokens file
            would turn authentication off, an empty key would fail every call).
    """
    sources.append((var, os.path.abspath(path)))
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read secret file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{var}: secret file {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(
            f"{var}: secret file {path} is empty; write the secret into it, or unset {var}"
        )
    return value


def _convert(name: str, typ: Any, raw: Any) -> Any:
    t = str(typ)
    try:
        if "Secret" in t:
            if isinstance(raw, Secret):
                return raw
            s = str(raw)
            return Secret(s) if s else None
        if t in ("bool", "<class 'bool'>"):
            if isinstance(raw, bool):
                return raw
            low = str(raw).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if t in ("int", "<class 'int'>"):
            return int(raw)
        if t in ("float", "<class 'float'>"):
            return float(raw)
        if "tuple" in t:
            return _tuple(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {t}, got an invalid value") from None


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def _secret_from(env: Mapping[str, str], var: str, sources: list[tuple[str, str]]) -> str | None:
    if env.get(var + "_FILE"):
        return _read_secret_file(var + "_FILE", env[var + "_FILE"], sources)
    return env.get(var)


def _toml_secret_files(
    table: dict[str, Any], secret_names: set[str], where: str, sources: list[tuple[str, str]]
) -> dict[str, Any]:
    """``table`` with each ``<secret>_file = "path"`` key replaced by the file's content."""
    out = dict(table)
    for key in list(table):
        base = key.removesuffix("_file")
        if key == base or base not in secret_names:
            continue
        path = out.pop(key)
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}{key} must be the path of a file")
        out[base] = _read_secret_file(f"{where}{key}", path, sources)
    return out


def _check_token_entries(var: str, raw: str) -> None:
    """A tokens value that holds no entry at all (blank lines, comments, commas) would turn
    authentication off without a word: refuse it, naming the variable."""
    for line in raw.replace(",", "\n").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            return
    raise ConfigError(
        f"{var} holds no token entry (only blank lines or comments), which would turn "
        f"authentication off; add entries (see `exai token new NAME`) or unset {var}"
    )


def _origin(env: Mapping[str, str], toml_keys: set[str], name: str) -> str:
    """Which variable or config-file key gave the secret setting ``name`` its value."""
    var = "EXAI_" + name.upper()
    if env.get(var + "_FILE"):
        return var + "_FILE"
    if env.get(var):
        return var
    key = name + "_file" if name + "_file" in toml_keys else name
    return f"{key} in the config file"


def _build(
    cls: type[Settings],
    env: Mapping[str, str],
    toml_data: dict[str, Any],
    sources: list[tuple[str, str]] | None = None,
) -> Settings:
    fields = {f.name: f for f in attrs.fields(Settings)}
    values: dict[str, Any] = {}
    sources = [] if sources is None else sources

    secret_fields = {name for name, f in fields.items() if _is_secret(f)}
    toml_providers = toml_data.get("providers", {})
    toml_keys = set(toml_data)
    toml_data = _toml_secret_files(toml_data, secret_fields, "", sources)
    for key, toml_value in toml_data.items():
        if key == "providers":
            continue
        if key not in fields or fields[key].metadata.get("env") == "-":
            raise ConfigError(
                f"unknown setting {key!r} in the config file{_suggest(key, list(fields))}"
            )
        values[key] = _convert(key, fields[key].type, toml_value)

    known = known_env_names()
    for var in env:
        if not var.startswith("EXAI_") or var in known or _PROVIDER_ENV.match(var):
            continue
        raise ConfigError(f"unknown setting {var}{_suggest(var, known)}")

    for name, f in fields.items():
        if f.metadata.get("env") == "-":
            continue
        var = env_name(f)
        raw: str | None = _secret_from(env, var, sources) if _is_secret(f) else env.get(var)
        if raw:  # an empty value (as in a copied .env.example) means "the default"
            values[name] = _convert(var, f.type, raw)
    if values.get("tokens"):
        _check_token_entries(_origin(env, toml_keys, "tokens"), values["tokens"].reveal())

    values["providers"] = _build_providers(env, toml_providers, sources)
    values["source_files"] = tuple(sources)
    try:
        settings = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings: {exc}") from None
    _validate(settings)
    return settings


def _provider_values(
    prefix: str, env: Mapping[str, str], sources: list[tuple[str, str]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fld in PROVIDER_FIELDS:
        var = f"{prefix}_{fld.upper()}"
        raw = _secret_from(env, var, sources) if fld == "api_key" else env.get(var)
        if raw:
            out[fld] = raw
    return out


def _build_providers(
    env: Mapping[str, str], toml_providers: dict[str, Any], sources: list[tuple[str, str]]
) -> tuple[ProviderSettings, ...]:
    pfields = {f.name: f for f in attrs.fields(ProviderSettings)}
    specs: dict[str, dict[str, Any]] = {}
    for name, base in _BUILTIN_PROVIDERS.items():
        specs[name] = dict(base)
    for name, table in toml_providers.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[providers.{name}] must be a table")
        table = _toml_secret_files(table, {"api_key"}, f"[providers.{name}] ", sources)
        for key in table:
            if key not in pfields or key == "name":
                hint = _suggest(key, list(PROVIDER_FIELDS))
                raise ConfigError(f"unknown key {key!r} in [providers.{name}]{hint}")
        specs.setdefault(name, {}).update(table)
    for name in ("kimi", "glm"):
        specs[name].update(_provider_values(name.upper(), env, sources))
    extra_names = {m.group(1) for v in env if (m := _PROVIDER_ENV.match(v))}
    for upper in sorted(extra_names):
        vals = _provider_values(f"EXAI_PROVIDER_{upper}", env, sources)
        bad = [
            v
            for v in env
            if v.startswith(f"EXAI_PROVIDER_{upper}_")
            and v.removeprefix(f"EXAI_PROVIDER_{upper}_").removesuffix("_FILE").lower()
            not in PROVIDER_FIELDS
        ]
        if bad:
            raise ConfigError(
                f"unknown setting {bad[0]}; provider fields are "
                + ", ".join(f.upper() for f in PROVIDER_FIELDS)
            )
        specs.setdefault(upper.lower(), {}).update(vals)

    out = []
    for name, spec in specs.items():
        if "base_url" not in spec:
            raise ConfigError(f"provider {name!r} needs a base_url")
        kw = {k: _convert(f"{name}.{k}", pfields[k].type, v) for k, v in spec.items()}
        out.append(ProviderSettings(name=name, **kw))
    return tuple(out)


_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
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
        "handshake_timeout_s",
        "slot_wait_s",
        "session_rate_per_s",
        "send_timeout_s",
    ):
        if getattr(s, name) <= 0:
            raise ConfigError(f"EXAI_{name.upper()} must be greater than 0")
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
    if s.log_format not in ("auto", "json", "text"):
        raise ConfigError("EXAI_LOG_FORMAT must be auto, json or text")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("EXAI_TLS_CERT and EXAI_TLS_KEY must be set together")
    for root in s.file_roots:
        if not os.path.isabs(root):
            raise ConfigError(f"EXAI_FILE_ROOTS: {root!r} is not an absolute path")
    for p in s.providers:
        if not p.quota_hold_s >= 0:
            raise ConfigError(f"provider {p.name!r}: quota_hold_s must be at least 0")
    if s.token and not is_token_text(s.token.reveal()):
        raise ConfigError(f"EXAI_TOKEN: {TOKEN_TEXT_RULE}")
