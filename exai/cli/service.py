"""``exai service install|status|uninstall``: run the daemon as a per-user service.

Linux: a systemd user unit, ``$XDG_CONFIG_HOME/systemd/user/exai.service`` (default
``~/.config``). macOS: a launchd agent, ``~/Library/LaunchAgents/dev.exai.daemon.plist``. Both
run this ``exai serve`` (its absolute path) in the directory ``install`` ran in.

The settings are referenced, never copied: the unit points the daemon at the ``.env`` file and
the TOML file these settings were read from (``EXAI_ENV_FILE``, ``EXAI_CONFIG``, absolute), so
the daemon reads them itself — with its own parser, its ``*_FILE`` secrets, and again on
``SIGHUP`` (``systemctl --user reload exai``). A systemd ``EnvironmentFile=`` would instead put
the values in the process environment, where they override the file and a reload cannot change
them. Settings exported in the shell that runs ``install`` are written into the unit when they
are not secrets (``*_FILE`` paths are), and named with a warning when they are: move those into
the ``.env`` file or a ``*_FILE``.

``install`` writes the file and, where ``systemctl --user`` (or ``launchctl``) works, enables and
starts the service; otherwise, or with ``--no-start``, it prints the commands to run.
``--dry-run`` prints the file and writes nothing. ``status`` and ``uninstall`` call
``systemctl --user`` / ``launchctl`` where available, else say what to run.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exai.config import Settings
from exai.config.dirs import make_dirs
from exai.errors import ConfigError

__all__ = [
    "LAUNCHD_LABEL",
    "SYSTEMD_UNIT",
    "launchd_plist",
    "run",
    "service_environment",
    "systemd_unit",
    "unit_path",
]

SYSTEMD_UNIT = "exai.service"
LAUNCHD_LABEL = "dev.exai.daemon"
_PREFIXES = ("EXAI_", "KIMI_", "GLM_")
#: variables that only matter to the process that runs ``install`` (or are set by the unit)
_NOT_CARRIED = {"EXAI_ENV_FILE", "EXAI_CONFIG", "EXAI_URL", "EXAI_TOKEN", "EXAI_TOKEN_FILE"}


def _say(line: str) -> None:
    print(line, flush=True)


def _err(line: str) -> None:
    print(f"exai service: {line}", file=sys.stderr, flush=True)


def exai_argv() -> list[str]:
    """The absolute command that runs this exai's ``serve``."""
    from exai.cli.hints import exai_executable
    from exai.client.autostart import exai_words

    exe = exai_executable()
    return [exe, "serve"] if exe is not None else [*exai_words(), "serve"]


def service_environment(
    settings: Settings, environ: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """What the service's environment says: ``(variables, secrets left out)``.

    The variables: ``EXAI_ENV_FILE`` and ``EXAI_CONFIG`` (absolute paths of the files these
    settings came from), and each exai setting exported in ``environ`` that holds no secret
    (``*_FILE`` paths made absolute). The secrets left out: the names of exported settings that
    hold one.
    """
    from exai.config.hygiene import child_env, is_secret_name

    out: dict[str, str] = {}
    for var, path in settings.source_files:
        if var in ("EXAI_ENV_FILE", "EXAI_CONFIG"):
            out[var] = os.path.abspath(path)
    safe = child_env(environ, settings=settings)
    left_out = []
    for name in sorted(environ):
        if not name.startswith(_PREFIXES) or name in _NOT_CARRIED:
            continue
        value = environ[name]
        if name.endswith("_FILE") and value:
            out[name] = os.path.abspath(value)  # a path, not the secret
        elif name in safe and not is_secret_name(name):
            out[name] = value
        elif value:
            left_out.append(name)
    return out, left_out


def _systemd_quote(value: str) -> str:
    """A value for ``Environment=``/``ExecStart=`` as systemd reads it: double-quoted, with
    ``\\``, ``"`` escaped and ``%`` (a specifier) doubled."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def systemd_unit(
    argv: Sequence[str], workdir: str, env: Mapping[str, str], stop_timeout_s: float
) -> str:
    """The text of ``exai.service`` (a systemd user unit)."""
    lines = [
        "# written by `exai service install`; remove with `exai service uninstall`",
        "[Unit]",
        "Description=exai: AI tools over MCP for every editor (exai serve)",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in argv),
        # SIGHUP reloads the secrets and re-reads the settings files
        "ExecReload=/bin/kill -HUP $MAINPID",
        # a path as it is (quotes would be taken literally); a % is a specifier
        "WorkingDirectory=" + workdir.replace("%", "%%"),
    ]
    lines += [f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in sorted(env.items())]
    if "EXAI_LOG_FORMAT" not in env:
        lines.append('Environment="EXAI_LOG_FORMAT=json"')  # the journal: one record a line
    lines += [
        "Restart=on-failure",
        "RestartSec=2",
        # SIGTERM drains in-flight calls for EXAI_DRAIN_TIMEOUT_S before exiting 0
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={int(stop_timeout_s)}",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def launchd_plist(
    argv: Sequence[str], workdir: str, env: Mapping[str, str], log_path: str
) -> bytes:
    """The launchd agent (``dev.exai.daemon.plist``): runs ``argv`` at login, restarts it when it
    exits with an error, its stderr in ``log_path``."""
    data: dict[str, Any] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": list(argv),
        "WorkingDirectory": workdir,
        "EnvironmentVariables": {"EXAI_LOG_FORMAT": "json", **env},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ProcessType": "Background",
        "StandardErrorPath": log_path,
        "StandardOutPath": log_path,
    }
    return plistlib.dumps(data, sort_keys=True)


def default_kind() -> str | None:
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux"):
        return "systemd"
    return None


def unit_path(kind: str, environ: Mapping[str, str]) -> Path:
    """Where the unit lives: the systemd user unit directory (``XDG_CONFIG_HOME``) or
    ``~/Library/LaunchAgents``."""
    home = Path(environ.get("HOME") or Path.home())
    if kind == "systemd":
        config = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
        return Path(config) / "systemd" / "user" / SYSTEMD_UNIT
    return home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"


def _run(argv: Sequence[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


def _manager_commands(kind: str, action: str, path: Path) -> list[list[str]]:
    if kind == "systemd":
        return {
            "start": [
                ["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", SYSTEMD_UNIT],
            ],
            "status": [["systemctl", "--user", "status", "--no-pager", SYSTEMD_UNIT]],
            "stop": [
                ["systemctl", "--user", "disable", "--now", SYSTEMD_UNIT],
                ["systemctl", "--user", "daemon-reload"],
            ],
        }[action]
    domain = f"gui/{os.getuid()}"
    return {
        "start": [["launchctl", "bootstrap", domain, str(path)]],
        "status": [["launchctl", "print", f"{domain}/{LAUNCHD_LABEL}"]],
        "stop": [["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"]],
    }[action]


def _manage(kind: str, action: str, path: Path, *, run: bool) -> int:
    """Run the service manager's commands for ``action``, or print them when it is missing,
    ``run`` is false, or it fails (then the status is 1)."""
    commands = _manager_commands(kind, action, path)
    manager = commands[0][0]
    if not run or shutil.which(manager) is None:
        why = "" if not run else f" ({manager} is not on PATH here)"
        _say(f"to {action} the service{why}, run:")
        for cmd in commands:
            _say("  " + shlex.join(cmd))
        return 0 if not run else 1
    for cmd in commands:
        code, output = _run(cmd)
        if output:
            _say(output)
        if code != 0 and action != "status":
            _err(f"`{shlex.join(cmd)}` failed (exit {code}); run it yourself once it can work")
            return 1
        if code != 0:
            return code
    return 0


def run(
    action: str,
    *,
    kind: str | None = None,
    dry_run: bool = False,
    start: bool = True,
    environ: Mapping[str, str] | None = None,
) -> int:
    """``exai service ACTION``: the exit status (2 on a configuration error or an unsupported
    platform, 1 when the service manager failed)."""
    environ = os.environ if environ is None else environ
    kind = kind or default_kind()
    if kind is None:
        _err(f"no service manager support on {sys.platform}: run `exai serve` under your own")
        return 2
    path = unit_path(kind, environ)
    if action == "status":
        if not path.exists():
            _say(f"not installed: {path} does not exist (`exai service install` writes it)")
            return 3
        _say(f"installed: {path}")
        return _manage(kind, "status", path, run=True)
    if action == "uninstall":
        if not path.exists():
            _say(f"not installed: {path} does not exist")
            return 0
        code = _manage(kind, "stop", path, run=True)
        path.unlink()
        _say(f"removed {path}")
        return code
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return 2
    env, left_out = service_environment(settings, environ)
    argv, workdir = exai_argv(), os.getcwd()
    if kind == "systemd":
        text = systemd_unit(argv, workdir, env, settings.drain_timeout_s + 15)
        content = text.encode()
    else:
        log = str(Path(environ.get("HOME") or Path.home()) / "Library" / "Logs" / "exai.log")
        content = launchd_plist(argv, workdir, env, log)
    for name in left_out:
        _err(
            f"warning: {name} is a secret set in this shell's environment; it is not written "
            f"into the unit, so the service will not see it: put it in the .env file "
            f"({env.get('EXAI_ENV_FILE', 'none yet')}) or in a file named by {name}_FILE"
        )
    if "EXAI_ENV_FILE" not in env:
        _err(
            "note: no .env file here: the service runs on the defaults and what the unit sets; "
            "run `exai service install` again where your .env is, or set EXAI_ENV_FILE"
        )
    if dry_run:
        _say(f"# {path} (dry run: nothing written)")
        sys.stdout.write(content.decode())
        sys.stdout.flush()
        return 0
    make_dirs(path.parent, 0o755)  # (the service manager reads it; never 0777)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.chmod(0o644)
    tmp.replace(path)
    _say(f"wrote {path}")
    return _manage(kind, "start", path, run=start)
