"""Test tools, loaded into a daemon with ``exai serve --plugin tests.daemon_tools:register``.

They let tests observe executions from outside the daemon process:
- ``sleep``: sleeps ``seconds``; reports progress each second; returns "slept".
- ``count``: appends a line to ``path`` when it starts (count executions across processes),
  optionally writes a line to ``path + ".cancelled"`` when it is cancelled, sleeps ``seconds``,
  returns the number of executions so far.
- ``fail``: raises the exai error named by ``reason`` (or a plain crash).
- ``blob``: after ``seconds``, answers ``bytes`` characters of text, carried twice as a
  provider tool's answer is (in the text and in ``structuredContent.content``).
- ``unencodable``: answers something JSON has no form for (``what``: ``nan`` in the structured
  content, or a lone ``surrogate`` in the text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import trio

from exai import errors
from exai.tools.base import ToolContext, ToolRegistry, ToolResult, ToolSpec


def _append(path: str, line: str) -> None:
    with Path(path).open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")


async def _sleep(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    seconds = float(args.get("seconds", 1.0))
    step = min(1.0, seconds) if seconds > 0 else 0
    slept = 0.0
    while slept < seconds:
        await trio.sleep(step)
        slept += step
        await ctx.progress(progress=slept, total=seconds, message=f"slept {slept:g}s")
    return ToolResult(text="slept")


async def _count(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    path = str(args["path"])
    await anyio.to_thread.run_sync(_append, path, "started")
    try:
        await trio.sleep(float(args.get("seconds", 0.0)))
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_append, path + ".cancelled", "cancelled")
        raise
    text = await anyio.Path(path).read_text()
    return ToolResult(text=str(len(text.splitlines())))


async def _fail(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    reason = args.get("reason", "crash")
    if reason == "overloaded":
        raise errors.OverloadedError("test overload", retry_after_s=1.0)
    if reason == "tool_error":
        raise errors.ToolError("the test tool failed on purpose")
    raise RuntimeError("secret-free crash for tests")


async def _blob(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    await trio.sleep(float(args.get("seconds", 0.0)))
    body = ("exai " * (int(args["bytes"]) // 5 + 1))[: int(args["bytes"])]
    return ToolResult(text=body + "\n\n---\nmodel: blob", structured={"content": body})


async def _unencodable(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    if args.get("what") == "surrogate":
        return ToolResult(text="half a pair: \ud800")
    return ToolResult(text="a ratio", structured={"ratio": float("nan")})


SLEEP = ToolSpec(
    name="sleep",
    description="Test tool: sleep for `seconds`.",
    input_schema={
        "type": "object",
        "properties": {"seconds": {"type": "number", "minimum": 0}},
        "additionalProperties": False,
    },
    handler=_sleep,
)
COUNT = ToolSpec(
    name="count",
    description="Test tool: record an execution in `path`, sleep `seconds`.",
    input_schema={
        "type": "object",
        "properties": {"path": {"type": "string"}, "seconds": {"type": "number", "minimum": 0}},
        "required": ["path"],
        "additionalProperties": False,
    },
    handler=_count,
)
FAIL = ToolSpec(
    name="fail",
    description="Test tool: fail with `reason`.",
    input_schema={
        "type": "object",
        "properties": {"reason": {"type": "string"}},
        "additionalProperties": False,
    },
    handler=_fail,
)


BLOB = ToolSpec(
    name="blob",
    description="Test tool: answer `bytes` characters (text and structured) after `seconds`.",
    input_schema={
        "type": "object",
        "properties": {
            "bytes": {"type": "integer", "minimum": 0},
            "seconds": {"type": "number", "minimum": 0},
        },
        "required": ["bytes"],
        "additionalProperties": False,
    },
    handler=_blob,
)
UNENCODABLE = ToolSpec(
    name="unencodable",
    description="Test tool: answer what JSON cannot hold (`what`: nan or surrogate).",
    input_schema={
        "type": "object",
        "properties": {"what": {"type": "string"}},
        "additionalProperties": False,
    },
    handler=_unencodable,
)


def register(registry: ToolRegistry, settings: object = None) -> None:
    for spec in (SLEEP, COUNT, FAIL, BLOB, UNENCODABLE):
        if spec.name not in registry:
            registry.register(spec)
