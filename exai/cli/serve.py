"""``exai serve``: the daemon as a process.

Loads the settings, refuses an unsafe bind, configures logging, warns about secret files other
accounts can read, registers the built-in tools and the ``--plugin`` ones, opens the shared
services and runs :func:`exai.server.app.serve` until a signal: SIGINT/SIGTERM drain and exit 0
(a second one stops at once), SIGHUP reloads secrets.
"""

from __future__ import annotations

import errno
import importlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from exai.config import Settings
from exai.errors import ConfigError, ExaiError

__all__ = ["load_plugins", "provider_lines", "run", "warn_exposed_secret_files"]


def _err(msg: str, event: str = "daemon.notice", **fields: Any) -> None:
    from exai.logs import say

    say(f"exai: {msg}", event, logging.WARNING, **fields)


def _say(line: str, event: str = "daemon.notice") -> None:
    # plain on a terminal, a JSON record otherwise: the stream's one format (exai.logs.say)
    from exai.logs import say

    say(line, event)


def load_plugins(registry: Any, settings: Settings, specs: Sequence[str]) -> None:
    """Call each ``module:function(registry, settings)`` so it can register tools."""
    for spec in specs:
        module_name, _, func_name = spec.partition(":")
        if not module_name or not func_name:
            raise ConfigError(f"--plugin {spec!r}: expected MODULE:FUNCTION")
        try:
            fn = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"--plugin {spec!r}: {exc}") from exc
        fn(registry, settings)


def provider_lines(settings: Settings) -> list[str]:
    from exai.cli.hints import exai_command

    configured = [p.name for p in settings.providers if p.configured]
    if configured:
        return [f"exai: providers configured: {', '.join(configured)}"]
    exai = exai_command()
    return [
        "exai: no provider is configured yet, so tools that need a model will say so.",
        "exai: add one with KIMI_API_KEY=… or GLM_API_KEY=… (or EXAI_PROVIDER_<NAME>_BASE_URL=… "
        "for any OpenAI-compatible endpoint), e.g. in .env; or try it without keys against the "
        f"mock upstream: run `{exai} mock-upstream --port 9000` in another terminal, then "
        f"restart this one as `EXAI_PROVIDER_MOCK_BASE_URL=http://127.0.0.1:9000/v1 {exai} serve`",
    ]


def warn_exposed_secret_files(settings: Settings) -> None:
    """Log a warning for each secret file other accounts can read (what ``exai doctor`` flags
    as an error): the daemon still starts, but the operator hears about it at once."""
    import logging
    import os
    from pathlib import Path

    from exai.cli.doctor.local import secret_file_problem, secret_files
    from exai.logs import log_event

    env_file = next((Path(p) for v, p in settings.source_files if v == "EXAI_ENV_FILE"), None)
    for var, path in secret_files(settings, os.environ, env_file):
        problem = secret_file_problem(var, path)
        if problem is not None:
            message, fix = problem
            log_event(
                "config.secret_file_exposed",
                logging.WARNING,
                variable=var,
                problem=message,
                fix=fix,
            )


def _reload_settings() -> Settings:
    """The settings a reload reads (in a worker thread), with the start's warning for each
    secret file other accounts can read: a tokens file made readable by all, or replaced by
    one that is, and picked up by SIGHUP or the watcher, was taken in silence."""
    settings = Settings.from_env()
    warn_exposed_secret_files(settings)
    return settings


async def _serve_async(settings: Settings, registry: Any) -> None:
    import trio

    from exai.server import gcpolicy
    from exai.server.app import serve
    from exai.server.services import open_services

    async with open_services(settings) as services, trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(
                settings, registry, services, reload=_reload_settings, task_status=task_status
            )
            nursery.cancel_scope.cancel()

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            daemon = await nursery.start(run)
            # Everything loaded at start-up lives as long as the daemon: move it out of the
            # collector's reach; full collections (which block the loop) only when no call
            # is running (exai.server.gcpolicy).
            gcpolicy.apply()
            nursery.start_soon(
                gcpolicy.collect_when_idle,
                lambda: (len(daemon.calls.running), daemon.stats.calls.total()),
                name="exai.gc",
            )
            if not daemon.tokens.enabled:
                _err(
                    "no client tokens configured: serving loopback clients only, no auth",
                    "config.no_tokens",
                )
            for line in provider_lines(settings):
                _say(line, "config.providers")
            async for sig in signals:
                if sig == signal.SIGHUP:
                    if daemon.reloader is not None:
                        nursery.start_soon(daemon.reloader.reload, "SIGHUP")
                    continue
                if daemon.draining:
                    _err("second signal: stopping now", "daemon.stopping_now")
                    nursery.cancel_scope.cancel()
                    break
                _err("shutting down: draining in-flight calls", "daemon.shutting_down")
                daemon.request_shutdown()


def run(plugins: Sequence[str] = ()) -> int:
    """``exai serve``: run the daemon until SIGINT/SIGTERM (drain, exit 0); exit 2 on a
    configuration error, 1 when it cannot start."""
    import trio

    from exai.errors import unwrap_exception
    from exai.logs import configure_logging
    from exai.server.app import BindError
    from exai.server.auth import TokenTable, check_bind, parse_tokens
    from exai.tools import default_registry

    try:
        settings = Settings.from_env()
        check_bind(settings, TokenTable(parse_tokens(settings.tokens)))
        configure_logging(settings.log_level, settings.log_format)
        warn_exposed_secret_files(settings)
        registry = default_registry()
        load_plugins(registry, settings, plugins)
        try:
            trio.run(_serve_async, settings, registry)
        except BaseExceptionGroup as group:
            raise unwrap_exception(group) from None
    except ConfigError as exc:
        _err(f"configuration error: {exc}", "config.error")
        return 2
    except BindError as exc:
        if exc.errno != errno.EADDRINUSE:
            _err(f"cannot start: {exc.what} port {exc.host}:{exc.port}: {exc.strerror}")
            return 1
        from exai.cli.hints import port_in_use
        from exai.logs import say

        say(
            port_in_use(exc, settings),
            "daemon.port_in_use",
            logging.ERROR,
            host=exc.host,
            port=exc.port,
            variable=exc.variable,
        )
        return 1
    except OSError as exc:
        _err(f"cannot start: {exc.strerror or exc}", "daemon.cannot_start")
        return 1
    except ExaiError as exc:  # e.g. the conversation store cannot be reached at start
        _err(f"cannot start: {exc}", "daemon.cannot_start")
        return 1
    return 0
