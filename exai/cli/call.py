"""``exai call TOOL key=value …`` and ``exai status``: one tool call through :class:`exai.Client`.

Values are parsed as JSON when they parse (``n=3``, ``flag=true``, ``xs=[1,2]``) and taken as
strings otherwise; ``--json '{…}'`` passes a whole object (pairs override its keys). The text
content goes to stdout, progress to stderr (:class:`ProgressLine`: a spinner line on a
terminal, one plain line per progress notification otherwise, nothing with ``--quiet``).
Exit status: 0 on success, 1 when the call failed (the error message on stderr), 2 on a usage
error.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from exai.client import Client
from exai.client.autostart import start_hint
from exai.client.ws import Unreachable
from exai.config import Settings
from exai.errors import ExaiError

__all__ = ["ProgressLine", "call_tool", "parse_pairs", "run", "text_of"]


def parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``["n=3", "name=alice"]`` → ``{"n": 3, "name": "alice"}`` (JSON when it parses).

    Raises:
        ValueError: a pair without ``=`` or without a key.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def text_of(result: dict[str, Any]) -> str:
    """What a person reads of an MCP result: its text blocks, else its structured content."""
    texts = [
        c.get("text", "")
        for c in result.get("content") or []
        if isinstance(c, dict) and c.get("type") == "text"
    ]
    if texts:
        return "\n".join(texts)
    if result.get("structuredContent") is not None:
        return json.dumps(result["structuredContent"], indent=2, ensure_ascii=False)
    return json.dumps(result, indent=2, ensure_ascii=False)


class ProgressLine:
    """Shows the progress notifications of a call on ``stream`` (stderr).

    On a terminal: one line rewritten in place — a spinner, the seconds waited and the last
    progress message — from the first notification or half a second of waiting on, erased when
    the answer comes. Elsewhere (a pipe, a file): one plain line per notification
    (``exai call: progress 3/10 message``), nothing while waiting. ``quiet``: nothing at all.
    """

    FRAMES = "|/-\\"
    #: a call answered sooner shows no spinner
    DELAY_S = 0.5
    #: how often the spinner turns
    TICK_S = 0.1

    def __init__(self, stream: TextIO, *, prog: str = "exai call", quiet: bool = False) -> None:
        self.stream = stream
        self.prog = prog
        self.quiet = quiet
        self.tty = not quiet and _isatty(stream)
        self.text = ""
        self.shown = False
        self.started = 0.0

    async def on_progress(self, p: float | None, total: float | None, msg: str | None) -> None:
        if self.quiet:
            return
        # the bare counter says nothing next to a message ("16 chars"); a fraction does
        where = f"{p:g}/{total:g}" if p is not None and total else ""
        if not msg and p is not None and not total:
            where = f"{p:g}"
        text = f"{where} {msg or ''}".strip()
        if self.tty:
            self.text = text
            self._draw()
        else:
            self.stream.write(f"{self.prog}: progress {text}".rstrip() + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        waited = anyio.current_time() - self.started
        frame = self.FRAMES[int(waited / self.TICK_S) % len(self.FRAMES)]
        width = shutil.get_terminal_size((80, 24)).columns
        line = f"{frame} {waited:4.1f}s {self.text}"[: max(10, width - 1)]
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self.shown = True

    async def spin(self) -> None:
        """Turn the spinner until cancelled (a terminal only)."""
        self.started = anyio.current_time()
        if not self.tty:
            return
        await anyio.sleep(self.DELAY_S)
        while True:
            self._draw()
            await anyio.sleep(self.TICK_S)

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def call_tool(
    tool: str,
    arguments: dict[str, Any],
    *,
    url: str | None = None,
    prog: str = "exai call",
    quiet: bool = False,
) -> dict[str, Any] | int:
    """Call ``tool`` on the daemon, showing its progress (:class:`ProgressLine`): the MCP result,
    or the exit status after printing why the call failed (``prog: …`` on stderr).

    The whole call is bounded by ``handshake_timeout_s + call_timeout_s`` (+5 s).
    """
    shown = ProgressLine(sys.stderr, prog=prog, quiet=quiet)

    async def call() -> dict[str, Any]:
        settings = Settings.from_env(client=True)
        bound = settings.handshake_timeout_s + settings.call_timeout_s + 5.0
        name = prog.replace(" ", "-")
        outcome: dict[str, Any] | Exception = ExaiError("the call did not run")
        # the spinner turns beside the call; the call's own error is carried out of the task
        # group as it is (not wrapped in an exception group)
        async with anyio.create_task_group() as tg:
            tg.start_soon(shown.spin)
            try:
                with anyio.fail_after(bound):
                    async with Client(url, settings=settings, client_name=name) as client:
                        outcome = await client.call_tool(
                            tool, arguments, on_progress=shown.on_progress
                        )
            except Exception as exc:
                outcome = exc
            finally:
                tg.cancel_scope.cancel()
                shown.clear()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    try:
        return anyio.run(call, backend="trio")
    except ExaiError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        if isinstance(exc, Unreachable) and (hint := start_hint(exc.url)) is not None:
            # (what the bridge says in the same case: a first `exai status` before any
            # `exai serve` only said "All connection attempts failed")
            print(f"{prog}: is the daemon running? start it with: {hint}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"{prog}: no answer from the daemon in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run(
    tool: str,
    pairs: Sequence[str] = (),
    *,
    json_args: str | None = None,
    url: str | None = None,
    quiet: bool = False,
) -> int:
    """Call ``tool`` on the daemon and print its text (see the module docstring)."""
    try:
        arguments: dict[str, Any] = {}
        if json_args:
            loaded = json.loads(json_args)
            if not isinstance(loaded, dict):
                raise ValueError("--json must be a JSON object")
            arguments.update(loaded)
        arguments.update(parse_pairs(pairs))
    except ValueError as exc:
        print(f"exai call: {exc}", file=sys.stderr)
        return 2
    result = call_tool(tool, arguments, url=url, quiet=quiet)
    if isinstance(result, int):
        return result
    text = text_of(result)
    if result.get("isError"):
        print(text, file=sys.stderr)
        return 1
    print(text)
    return 0
