"""The ``exai`` command line.

::

    exai serve [--plugin MODULE:FUNC …]   run the daemon (SIGINT/SIGTERM drain and exit 0)
    exai bridge                           stdio MCP server for an MCP client, piped to the daemon
    exai call TOOL key=value …            call one tool and print its answer
    exai status                           the daemon's status (through the status tool)
    exai config                           the effective settings, secrets redacted
    exai token new NAME                   a fresh client token and its tokens-file line
    exai mock-upstream [--port N]         the OpenAI-compatible mock upstream, for trying exai
    exai migrate                          apply database migrations of the configured store
    exai doctor [--strict] [--offline]    check configuration, secret hygiene and connectivity
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import importlib.util
import json
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import Any

from exai.config import Settings
from exai.errors import ConfigError, ExaiError

__all__ = ["main"]


def _err(msg: str) -> None:
    print(f"exai: {msg}", file=sys.stderr, flush=True)


def _settings() -> Settings:
    return Settings.from_env()


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
    configured = [p.name for p in settings.providers if p.configured]
    if configured:
        return [f"exai: providers configured: {', '.join(configured)}"]
    return [
        "exai: no provider is configured yet, so tools that need a model will say so.",
        "exai: add one with KIMI_API_KEY=… or GLM_API_KEY=… (or EXAI_PROVIDER_<NAME>_BASE_URL=… "
        "for any OpenAI-compatible endpoint), e.g. in .env; try it without keys against the mock: "
        "`exai mock-upstream --port 9000` and EXAI_PROVIDER_MOCK_BASE_URL=http://127.0.0.1:9000/v1",
    ]


def warn_exposed_secret_files(settings: Settings) -> None:
    """Log a warning for each secret file other accounts can read (what ``exai doctor`` flags
    as an error): the daemon still starts, but the operator hears about it at once."""
    import logging
    import os
    from pathlib import Path

    from exai.cli.doctor import secret_file_problem, secret_files
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


async def _serve_async(settings: Settings, registry: Any) -> None:
    import trio

    from exai.server.app import serve
    from exai.server.services import open_services

    async with open_services(settings) as services, trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(
                settings, registry, services, reload=Settings.from_env, task_status=task_status
            )
            nursery.cancel_scope.cancel()

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            daemon = await nursery.start(run)
            # Everything loaded at start-up lives as long as the daemon: move it out of the
            # collector's reach, so full collections (which block the loop) walk only what
            # sessions allocate.
            gc.freeze()
            if not daemon.tokens.enabled:
                _err("no client tokens configured: serving loopback clients only, no auth")
            for line in provider_lines(settings):
                print(line, file=sys.stderr, flush=True)
            async for sig in signals:
                if sig == signal.SIGHUP:
                    if daemon.reloader is not None:
                        nursery.start_soon(daemon.reloader.reload, "SIGHUP")
                    continue
                if daemon.draining:
                    _err("second signal: stopping now")
                    nursery.cancel_scope.cancel()
                    break
                _err("shutting down: draining in-flight calls")
                daemon.request_shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from exai.errors import unwrap_exception
    from exai.logs import configure_logging
    from exai.server.auth import TokenTable, check_bind, parse_tokens
    from exai.tools import default_registry

    try:
        settings = _settings()
        check_bind(settings, TokenTable(parse_tokens(settings.tokens)))
        configure_logging(settings.log_level, settings.log_format)
        warn_exposed_secret_files(settings)
        registry = default_registry()
        load_plugins(registry, settings, args.plugin or [])
        try:
            trio.run(_serve_async, settings, registry)
        except BaseExceptionGroup as group:
            raise unwrap_exception(group) from None
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return 2
    except OSError as exc:
        _err(f"cannot start: {exc.strerror or exc}")
        return 1
    except ExaiError as exc:  # e.g. the conversation store cannot be reached at start
        _err(f"cannot start: {exc}")
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    try:
        settings = _settings()
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return 2
    print(json.dumps(settings.display(), indent=2, sort_keys=True))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (shown once; give it to the client as EXAI_TOKEN): {token}")
    print("line for EXAI_TOKENS_FILE (stores only the hash):")
    print(f"{args.name}:sha256:{digest}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from exai.client.client import call_main

    return call_main(["status", *args.rest])


def cmd_call(args: argparse.Namespace) -> int:
    from exai.client.client import call_main

    return call_main(args.rest)


def cmd_bridge(args: argparse.Namespace) -> int:
    from exai.client.bridge import main as bridge_main

    return bridge_main(args.rest)


def cmd_mock(args: argparse.Namespace) -> int:
    from exai.testing.mock_upstream import main as mock_main

    return mock_main(args.rest)


def cmd_doctor(args: argparse.Namespace) -> int:
    from exai.cli.doctor import main as doctor_main

    return doctor_main(args.rest)


def cmd_migrate(args: argparse.Namespace) -> int:
    from exai.storage import migrate_main

    return migrate_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exai", description=__doc__.split("\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--plugin", action="append", metavar="MODULE:FUNC", help="register extra tools")
    s.set_defaults(fn=cmd_serve)
    sub.add_parser("config", help="print the effective settings").set_defaults(fn=cmd_config)
    t = sub.add_parser("token", help="client tokens")
    tsub = t.add_subparsers(dest="token_cmd", required=True)
    tn = tsub.add_parser("new", help="make a fresh token")
    tn.add_argument("name")
    tn.set_defaults(fn=cmd_token)
    for name, fn, helptext in (
        ("bridge", cmd_bridge, "stdio MCP bridge to the daemon"),
        ("call", cmd_call, "call one tool: exai call TOOL key=value …"),
        ("status", cmd_status, "the daemon's status"),
        ("mock-upstream", cmd_mock, "run the OpenAI-compatible mock upstream"),
        ("migrate", cmd_migrate, "apply database migrations"),
        ("doctor", cmd_doctor, "check configuration, secrets hygiene and connectivity"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
    return parser


#: subcommands whose arguments belong to another module's own parser
PASSTHROUGH = {
    "bridge": cmd_bridge,
    "call": cmd_call,
    "status": cmd_status,
    "mock-upstream": cmd_mock,
    "migrate": cmd_migrate,
    "doctor": cmd_doctor,
}


def main(argv: Sequence[str] | None = None) -> int:
    if importlib.util.find_spec("trio_websocket") is None:
        _err("the daemon, bridge and client need their extras: pip install 'exai[daemon]'")
        return 2
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in PASSTHROUGH:
        # argparse's REMAINDER drops a leading --option; hand the rest over untouched
        return PASSTHROUGH[args_list[0]](argparse.Namespace(rest=args_list[1:]))
    args = build_parser().parse_args(args_list)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
