"""``exai.Client``: a small MCP client for the exai daemon, usable under trio and asyncio.

::

    async with exai.Client() as client:              # EXAI_URL / EXAI_TOKEN by default
        tools = await client.list_tools()
        result = await client.call_tool("version", {})
        print(result["content"][0]["text"])

One WebSocket connection (see :mod:`exai.client.ws`) carries any number of concurrent requests: a
reader task routes each response to the call waiting on its id, and progress notifications to the
call that asked for them. A JSON-RPC error becomes an :mod:`exai.errors` exception
(:func:`error_from_jsonrpc`). The client does not reconnect; the bridge does.

``exai call TOOL key=value …`` (:mod:`exai.cli.call`) is the command-line face of it.

Resource handling:
    The reader lives in a task group owned by the ``async with`` block; leaving the block cancels
    it and closes the connection. Progress for one call is buffered in a bounded stream (see
    :data:`PROGRESS_BUFFER`); when a slow ``on_progress`` lets it fill, further progress for that
    call is skipped (progress is advisory and the next one supersedes it) rather than stalling
    the responses of every other call.

Error handling:
    No single message ends the client. A call whose arguments JSON cannot carry (``NaN``, an
    infinity) or whose request would be larger than ``settings.max_frame_bytes`` raises
    :class:`~exai.errors.InvalidParams` before anything is sent (sent, it would be answered with
    an error no call could be matched to, or close the connection under every other call); a
    lone surrogate is sent as a ``\\u`` escape. A received message that is not JSON (or nests
    too deep to decode) or has the wrong shape is logged and skipped.
    When the connection breaks, every waiting call raises
    :class:`~exai.client.ws.ConnectionClosed` and so does every later call. A call whose caller
    cancels it (a cancel scope) sends ``notifications/cancelled`` for it before unwinding.
"""

from __future__ import annotations

import itertools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import exai
from exai import errors
from exai.client.ws import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketError,
    connect_websocket,
    make_ssl_context,
)
from exai.config import TOKEN_TEXT_RULE, Secret, Settings, is_token_text, redact_url
from exai.errors import ExaiError
from exai.server.protocol import encode as encode_message

__all__ = ["PROTOCOL_VERSION", "Client", "ProgressCallback", "error_from_jsonrpc"]

log = logging.getLogger("exai.client")

#: The MCP protocol version the client proposes in ``initialize``.
PROTOCOL_VERSION = "2025-11-25"
#: Progress notifications buffered per call before further ones are skipped.
PROGRESS_BUFFER = 64
#: Bound on sending ``notifications/cancelled`` while a cancelled call unwinds.
CANCEL_NOTIFY_S = 1.0
#: Most pages ``list_tools`` follows (a server that loops its cursors cannot hang us).
MAX_LIST_PAGES = 100

ProgressCallback = Callable[[float | None, float | None, str | None], Awaitable[None]]


# ---------------------------------------------------------------------------------------
# JSON-RPC errors → exai.errors

_BY_REASON: dict[str, type[ExaiError]] = {
    "overloaded": errors.OverloadedError,
    "rate_limited": errors.RateLimitedError,
    "timeout": errors.DeadlineExceeded,
    "circuit_open": errors.CircuitOpenError,
    "storage_unavailable": errors.StorageUnavailableError,
    "rejected": errors.RejectedError,
    "invalid_params": errors.InvalidParams,
    "invalid_request": errors.InvalidRequest,
    "method_not_found": errors.MethodNotFound,
    "continuation_not_found": errors.ConversationNotFound,
    "file_denied": errors.FileAccessError,
    "upstream_error": errors.UpstreamError,
    "upstream_auth": errors.UpstreamAuthError,
    "upstream_rate_limited": errors.UpstreamRateLimited,
    "upstream_unavailable": errors.UpstreamRetryableError,
    "upstream_bad_request": errors.UpstreamBadRequest,
    "upstream_malformed": errors.UpstreamMalformedResponse,
    "store_error": errors.StoreError,
    "store_unavailable": errors.StoreUnavailableError,
    "no_provider": errors.NoProviderError,
    "tool_error": errors.ToolError,
}

_BY_CODE: dict[int, type[ExaiError]] = {
    -32700: errors.InvalidRequest,
    -32600: errors.InvalidRequest,
    -32601: errors.MethodNotFound,
    -32602: errors.InvalidParams,
}


def error_from_jsonrpc(error: dict[str, Any]) -> ExaiError:
    """Turn a JSON-RPC ``error`` object into the matching :mod:`exai.errors` exception.

    ``error.data.reason`` picks the class ("overloaded" → :class:`~exai.errors.OverloadedError`,
    "rate_limited" → :class:`~exai.errors.RateLimitedError`, "timeout" →
    :class:`~exai.errors.DeadlineExceeded`, "circuit_open" →
    :class:`~exai.errors.CircuitOpenError`, …); without a known reason the standard codes do
    (-32602 → :class:`~exai.errors.InvalidParams`, -32601, -32600); anything else is a plain
    :class:`~exai.errors.ExaiError` whose ``reason`` and ``code`` are the ones received.
    ``retry_after_s`` and the other ``data`` fields are kept.
    """
    if not isinstance(error, dict):
        error = {"message": str(error)}
    code = error.get("code")
    code = code if isinstance(code, int) else errors.SERVER_ERROR
    message = str(error.get("message") or "unknown error")
    raw_data = error.get("data")
    data: dict[str, Any] = dict(raw_data) if isinstance(raw_data, dict) else {}
    reason = data.pop("reason", None)
    reason = reason if isinstance(reason, str) else None
    retry = data.pop("retry_after_s", None)
    retry_after_s = float(retry) if isinstance(retry, int | float) else None

    cls = _BY_REASON.get(reason or "") or _BY_CODE.get(code)
    exc: ExaiError
    if cls is None:
        exc = ExaiError(message, retry_after_s=retry_after_s, data=data)
        exc.reason = reason or ("internal_error" if code == errors.SERVER_ERROR else str(code))
    elif issubclass(cls, errors.CircuitOpenError):
        exc = cls(str(data.pop("breaker", "")), retry_after_s or 0.0, message)
        exc.extra.update(data)
    elif issubclass(cls, errors.InvalidParams):
        field = data.pop("field", None)
        exc = cls(message, field=field, retry_after_s=retry_after_s, data=data)
    elif issubclass(cls, errors.UpstreamError):
        provider = data.pop("provider", None)
        exc = cls(message, provider=provider, retry_after_s=retry_after_s, data=data)
    else:
        exc = cls(message, retry_after_s=retry_after_s, data=data)
    exc.code = code
    return exc


def _check_token(token: Secret | None) -> None:
    """A token given to the constructor obeys the same rule as ``EXAI_TOKEN``."""
    if token and not is_token_text(token.reveal()):
        raise errors.ConfigError(f"token: {TOKEN_TEXT_RULE}")


def _key(request_id: Any) -> str:
    """Ids 1 and "1" are different requests: key them by their JSON form."""
    return json.dumps(request_id, sort_keys=True)


class _Pending:
    """One request waiting for its response."""

    def __init__(self, request_id: Any, method: str) -> None:
        self.id = request_id
        self.method = method
        self.done = anyio.Event()
        self.response: dict[str, Any] | None = None
        self.failure: ExaiError | None = None
        self.progress_token: str | None = None
        send, recv = anyio.create_memory_object_stream[
            tuple[float | None, float | None, str | None]
        ](PROGRESS_BUFFER)
        self.progress_send: MemoryObjectSendStream[
            tuple[float | None, float | None, str | None]
        ] = send
        self.progress_recv: MemoryObjectReceiveStream[
            tuple[float | None, float | None, str | None]
        ] = recv

    def settle(self, response: dict[str, Any] | None, failure: ExaiError | None) -> None:
        if self.done.is_set():
            return
        self.response, self.failure = response, failure
        self.done.set()
        self.progress_send.close()


class Client:
    """An MCP client connected to one exai daemon (see the module docstring).

    Args:
        url: ``ws://…/mcp`` or ``wss://…/mcp``; default ``settings.effective_url`` (``EXAI_URL``,
            else derived from ``EXAI_HOST``/``EXAI_PORT``).
        token: client token; default ``settings.token`` (``EXAI_TOKEN``).
        settings: where defaults and bounds come from; default :meth:`Settings.from_env`
            with ``client=True`` (the daemon's secret files are not read).
        ssl_context: for ``wss://``; default the system store or ``EXAI_TLS_CA``.
        client_name: the ``clientInfo.name`` sent in ``initialize``.

    Attributes:
        server_info: the ``initialize`` result (server name, version, capabilities) once open.

    Raises:
        ConfigError: (from the constructor) ``token`` is not printable ASCII without spaces.

    Raises (from ``async with``):
        HandshakeRejected: the daemon refused the connection (401 bad token, 503 overloaded).
        WebSocketError: the daemon cannot be reached within ``settings.handshake_timeout_s``.
        ExaiError: the daemon answered ``initialize`` with an error.
    """

    def __init__(
        self,
        url: str | None = None,
        token: Secret | str | None = None,
        *,
        settings: Settings | None = None,
        ssl_context: ssl.SSLContext | None = None,
        client_name: str = "exai-client",
    ) -> None:
        self._settings_arg = settings
        self._url_arg = url
        self._token_arg = Secret(token) if isinstance(token, str) else token
        _check_token(self._token_arg)
        self._ssl_context = ssl_context
        self._client_name = client_name
        self.server_info: dict[str, Any] = {}
        self._conn: WebSocketConnection | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._pending: dict[str, _Pending] = {}
        self._progress: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._broken: ConnectionClosed | None = None
        self._max_frame_bytes = 4 * 1024 * 1024
        self.url = url or ""

    def __repr__(self) -> str:
        state = "broken" if self._broken else ("open" if self._conn else "not open")
        return f"<exai.Client {redact_url(self.url)} {state} in_flight={len(self._pending)}>"

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        settings = self._settings_arg or Settings.from_env(client=True)
        self._max_frame_bytes = settings.max_frame_bytes
        self.url = self._url_arg or settings.effective_url
        token = self._token_arg if self._token_arg is not None else settings.token
        ctx = self._ssl_context
        if ctx is None and self.url.startswith("wss://"):
            # reading CA files blocks: not on the event loop
            ctx = await anyio.to_thread.run_sync(make_ssl_context, settings)
        try:
            with anyio.fail_after(settings.handshake_timeout_s):
                self._conn = await connect_websocket(
                    self.url,
                    token=token,
                    ssl_context=ctx,
                    max_message_bytes=settings.max_frame_bytes,
                )
        except TimeoutError:
            raise WebSocketError(
                f"timed out connecting to the exai daemon at {redact_url(self.url)} "
                f"({settings.handshake_timeout_s:g}s)"
            ) from None
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        try:
            await tg.start(self._reader, self._conn)
            with anyio.fail_after(settings.handshake_timeout_s):
                self.server_info = await self.request(
                    "initialize",
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": self._client_name, "version": exai.__version__},
                    },
                )
            await self.notify("notifications/initialized")
        except BaseException as exc:
            await self._shutdown()
            if isinstance(exc, TimeoutError):
                raise WebSocketError(
                    f"the exai daemon at {redact_url(self.url)} did not answer initialize in "
                    f"{settings.handshake_timeout_s:g}s"
                ) from None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        tg, conn = self._tg, self._conn
        self._tg = None
        try:
            if tg is not None:
                tg.cancel_scope.cancel()
                tg.cancel_scope.shield = True
                await tg.__aexit__(None, None, None)
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()
            gone = ConnectionClosed(1000, "client closed", url=redact_url(self.url))
            self._broken = self._broken or gone
            for pending in list(self._pending.values()):
                pending.settle(
                    None, ConnectionClosed(1000, "client closed", url=redact_url(self.url))
                )
            self._pending.clear()
            self._progress.clear()

    # -- the reader ----------------------------------------------------------------------

    async def _reader(
        self,
        conn: WebSocketConnection,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        try:
            while True:
                text = await conn.receive_message()
                try:
                    message = json.loads(text)
                except (ValueError, RecursionError):
                    log.warning("exai.Client: ignoring a message that is not JSON")
                    continue
                for item in message if isinstance(message, list) else [message]:
                    if isinstance(item, dict):
                        await self._dispatch(item)
        except ConnectionClosed as exc:
            self._broken = exc
            for pending in list(self._pending.values()):
                pending.settle(
                    None, ConnectionClosed(exc.code, exc.close_reason, url=redact_url(self.url))
                )
            self._pending.clear()
            self._progress.clear()

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        method = msg.get("method")
        if method is None:
            if "id" not in msg:
                return
            pending = self._pending.pop(_key(msg["id"]), None)
            if pending is None:
                log.debug("exai.Client: response for an unknown id %r", msg.get("id"))
                return
            if pending.progress_token is not None:
                self._progress.pop(pending.progress_token, None)
            pending.settle(msg, None)
            return
        if "id" in msg:
            # A request from the daemon: answer ping, refuse the rest (we offer no capabilities).
            if method == "ping":
                reply: dict[str, Any] = {"jsonrpc": "2.0", "id": msg["id"], "result": {}}
            else:
                reply = {
                    "jsonrpc": "2.0",
                    "id": msg["id"],
                    "error": {"code": -32601, "message": f"method not found: {method}"},
                }
            try:
                await self._send(reply)
            except ConnectionClosed:
                return
            return
        if method == "notifications/progress":
            params = msg.get("params")
            params = params if isinstance(params, dict) else {}
            token = params.get("progressToken")
            pending = self._progress.get(_key(token)) if token is not None else None
            if pending is None:
                return
            message = params.get("message")
            item = (
                _num(params.get("progress")),
                _num(params.get("total")),
                message if isinstance(message, str) else None,
            )
            try:
                pending.progress_send.send_nowait(item)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                log.debug("exai.Client: progress for %r skipped (consumer behind)", pending.id)

    # -- sending -------------------------------------------------------------------------

    def _encode(self, message: dict[str, Any]) -> str:
        """``message`` as one frame's text, or the error for this call alone.

        A message the connection cannot carry is refused here, before it is sent: sent, a NaN
        would be answered with an error the call could not be matched to, and a frame over
        the daemon's limit would close the connection and every other call with it.

        Raises:
            InvalidParams: a value JSON cannot carry (NaN, an infinity, a non-JSON type), or
                the encoded message is larger than ``settings.max_frame_bytes``.
        """
        try:
            text = encode_message(message)
        except (ValueError, TypeError, RecursionError) as exc:
            raise errors.InvalidParams(
                f"the request holds a value JSON cannot carry ({exc})", field="params"
            ) from None
        size = len(text.encode("utf-8"))
        if size > self._max_frame_bytes:
            raise errors.InvalidParams(
                f"the request is {size} bytes once encoded, more than EXAI_MAX_FRAME_BYTES "
                f"({self._max_frame_bytes}); send less",
                field="params",
                data={"max_bytes": self._max_frame_bytes},
            )
        return text

    async def _send(self, message: dict[str, Any]) -> None:
        if self._broken is not None:
            raise ConnectionClosed(
                self._broken.code, self._broken.close_reason, url=redact_url(self.url)
            )
        if self._conn is None:
            raise RuntimeError("exai.Client is not open; use 'async with Client(...)'")
        await self._conn.send_message(self._encode(message))

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification.

        Raises:
            ConnectionClosed: the connection is gone.
        """
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self._send(msg)

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send a request and return its ``result``.

        Raises:
            ExaiError: the JSON-RPC error the daemon answered, mapped by
                :func:`error_from_jsonrpc`.
            ConnectionClosed: the connection broke before the answer came.
        """
        return await self._call(method, params, None)

    async def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        on_progress: ProgressCallback | None,
    ) -> Any:
        request_id = next(self._ids)
        pending = _Pending(request_id, method)
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            msg["params"] = params
        if on_progress is not None:
            token = f"exai-client:{request_id}"
            params = dict(params or {})
            params["_meta"] = {**(params.get("_meta") or {}), "progressToken": token}
            msg["params"] = params
            pending.progress_token = _key(token)
            self._progress[pending.progress_token] = pending
        self._pending[_key(request_id)] = pending
        try:
            return await self._await_answer(msg, pending, on_progress)
        finally:
            pending.progress_recv.close()

    async def _await_answer(
        self, msg: dict[str, Any], pending: _Pending, on_progress: ProgressCallback | None
    ) -> Any:
        request_id, method = pending.id, pending.method
        sent = False
        try:
            await self._send(msg)
            sent = True
            if on_progress is not None:
                async for progress, total, message in pending.progress_recv:
                    await on_progress(progress, total, message)
            await pending.done.wait()
        except BaseException as exc:
            self._pending.pop(_key(request_id), None)
            if pending.progress_token is not None:
                self._progress.pop(pending.progress_token, None)
            answered = pending.done.is_set()
            pending.settle(None, None)
            if (
                sent
                and not answered
                and isinstance(exc, anyio.get_cancelled_exc_class())
                and method not in ("initialize", "server/discover")
            ):
                with anyio.move_on_after(CANCEL_NOTIFY_S, shield=True):
                    try:
                        await self.notify(
                            "notifications/cancelled",
                            {"requestId": request_id, "reason": "cancelled by the caller"},
                        )
                    except ConnectionClosed:
                        pass
            raise
        if pending.failure is not None:
            raise pending.failure
        assert pending.response is not None
        if "error" in pending.response:
            raise error_from_jsonrpc(pending.response["error"])
        return pending.response.get("result")

    # -- MCP -----------------------------------------------------------------------------

    async def list_tools(self) -> list[dict[str, Any]]:
        """Every tool the daemon offers (``tools/list``, following ``nextCursor``)."""
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            result = await self.request("tools/list", {"cursor": cursor} if cursor else {})
            tools.extend(result.get("tools") or [])
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return tools

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Call a tool and return the MCP result (``content``, ``isError``, …).

        Args:
            name: the tool.
            arguments: its arguments.
            on_progress: ``await on_progress(progress, total, message)`` for each progress
                notification of this call (sets ``_meta.progressToken``).

        Raises:
            ExaiError: the mapped JSON-RPC error (:func:`error_from_jsonrpc`).
            ConnectionClosed: the connection broke before the result came.
        """
        result = await self._call(
            "tools/call", {"name": name, "arguments": arguments or {}}, on_progress
        )
        return dict(result or {})

    async def cancel(self, request_id: Any, reason: str = "cancelled by the caller") -> None:
        """Cancel an in-flight request by id (see :meth:`in_flight`).

        The daemon is told with ``notifications/cancelled``; the local call waiting on it raises
        :class:`~exai.errors.ExaiError` with reason ``"cancelled"`` at once.
        """
        pending = self._pending.pop(_key(request_id), None)
        await self.notify("notifications/cancelled", {"requestId": request_id, "reason": reason})
        if pending is not None:
            if pending.progress_token is not None:
                self._progress.pop(pending.progress_token, None)
            failure = ExaiError(f"request {request_id!r} was cancelled: {reason}")
            failure.reason = "cancelled"
            pending.settle(None, failure)

    def in_flight(self) -> dict[Any, str]:
        """The ids of the requests waiting for an answer, with their methods."""
        return {p.id: p.method for p in self._pending.values()}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
