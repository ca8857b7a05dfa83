"""The tool contract and the pluggable registry.

A tool is a :class:`ToolSpec`: a name, a description, a JSON Schema for its arguments and an
async handler ``handler(args, ctx) -> ToolResult``. The session validates ``args`` against the
schema before the handler runs (a failure is JSON-RPC -32602 naming the field), runs the handler
inside the call's deadline (a cancel scope) and turns what it returns or raises into the MCP
result or a JSON-RPC error. Handlers raise :mod:`exai.errors` classes for expected failures.

Tests register their own tools (slow, failing, counting) on a :class:`ToolRegistry` they pass to
the server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attrs
import msgspec

from exai.config import Settings
from exai.tools.schema import check_schema, compiled

__all__ = ["DaemonView", "ProgressFn", "ToolContext", "ToolRegistry", "ToolResult", "ToolSpec"]


class DaemonView(Protocol):
    """What a tool may know of the daemon that runs it: ``ctx.services["daemon"]``.

    The daemon hands this narrow view to its tools (the ``status`` and ``version`` tools read
    it); tools never import the server.
    """

    @property
    def protocol_versions(self) -> tuple[str, ...]:
        """The MCP protocol versions the daemon speaks."""
        ...

    def status(self) -> dict[str, Any]:
        """The daemon's status (connections, in-flight calls, limits, …); never a secret."""
        ...


class ProgressFn(Protocol):
    async def __call__(
        self, progress: float | None = None, total: float | None = None, message: str | None = None
    ) -> None: ...


async def _no_progress(
    progress: float | None = None, total: float | None = None, message: str | None = None
) -> None:
    return None


@attrs.define(kw_only=True)
class ToolContext:
    """What a running tool may use.

    Attributes:
        settings: the daemon's settings at the time the call started.
        services: shared daemon services (``providers``, ``conversations``, ``files``,
            ``daemon`` — a :class:`DaemonView`); a mapping so tests can run tools with only
            what they need.
        progress: report progress; a no-op when the client asked for none. Never blocks on a
            slow client for long (the session bounds its send queue).
        request_id: the JSON-RPC id of the call.
        session_id: the connection the call came on.
        client: the client identity name ("anonymous" when the daemon has no tokens).
    """

    settings: Settings
    services: dict[str, Any] = attrs.field(factory=dict)
    progress: ProgressFn = _no_progress
    request_id: Any = None
    #: the call's exactly-once key (the client's idempotency key, or session + request id):
    #: tools use it to make their own writes idempotent
    call_key: str = ""
    session_id: str = ""
    client: str = "anonymous"
    #: the client's address (for the audit log)
    peer: str = ""
    # filled by tools that call a provider, for the audit log and the result's metadata
    annotations: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ToolResult:
    """A tool's answer: text content and, optionally, structured content."""

    text: str
    structured: dict[str, Any] | None = None
    is_error: bool = False

    def to_mcp(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "content": [{"type": "text", "text": self.text}],
            "isError": self.is_error,
        }
        if self.structured is not None:
            out["structuredContent"] = self.structured
        return out

    @classmethod
    def json(cls, data: dict[str, Any]) -> ToolResult:
        """A result whose text is ``data`` as indented JSON, also given as structured content.

        Encoded by msgspec (C; the standard library indents in Python, 20 µs for ``version``'s
        few fields against 1 µs), keys sorted, non-ASCII as is; what msgspec refuses (a lone
        surrogate, an integer over 64 bits) by the standard library, as before.
        """
        try:
            text = msgspec.json.format(
                msgspec.json.encode(data, order="sorted", enc_hook=str), indent=2
            ).decode()
        except (TypeError, ValueError, OverflowError, UnicodeError):
            text = json.dumps(data, indent=2, sort_keys=True, default=str)
        return cls(text=text, structured=data)


Handler = Callable[[dict[str, Any], ToolContext], Awaitable[ToolResult]]


@attrs.frozen(kw_only=True)
class ToolSpec:
    """One tool.

    Attributes:
        timeout_s: the tool's deadline; ``None`` uses ``EXAI_CALL_TIMEOUT_S``.
    """

    name: str
    description: str
    input_schema: dict[str, Any]
    handler: Handler
    timeout_s: float | None = None
    title: str | None = None

    def to_mcp(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
        }
        if self.title:
            out["title"] = self.title
        return out


class ToolRegistry:
    """Tools by name. Registration order is the order of ``tools/list``."""

    def __init__(self, tools: Iterable[ToolSpec] = ()) -> None:
        self._tools: dict[str, ToolSpec] = {}
        for t in tools:
            self.register(t)

    def register(self, spec: ToolSpec) -> None:
        """Add a tool; its schema is checked (and its validator built) now, not at its first
        call, so a schema exai could not honour as written fails at start-up.

        Raises:
            ValueError: the name is taken.
            SchemaError: the schema is not valid JSON Schema, names a keyword that is not JSON
                Schema, or a ``$ref`` that is not local (:func:`exai.tools.schema.check_schema`).
        """
        if spec.name in self._tools:
            raise ValueError(f"tool {spec.name!r} is already registered")
        check_schema(spec.input_schema)
        compiled(spec.input_schema)
        self._tools[spec.name] = spec

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def to_mcp(self) -> list[dict[str, Any]]:
        return [t.to_mcp() for t in self._tools.values()]

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools
