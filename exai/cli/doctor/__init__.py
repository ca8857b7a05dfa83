"""``exai doctor``: check the configuration, secrets hygiene and connectivity, and say how to fix
each problem.

The checks: local ones, which need no network (:mod:`~exai.cli.doctor.local`: git, secret
files, tokens, bind, SQLite), and network ones, each bounded and all run concurrently through
the daemon's own clients (:mod:`~exai.cli.doctor.network`: PostgreSQL, Redis, providers, a
running daemon). Their findings are shown by :mod:`~exai.cli.doctor.report`.

Every text the report prints passes through a scrubber that removes the values of every secret
the settings hold, so no key, token or password is ever shown, even inside an upstream error.
Exit status (:func:`run`): 1 when any check is an error (or a warning with ``strict``), 2 when
the settings themselves cannot be loaded, else 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import anyio

from exai.cli.doctor.local import (
    MIN_TOKEN_LENGTH,
    check_bind,
    check_client_url,
    check_git,
    check_secret_files,
    check_sqlite,
    check_tokens,
    local_findings,
    secret_file_problem,
    secret_files,
)
from exai.cli.doctor.network import (
    CONNECT_S,
    MAX_SKEW_S,
    PROVIDER_S,
    STORE_S,
    check_daemon,
    check_providers,
    check_redis,
    check_storage,
    network_findings,
)
from exai.cli.doctor.report import Finding, error, exit_status, render, scrub
from exai.config import Settings
from exai.config.hygiene import secret_values
from exai.errors import ConfigError

__all__ = [
    "CONNECT_S",
    "MAX_SKEW_S",
    "MIN_TOKEN_LENGTH",
    "PROVIDER_S",
    "STORE_S",
    "Finding",
    "check_bind",
    "check_client_url",
    "check_daemon",
    "check_git",
    "check_providers",
    "check_redis",
    "check_secret_files",
    "check_sqlite",
    "check_storage",
    "check_tokens",
    "exit_status",
    "local_findings",
    "network_findings",
    "render",
    "run",
    "run_doctor",
    "secret_file_problem",
    "secret_files",
]


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


def _env_file(env: Mapping[str, str], cwd: Path) -> Path | None:
    named = env.get("EXAI_ENV_FILE")
    if named is not None:
        return (cwd / named) if named else None
    default = cwd / ".env"
    return default if default.is_file() else None


def run(
    *,
    strict: bool = False,
    offline: bool = False,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    out: TextIO | None = None,
) -> int:
    """``exai doctor [--strict] [--offline]``: print the report; the exit status.

    Args:
        strict: warnings also fail (exit 1).
        offline: skip the network checks.
        environ: the environment (default the process's own).
        cwd: the directory whose git repository is checked (default the current one).
        out: where the report goes (default stdout).
    """
    env = dict(os.environ if environ is None else environ)
    where = cwd or Path.cwd()
    stream = out or sys.stdout
    env_file = _env_file(env, where)
    try:
        settings = Settings.from_env(env, env_file=str(env_file) if env_file else "")
    except ConfigError as exc:
        findings = [
            error(
                "config",
                f"the settings do not load: {exc}",
                "correct the variable named above (`exai config` shows the settings)",
            ),
            *check_git(where, environ=env),
        ]
        print(render(findings), file=stream, flush=True)
        return 2
    findings = run_doctor(
        settings, cwd=where, check_network=not offline, environ=env, env_file=env_file
    )
    print(render(findings), file=stream, flush=True)
    return exit_status(findings, strict=strict)
