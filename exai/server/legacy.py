"""The old daemon's op protocol, served as a third door so an old editor shim keeps working.

The daemon exai replaces spoke its own JSON protocol on ``ws://host:8079`` (path ``/``, no
subprotocol, the token inside the first message) to a stdio shim in each editor
(``scripts/runtime/run_ws_shim.py`` and ``src/daemon/ws_server.py`` of the old daemon's
repository, Zazzles2908/EX-AI-MCP-Server; field shapes below are those two files'). A WebSocket
upgrade on ``/`` is routed here (``EXAI_LEGACY_PROTOCOL``, on by default); ``/mcp`` stays MCP.

::

    → {"op": "hello", "token": "…", "session_id": "…"}        within EXAI_HANDSHAKE_TIMEOUT_S
    ← {"op": "hello_ack", "ok": true, "session_id": "…"}
      (refused: {"op": "hello_ack", "ok": false, "error": …} and close 4000 invalid hello,
      4001 missing hello, 4003 unauthorized; no hello in time: close 4002)
    → {"op": "list_tools", "request_id"?}
    ← {"op": "list_tools_res", "tools": [{"name", "description", "inputSchema"}], "request_id"?}
    → {"op": "call_tool", "request_id": "…", "name": "…", "arguments": {…}}
    ← {"op": "call_tool_ack", "request_id", "accepted": true, "timeout": <s>, "name"}
    ← {"op": "progress", "request_id", "name", "note"?}                       (heartbeats too)
    ← {"op": "call_tool_res", "request_id", "outputs": [{"type": "text", "text"}], "text"}
      or {"op": "call_tool_res", "request_id", "error": {"code", "message", …}}
    anything else → {"op": "error", "message": "invalid_json" | "invalid_message: …" |
      "Unknown op: …"}

The op messages are translated into JSON-RPC requests for the
:class:`~exai.server.core.SessionCore` (so a call gets the admission, slots, deadline, progress,
cancellation and audit of every door) and its answers back into ops. Error codes are the old
ones: ``TOOL_NOT_FOUND``, ``OVER_CAPACITY`` (with ``retry_after``), ``TIMEOUT``,
``INVALID_ARGUMENTS``, ``EXEC_ERROR``; exai's own ``reason`` is added beside them. Tool names
carrying the old client-side suffix (``chat_EXAI-WS``) are accepted, as the old daemon did.
Nothing is added to the protocol: no cancel op, no re-send de-duplication (the old shim re-sent
with a new id; each ``call_tool`` runs once and is answered once, a ``request_id`` sent twice
included), no ``rotate_token`` or ``health``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from exai.config import Settings
from exai.logs import log_event
from exai.server import protocol as p
from exai.server.auth import TokenTable
from exai.server.core import SessionCore, SessionShared
from exai.server.outbox import ProgressStream
from exai.server.pieces import Text, encode_reply_pieces
from exai.server.session import Session
from exai.server.sessions import SessionTable

__all__ = ["LegacyDoor", "Translator"]

_SUFFIXES = ("_EXAI-WS", "-EXAI-WS", "_EXAI_WS", "-EXAI_WS")
_ids = itertools.count(1)


def _op(**fields: Any) -> dict[str, Any]:
    return fields


def _legacy_code(reason: str) -> str:
    if reason in ("overloaded", "rate_limited", "rate_limiter_unavailable", "circuit_open"):
        return "OVER_CAPACITY"
    if reason == "timeout":
        return "TIMEOUT"
    if reason in ("invalid_params", "file_denied", "continuation_not_found"):
        return "INVALID_ARGUMENTS"
    return "EXEC_ERROR"


class Translator:
    """One legacy session's op ↔ JSON-RPC translation.

    :meth:`decode` turns an op message into the JSON-RPC message the core handles (registering
    what its answer must become); :meth:`encode` turns what the core sends back into an op
    message's text.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # JSON of the internal request id → ("list" | "call", the client's request_id, tool)
        self._pending: dict[str, tuple[str, Any, str]] = {}
        #: the call the last :meth:`decode` made (for the ack)
        self.last_call: tuple[Any, str, float] | None = None

    def decode(self, text: str) -> p.Request | p.Notification | p.Response | p.DecodeError:
        s = self.settings
        self.last_call = None
        loaded = p.decode_value(text, max_depth=s.max_json_depth, max_elements=s.max_json_elements)
        if isinstance(loaded, p.DecodeError):
            return p.DecodeError(None, p.PARSE_ERROR, "invalid_json", {"reason": "parse_error"})
        value, cost = loaded
        if not isinstance(value, dict):
            return _invalid("message must be a JSON object")
        op = value.get("op")
        if not isinstance(op, str):
            return _invalid("missing or invalid 'op' field (must be string)")
        if op == "list_tools":
            rid = f"l{next(_ids)}"
            self._pending[json.dumps(rid)] = ("list", value.get("request_id"), "")
            return p.Request(rid, "tools/list", {}, cost_bytes=cost)
        if op != "call_tool":
            return p.DecodeError(
                None, p.METHOD_NOT_FOUND, f"Unknown op: {op[:80]}", {"reason": "method_not_found"}
            )
        name, req_id, arguments = value.get("name"), value.get("request_id"), value.get("arguments")
        if not isinstance(name, str) or not name:
            return _invalid("call_tool requires 'name' (non-empty string)")
        if req_id is not None and not isinstance(req_id, str):
            return _invalid("request_id must be a string")
        if arguments is not None and not isinstance(arguments, dict):
            return _invalid("arguments must be a JSON object")
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        # an id of its own per op message, whatever request_id says: two calls never share
        # one — a request_id re-sent while its call runs, or two long ones cut to one prefix,
        # made the core refuse the second as a reused id, and that refusal took the first's
        # entry here, so the first call's answer went out as a bare ``error`` op it never matched
        rid = f"c{next(_ids)}"
        self._pending[json.dumps(rid)] = ("call", req_id, name)
        timeout = self.settings.call_timeout_s
        self.last_call = (req_id, name, timeout)
        params = {"name": name, "arguments": arguments or {}, "_meta": {"progressToken": rid}}
        return p.Request(rid, "tools/call", params, cost_bytes=cost)

    def encode(self, msg: dict[str, Any]) -> str | None:
        out = self._translate(msg)
        if out is None:
            return None
        op, reply = out
        return p.encode_reply(op) if reply else p.encode(op)

    async def encode_large(self, msg: dict[str, Any]) -> Text | None:
        """:meth:`encode` for a large answer: in pieces (:mod:`exai.server.pieces`)."""
        out = self._translate(msg)
        if out is None:
            return None
        op, reply = out
        return await encode_reply_pieces(op) if reply else p.encode(op)

    def _translate(self, msg: dict[str, Any]) -> tuple[dict[str, Any], bool] | None:
        """The op message for ``msg`` (``None``: nothing to send), and whether it is encoded
        as a reply (:func:`~exai.server.protocol.encode_reply`: never raises)."""
        if "op" in msg:
            return msg, False  # already an op message (hello_ack, the call's ack)
        if "method" in msg:
            if msg.get("method") != "notifications/progress":
                return None
            params = msg.get("params") or {}
            entry = self._pending.get(json.dumps(params.get("progressToken")))
            if entry is None:
                return None  # (a late heartbeat of a call already answered)
            op = _op(op="progress", request_id=entry[1], name=entry[2])
            if isinstance(params.get("message"), str):
                op["note"] = params["message"]
            return op, True
        entry = self._pending.pop(json.dumps(msg.get("id")), None)
        err = msg.get("error")
        if entry is None:
            message = err.get("message") if isinstance(err, dict) else None
            return _op(op="error", message=message or "error"), False
        kind, req_id, _ = entry
        if kind == "list":
            if err is not None:
                return _op(op="error", message=err.get("message", "error")), False
            out = _op(op="list_tools_res", tools=msg["result"]["tools"])
            if req_id is not None:
                out["request_id"] = req_id
            return out, True
        if err is not None:
            data = err.get("data") or {}
            reason = data.get("reason", "internal_error")
            code = "TOOL_NOT_FOUND" if data.get("field") == "name" else _legacy_code(reason)
            error = {"code": code, "message": err.get("message", ""), "reason": reason}
            if data.get("retry_after_s") is not None:
                error["retry_after"] = data["retry_after_s"]
            return _op(op="call_tool_res", request_id=req_id, error=error), True
        result = msg.get("result") or {}
        outputs = [
            {"type": "text", "text": c.get("text", "")}
            for c in result.get("content", [])
            if isinstance(c, dict) and c.get("type") == "text"
        ]
        text = "\n\n".join(o["text"] for o in outputs if o["text"])
        res = _op(op="call_tool_res", request_id=req_id, outputs=outputs, text=text)
        if result.get("isError"):
            res["error"] = {"code": "EXEC_ERROR", "message": text, "reason": "tool_error"}
        return res, True


def _invalid(why: str) -> p.DecodeError:
    return p.DecodeError(
        None, p.INVALID_REQUEST, f"invalid_message: {why}", {"reason": "invalid_request"}
    )


class LegacyDoor:
    """Serves an upgraded WebSocket on ``/`` in the old op protocol.

    Args:
        shared: what every session core shares.
        settings: ``() -> Settings`` in force.
        tokens: ``() -> TokenTable`` in force (the hello's ``token`` is checked against it).
        sessions: the daemon's session table.
    """

    def __init__(
        self,
        shared: SessionShared,
        *,
        settings: Callable[[], Settings],
        tokens: Callable[[], TokenTable],
        sessions: SessionTable,
    ) -> None:
        self.shared = shared
        self.settings = settings
        self.tokens = tokens
        self.sessions = sessions

    async def serve(self, conn: WebSocketConnection, ip: str, stream: ProgressStream) -> None:
        """Run one legacy session: the hello, then ops until the peer goes."""
        settings = self.settings()
        hello: Any = None
        with trio.move_on_after(settings.handshake_timeout_s):
            try:
                hello = await conn.get_message()
            except ConnectionClosed:
                return
        if hello is None:
            await self._refuse(conn, None, 4002, "hello timeout or disconnect")
            return
        loaded = p.decode_value(
            hello, max_depth=settings.max_json_depth, max_elements=settings.max_json_elements
        )
        if isinstance(loaded, p.DecodeError) or not isinstance(loaded[0], dict):
            await self._refuse(conn, "invalid_hello", 4000, "invalid hello")
            return
        value = loaded[0]
        if value.get("op") != "hello":
            await self._refuse(conn, "missing_hello", 4001, "missing hello")
            return
        token = value.get("token")
        if isinstance(token, str) and token:
            identity = self.tokens().authenticate(f"Bearer {token}")
        else:
            identity = self.tokens().authenticate(None)
        if identity is None:
            self.shared.stats.refuse_connection("unauthorized")
            await self._refuse(conn, "unauthorized", 4003, "unauthorized")
            return
        translator = Translator(settings)

        def make_core(close: Callable[..., Any]) -> SessionCore:
            return SessionCore(
                self.shared,
                settings,
                ip,
                identity,
                close=close,
                encode=translator.encode,
                encode_large=translator.encode_large,
            )

        session = Session(self.shared, settings, conn, ip, identity, stream, core=make_core)
        core = session.core

        async def handle(text: str) -> None:
            handled = await core.handle_text(text, decoder=translator.decode)
            call = translator.last_call
            if handled == "call" and call is not None:
                req_id, name, timeout = call
                await core.send(
                    _op(
                        op="call_tool_ack",
                        request_id=req_id,
                        accepted=True,
                        timeout=timeout,
                        name=name,
                    )
                )

        with trio.move_on_after(settings.handshake_timeout_s):
            try:
                await conn.send_message(p.encode(_op(op="hello_ack", ok=True, session_id=core.id)))
            except ConnectionClosed:
                return
        log_event("legacy.session_started", client=identity.name, ip=ip)
        async with self.sessions.open(session):
            await session.run(handle)

    async def _refuse(
        self, conn: WebSocketConnection, error: str | None, code: int, reason: str
    ) -> None:
        log_event("legacy.refused", logging.INFO, code=code, reason=reason)
        with trio.move_on_after(1.0):
            try:
                if error is not None:
                    await conn.send_message(p.encode(_op(op="hello_ack", ok=False, error=error)))
                await conn.aclose(code, reason)
            except ConnectionClosed:
                pass
