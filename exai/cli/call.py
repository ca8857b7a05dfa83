"""``exai call TOOL key=value …`` and ``exai status``: one tool call through :class:`exai.Client`.

Values are parsed as JSON when they parse (``n=3``, ``flag=true``, ``xs=[1,2]``) and taken as
strings otherwise; ``--json '{…}'`` passes a whole object (pairs override its keys). The text
content goes to stdout, progress to stderr. Exit status: 0 on success, 1 when the call failed
(the error message on stderr), 2 on a usage error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from exai.client import Client
from exai.config import Settings
from exai.errors import ExaiError

__all__ = ["parse_pairs", "run", "text_of"]


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


def run(
    tool: str,
    pairs: Sequence[str] = (),
    *,
    json_args: str | None = None,
    url: str | None = None,
    quiet: bool = False,
) -> int:
    """Call ``tool`` on the daemon and print its text (see the module docstring).

    The whole call is bounded by ``handshake_timeout_s + call_timeout_s`` (+5 s).
    """
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

    async def progress(p: float | None, total: float | None, message: str | None) -> None:
        if quiet:
            return
        where = "" if p is None else (f"{p:g}/{total:g}" if total else f"{p:g}")
        print(f"exai call: progress {where} {message or ''}".rstrip(), file=sys.stderr)

    async def call() -> dict[str, Any]:
        settings = Settings.from_env()
        bound = settings.handshake_timeout_s + settings.call_timeout_s + 5.0
        with anyio.fail_after(bound):
            async with Client(url, settings=settings, client_name="exai-call") as client:
                return await client.call_tool(tool, arguments, on_progress=progress)

    try:
        result = anyio.run(call, backend="trio")
    except ExaiError as exc:
        print(f"exai call: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("exai call: no answer from the daemon in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    text = text_of(result)
    if result.get("isError"):
        print(text, file=sys.stderr)
        return 1
    print(text)
    return 0
