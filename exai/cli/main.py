"""The ``exai`` command line: one argparse parser tree for every subcommand.

::

    exai serve [--plugin MODULE:FUNC …]   run the daemon (SIGINT/SIGTERM drain and exit 0)
    exai bridge [--url URL]               stdio MCP server for an MCP client, piped to the daemon
    exai call TOOL key=value … [--json J] call one tool and print its answer
    exai status [--json|--human]          the daemon's status: a summary on a terminal, else JSON
    exai config                           the effective settings, secrets redacted
    exai token new NAME                   a fresh client token and its tokens-file line
    exai mock-upstream [--port N …]       the OpenAI-compatible mock upstream, for trying exai
    exai migrate                          apply database migrations of the configured store
    exai doctor [--strict] [--offline]    check configuration, secret hygiene and connectivity
    exai service install|status|uninstall run the daemon as a systemd/launchd user service
    exai completion bash                  a bash completion script for all of the above
    exai --version                        the version

Each command's work lives in its own module (:mod:`~exai.cli.serve`, :mod:`~exai.cli.call`,
:mod:`~exai.cli.doctor`, :mod:`exai.client.stdio`, …), imported only when that command runs, so
``exai bridge`` starts without loading the daemon.

Ctrl-C: every command interrupted by it (SIGINT) exits 130 without a traceback — :func:`main`
turns the ``KeyboardInterrupt``, however it comes out of the command (alone, in an exception
group of trio's, or as the cause of another error), into that status. So that this holds from
the start, this module imports nothing else at its top: whatever a command needs is imported
inside :func:`main`'s guard. ``exai serve`` and ``exai bridge`` take SIGINT as their signal to
stop once they run (drain and exit 0); before that, it is an interruption too.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    from exai.config import Settings

    Command = Callable[[argparse.Namespace], int]

__all__ = ["INTERRUPTED", "build_parser", "main"]

#: the exit status of a command interrupted by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130
#: the exit status of a command whose reader went away (``exai call listmodels | head``):
#: 128 + SIGPIPE, what a shell reports for a command the signal ended
OUTPUT_CLOSED = 141


def _err(msg: str) -> None:
    print(f"exai: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# the commands (each imports what it needs when it runs)


def _serve(args: argparse.Namespace) -> int:
    from exai.cli import serve

    return serve.run(args.plugin or ())


def _bridge(args: argparse.Namespace) -> int:
    from exai.client import stdio

    return stdio.run(url=args.url)


def _call(args: argparse.Namespace) -> int:
    from exai.cli import call

    return call.run(args.tool, args.pairs, json_args=args.json_args, url=args.url, quiet=args.quiet)


def _status(args: argparse.Namespace) -> int:
    from exai.cli import status

    return status.run(url=args.url, mode=args.mode)


def _config(args: argparse.Namespace) -> int:
    import json

    from exai.config import Settings, redact_url
    from exai.errors import ConfigError

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        _err(f"configuration error: {exc}")
        return 2
    print(json.dumps(settings.display(), indent=2, sort_keys=True))
    if args.offline:
        return 0
    waiting, unasked = _not_applied_in_daemon(settings)
    # (on stderr: stdout stays the JSON document scripts parse)
    if waiting:
        _err(
            f"the daemon at {redact_url(settings.effective_url)} still runs with the values it "
            f"started with for {', '.join(waiting)}: changed in the files since, they take "
            "effect at its restart (the values above are the files')"
        )
    elif unasked:
        _err(
            f"could not ask the daemon at {redact_url(settings.effective_url)} whether it still "
            f"runs with other values of the settings applied only at restart: {unasked}"
        )
    return 0


#: how long `exai config` waits for the daemon's status (it prints the settings regardless)
CONFIG_STATUS_WAIT_S = 3.0


def _not_applied_in_daemon(settings: Settings) -> tuple[list[str], str | None]:
    """The restart-only settings the running daemon reports as changed in the files since it
    started (its ``status``: ``daemon.config.not_applied_until_restart``), and why it could not
    be asked: ``None`` when it answered, when nothing listens (no daemon runs) or without the
    daemon extras; else the reason (it refused the token, did not answer in
    :data:`CONFIG_STATUS_WAIT_S`, …), so a silence is never taken for "nothing to apply"."""
    import importlib.util

    from exai.config import redact_url

    if importlib.util.find_spec("trio_websocket") is None:
        return [], None
    import anyio

    from exai.client import Client
    from exai.client.ws import Unreachable

    async def ask() -> list[str]:
        with anyio.fail_after(CONFIG_STATUS_WAIT_S):
            async with Client(settings=settings, client_name="exai-config") as client:
                result = await client.call_tool("status")
        doc = result.get("structuredContent") or {}
        names = ((doc.get("daemon") or {}).get("config") or {}).get("not_applied_until_restart")
        return [str(n) for n in names] if isinstance(names, list) else []

    try:
        return anyio.run(ask, backend="trio"), None
    except Unreachable:  # no daemon runs: nothing to say
        return [], None
    except TimeoutError:
        return [], f"it did not answer in {CONFIG_STATUS_WAIT_S:g}s"
    except Exception as exc:  # a refusal, another program, an error: say so, the URL redacted
        url = settings.effective_url
        return [], (str(exc) or type(exc).__name__).replace(url, redact_url(url))


def _token_new(args: argparse.Namespace) -> int:
    import hashlib
    import secrets

    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (shown once; give it to the client as EXAI_TOKEN): {token}")
    print("line for EXAI_TOKENS_FILE (stores only the hash):")
    print(f"{args.name}:sha256:{digest}")
    return 0


def _mock_upstream(args: argparse.Namespace) -> int:
    from exai.testing import mock_upstream

    return mock_upstream.run(args)


def _migrate(args: argparse.Namespace) -> int:
    import json

    import trio

    from exai.config import Settings
    from exai.errors import ConfigError, ExaiError
    from exai.storage.migrate import migrate_storage

    try:
        settings = Settings.from_env()
        done = trio.run(migrate_storage, settings)
    except (ConfigError, ExaiError) as exc:
        _err(f"migrate failed: {exc}")
        return 1
    print(json.dumps(done, indent=2, default=str))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from exai.cli import doctor

    return doctor.run(strict=args.strict, offline=args.offline)


def _service(args: argparse.Namespace) -> int:
    from exai.cli import service

    return service.run(
        args.service_command,
        kind=args.kind,
        dry_run=getattr(args, "dry_run", False),
        start=not getattr(args, "no_start", False),
    )


def _completion(args: argparse.Namespace) -> int:
    from exai.cli.completion import bash_script

    print(bash_script(build_parser()), end="")
    return 0


# ---------------------------------------------------------------------------------------
# the parser tree


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand, its options and its help."""
    import argparse

    from exai import __version__
    from exai.testing.mock_args import add_arguments as add_mock_upstream_arguments

    parser = argparse.ArgumentParser(
        prog="exai",
        description="exai: one daemon serving AI tools over MCP to many clients.",
    )
    parser.add_argument("--version", action="version", version=f"exai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn, parser=p)
        return p

    p = command("serve", _serve, "run the daemon")
    p.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE:FUNC",
        help="call FUNC(registry, settings) at start to register more tools",
    )
    p = command("bridge", _bridge, "stdio MCP server that forwards to the daemon")
    p.add_argument("--url", help="daemon URL (default EXAI_URL, else from EXAI_HOST/EXAI_PORT)")
    p = command("call", _call, "call one tool on the daemon and print its result")
    p.add_argument("tool", help="tool name, e.g. version or chat")
    p.add_argument(
        "pairs", nargs="*", default=[], metavar="key=value", help="tool arguments (JSON values)"
    )
    p.add_argument("--json", dest="json_args", help="the arguments as one JSON object")
    p.add_argument("--url", help="daemon URL (default EXAI_URL, else from EXAI_HOST/EXAI_PORT)")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print progress")
    p = command("status", _status, "the daemon's status")
    p.add_argument("--url", help="daemon URL (default EXAI_URL, else from EXAI_HOST/EXAI_PORT)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--json",
        dest="mode",
        action="store_const",
        const="json",
        default="auto",
        help="the whole status document (the default when stdout is not a terminal)",
    )
    shape.add_argument(
        "--human",
        dest="mode",
        action="store_const",
        const="human",
        help="the short summary (the default on a terminal)",
    )
    p = command("config", _config, "print the effective settings, secrets redacted")
    p.description = (
        "Print the effective settings, secrets redacted: the values of the environment and the "
        "files now. A running daemon takes the changed tokens, secrets and providers on reload "
        "(SIGHUP, or a watched file changed) and every other setting only at its restart; when "
        "it answers, a note on stderr names the settings it still runs with their old values; "
        "when it runs but cannot be asked (it refuses the token, does not answer in 3 s), a "
        "note says so."
    )
    p.add_argument("--offline", action="store_true", help="do not ask the running daemon (no note)")
    p = command("token", _token_new, "client tokens")
    token_sub = p.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    new = token_sub.add_parser("new", help="make a fresh token and its hashed line")
    new.add_argument("name", help="the client's name (shown in logs and the audit log)")
    new.set_defaults(fn=_token_new, parser=new)
    p = command("mock-upstream", _mock_upstream, "run the OpenAI-compatible mock upstream")
    add_mock_upstream_arguments(p)
    command("migrate", _migrate, "apply database migrations of EXAI_STORAGE_URL")
    p = command("doctor", _doctor, "check configuration, secrets hygiene and connectivity")
    p.add_argument("--strict", action="store_true", help="warnings also fail (exit 1)")
    p.add_argument("--offline", action="store_true", help="skip the network checks")
    p = command("service", _service, "run the daemon as a per-user service (systemd, launchd)")
    service_sub = p.add_subparsers(dest="service_command", required=True, metavar="COMMAND")
    for name, help in (
        ("install", "write the user unit (or launchd agent) and start it"),
        ("status", "whether it is installed, and the service manager's status"),
        ("uninstall", "stop it and remove the unit"),
    ):
        sp = service_sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=_service, parser=sp)
        sp.add_argument(
            "--kind",
            choices=["systemd", "launchd"],
            help="the service manager (default: systemd on Linux, launchd on macOS)",
        )
        if name == "install":
            sp.add_argument("--dry-run", action="store_true", help="print the unit, write nothing")
            sp.add_argument(
                "--no-start", action="store_true", help="write the unit, print how to start it"
            )
    p = command("completion", _completion, "print a shell completion script")
    p.add_argument("shell", choices=["bash"], help="the shell")
    return parser


#: commands that run without the ``daemon`` extras (trio, trio-websocket, …)
_WITHOUT_EXTRAS = frozenset({"config", "token", "completion"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``exai`` with ``argv`` (default ``sys.argv[1:]``); the exit status.

    ``--help`` and ``--version`` print and return 0; a usage error prints the usage and
    returns 2; Ctrl-C returns :data:`INTERRUPTED` (130), printing nothing.
    """
    try:
        return _main(argv)
    except BaseException as exc:
        if interrupted(exc):
            return INTERRUPTED
        if _comes_from(exc, BrokenPipeError) and _stdout_gone():
            # the reader of our output went away: stop quietly, as a command SIGPIPE ends
            # does (no traceback, and none from the interpreter's last flush of stdout); a
            # broken pipe elsewhere (a socket to the daemon) is an error and says so
            _discard_stdout()
            return OUTPUT_CLOSED
        raise


def _stdout_gone() -> bool:
    """Whether nobody reads our stdout any more (its pipe's read end is closed)."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _discard_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is, or comes from, a ``KeyboardInterrupt``: itself, in an exception
    group (trio's nurseries wrap what their tasks raise), or as the cause or context of an
    error raised while it unwound."""
    return _comes_from(exc, KeyboardInterrupt)


def _comes_from(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` is, or comes from, a ``kind``, as :func:`interrupted` reads it."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


def _main(argv: Sequence[str] | None) -> int:
    import importlib.util

    try:
        args, extra = build_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
        if extra:
            # reported by the subcommand's own parser, so the usage shown is the one that helps
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    # checked after parsing, so --version, --help and the commands that need no extras work
    # in a bare `pip install exai`
    if args.command not in _WITHOUT_EXTRAS and importlib.util.find_spec("trio_websocket") is None:
        _err(
            f"`exai {args.command}` needs the daemon extras: pip install 'exai[daemon]' "
            "(or `make serve` in a clone)"
        )
        return 2
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
