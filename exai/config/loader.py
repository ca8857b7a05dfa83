"""Where the settings come from: the environment, an optional ``.env`` and a TOML file.

Precedence, lowest first: built-in defaults, the TOML file named by ``EXAI_CONFIG``, the ``.env``
file (``EXAI_ENV_FILE``, default ``./.env`` when it exists), the process environment.

Every field maps to one environment variable (``EXAI_<FIELD>`` unless its metadata names
another). Secrets (:class:`~exai.config.secret.Secret`) may also come from ``<NAME>_FILE``, a
path whose content is the value; a value read from a file is never copied into ``os.environ``.
An ``EXAI_*`` variable that names no setting is an error that suggests the closest valid name,
so a typo is never silently ignored.

Extra OpenAI-compatible providers come from ``[providers.<name>]`` tables in the TOML file or
from ``EXAI_PROVIDER_<NAME>_<FIELD>`` variables (``BASE_URL``, ``API_KEY``, ``MODELS``, ``RPM``,
``TPM``, ``MAX_CONCURRENCY``, …). Kimi and GLM use ``KIMI_<FIELD>`` and ``GLM_<FIELD>``.

:func:`load` reads the sources into any attrs settings class (``Settings.from_env`` uses it and
then validates the result); it knows the sources, not what each setting means.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from attrs import AttrsInstance

from exai.config.providers import (
    BUILTIN_PROVIDERS,
    PROVIDER_FIELDS,
    ProviderSettings,
    str_tuple,
)
from exai.config.secret import Secret
from exai.errors import ConfigError

__all__ = ["env_name", "env_names", "load"]

T = TypeVar("T", bound=AttrsInstance)


def load(
    cls: type[T],
    environ: Mapping[str, str] | None = None,
    *,
    env_file: str | os.PathLike[str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    client: bool = False,
) -> T:
    """Read the sources (see the module docstring) into an instance of ``cls``.

    Args:
        cls: the settings class (attrs; fields with ``metadata["env"]``, ``providers`` and
            ``source_files``).
        environ: the environment to read (default ``os.environ``).
        env_file: a ``.env`` file; default ``EXAI_ENV_FILE`` or ``./.env`` if present.
        config_file: a TOML file; default ``EXAI_CONFIG``.
        client: for a client command (the bridge, ``exai call``/``status``, ``exai.Client``):
            the secret files only the daemon uses (every secret but those of fields whose
            metadata says ``client``, such as ``EXAI_TOKEN``; providers' API keys) are not
            read, so a ``.env`` shared with the daemon may name files only its account can
            read. Those secrets stay unset.

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
    return _build(cls, merged, toml_data, sources, client=client)


_META_VARS = {"EXAI_CONFIG", "EXAI_ENV_FILE"}
_PROVIDER_ENV = re.compile(r"^EXAI_PROVIDER_([A-Z0-9]+)_(.+)$")


def env_name(field: attrs.Attribute[Any]) -> str:
    return field.metadata.get("env") or "EXAI_" + field.name.upper()


def env_names(cls: type[Any]) -> list[str]:
    """Every ``EXAI_*`` variable name the settings class ``cls`` understands (``*_FILE``
    variants of its secrets included)."""
    names = set(_META_VARS)
    for f in attrs.fields(cls):
        if f.metadata.get("env") == "-":
            continue
        n = env_name(f)
        names.add(n)
        if _is_secret(f):
            names.add(n + "_FILE")
    return sorted(names)


def _is_secret(f: attrs.Attribute[Any]) -> bool:
    return "Secret" in str(f.type)


#: the largest settings, secret or tokens file read (a tokens file of 200,000 entries is 9 MB)
MAX_FILE_BYTES = 64 * 1024 * 1024


class _NotAFile(OSError):
    """A path that names something other than a regular file, or one too large."""


def _read_file(path: Path | str) -> bytes:
    """The bytes of the regular file ``path``, read whole, at most :data:`MAX_FILE_BYTES`.

    A FIFO, a device (``/dev/zero``), a socket or a directory is refused without being read:
    reading one blocked the reading thread for good — a reload's, which then held every
    later reload — or never ended (found by an attack on a live daemon's SIGHUP).

    Raises:
        OSError: it cannot be opened or read; :class:`_NotAFile` (an ``OSError``) for what is
            not a regular file or is larger than :data:`MAX_FILE_BYTES`.
    """
    # (O_NONBLOCK: opening a FIFO without a writer would block; a regular file ignores it)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotAFile(0, "not a regular file (a FIFO, a device, a directory?)")
        if st.st_size > MAX_FILE_BYTES:
            raise _NotAFile(0, f"larger than {MAX_FILE_BYTES} bytes")
        parts = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:  # (it grew while read)
                raise _NotAFile(0, f"larger than {MAX_FILE_BYTES} bytes")
        return b"".join(parts)
    finally:
        os.close(fd)


def _read_env_file(path: Path) -> dict[str, str]:
    import io

    from dotenv import dotenv_values

    if not path.is_file():
        return {}  # (as python-dotenv reads a path that is not a file: nothing)
    try:
        text = _read_file(path).decode("utf-8")
        values = dotenv_values(stream=io.StringIO(text))
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"env file {path} is not UTF-8 (byte {exc.start})") from None
    return {k: v for k, v in values.items() if v is not None}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_read_file(path).decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 (byte {exc.start})") from None


def _read_secret_file(var: str, path: str, sources: list[tuple[str, str]]) -> str:
    """The content of the secret file ``path`` named by ``var``, recorded in ``sources``.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, or is empty (an empty tokens file
            would turn authentication off, an empty key would fail every call).
    """
    sources.append((var, os.path.abspath(path)))
    try:
        value = _read_file(path).decode("utf-8").strip()
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
            value = float(raw)
            if value != value:  # NaN: every bound it is checked against says false
                raise ValueError(raw)
            return value
        if "tuple" in t:
            return str_tuple(raw)
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
    cls: type[T],
    env: Mapping[str, str],
    toml_data: dict[str, Any],
    sources: list[tuple[str, str]] | None = None,
    *,
    client: bool = False,
) -> T:
    fields = {f.name: f for f in attrs.fields(cls)}
    values: dict[str, Any] = {}
    sources = [] if sources is None else sources

    secret_fields = {name for name, f in fields.items() if _is_secret(f)}
    # a client command leaves the daemon's secrets unset, and does not read their files
    unread = {n for n in secret_fields if not fields[n].metadata.get("client")} if client else set()
    toml_providers = toml_data.get("providers", {})
    toml_keys = set(toml_data)
    toml_data = {k: v for k, v in toml_data.items() if k.removesuffix("_file") not in unread}
    toml_data = _toml_secret_files(toml_data, secret_fields, "", sources)
    for key, toml_value in toml_data.items():
        if key == "providers":
            continue
        if key not in fields or fields[key].metadata.get("env") == "-":
            raise ConfigError(
                f"unknown setting {key!r} in the config file{_suggest(key, list(fields))}"
            )
        values[key] = _convert(key, fields[key].type, toml_value)

    known = env_names(cls)
    for var in env:
        if not var.startswith("EXAI_") or var in known or _PROVIDER_ENV.match(var):
            continue
        raise ConfigError(f"unknown setting {var}{_suggest(var, known)}")

    for name, f in fields.items():
        if f.metadata.get("env") == "-":
            continue
        var = env_name(f)
        if name in unread:
            continue
        raw: str | None = _secret_from(env, var, sources) if _is_secret(f) else env.get(var)
        if raw:  # an empty value (as in a copied .env.example) means "the default"
            values[name] = _convert(var, f.type, raw)
    if values.get("tokens"):
        _check_token_entries(_origin(env, toml_keys, "tokens"), values["tokens"].reveal())

    values["providers"] = _build_providers(env, toml_providers, sources, client=client)
    values["source_files"] = tuple(sources)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings: {exc}") from None


def _provider_values(
    prefix: str, env: Mapping[str, str], sources: list[tuple[str, str]], client: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fld in PROVIDER_FIELDS:
        var = f"{prefix}_{fld.upper()}"
        if client and fld == "api_key":
            continue  # (the daemon's: a client command does not read it)
        raw = _secret_from(env, var, sources) if fld == "api_key" else env.get(var)
        if raw:
            out[fld] = raw
    return out


def _build_providers(
    env: Mapping[str, str],
    toml_providers: dict[str, Any],
    sources: list[tuple[str, str]],
    *,
    client: bool = False,
) -> tuple[ProviderSettings, ...]:
    pfields = {f.name: f for f in attrs.fields(ProviderSettings)}
    specs: dict[str, dict[str, Any]] = {}
    for name, base in BUILTIN_PROVIDERS.items():
        specs[name] = dict(base)
    for name, table in toml_providers.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[providers.{name}] must be a table")
        if client:  # the API key is the daemon's: a client command does not read its file
            table = {k: v for k, v in table.items() if k not in ("api_key", "api_key_file")}
        table = _toml_secret_files(table, {"api_key"}, f"[providers.{name}] ", sources)
        for key in table:
            if key not in pfields or key == "name":
                hint = _suggest(key, list(PROVIDER_FIELDS))
                raise ConfigError(f"unknown key {key!r} in [providers.{name}]{hint}")
        specs.setdefault(name, {}).update(table)
    for name in ("kimi", "glm"):
        specs[name].update(_provider_values(name.upper(), env, sources, client))
    extra_names = {m.group(1) for v in env if (m := _PROVIDER_ENV.match(v))}
    for upper in sorted(extra_names):
        vals = _provider_values(f"EXAI_PROVIDER_{upper}", env, sources, client)
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
