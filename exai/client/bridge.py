"""The bridge's relay: one MCP client's newline-delimited JSON-RPC piped to the exai daemon.

``exai bridge`` (the process, its stdio and its parent watch: :mod:`exai.client.stdio`) runs one
:class:`Bridge`; how lines are read and written is :mod:`exai.client.lines`. The bridge copies
newline-delimited JSON-RPC between its stdin/stdout and one WebSocket connection to the daemon
(``EXAI_URL``, ``EXAI_TOKEN``). What it adds to a plain pipe:

* **Reconnect.** When the connection breaks it reconnects with exponential backoff and full
  jitter (0.1 s doubling to 5 s; a 503's ``Retry-After`` wins), re-establishes the MCP session
  itself (replays the client's last ``initialize`` or ``server/discover`` under an id of its own,
  swallows the answer, replays ``notifications/initialized``), then re-sends every unanswered
  request with its **original id**.
* **Exactly one execution.** Every forwarded ``tools/call`` carries
  ``params._meta["exai/idempotencyKey"] = "<bridge uuid>:<json id>"`` (the client's own ``_meta``
  is kept), so a re-sent call joins the execution the daemon kept running, or gets its stored
  result, instead of running twice.
* **Bounded everything.** While disconnected, messages wait in a buffer of ``max_buffer``
  (default 1,000); beyond it a request is answered with reason ``bridge_overloaded``. When the
  daemon stays unreachable for longer than ``settings.call_timeout_s`` — or, before the bridge
  has ever reached it, ``settings.connect_wait_s`` (a daemon that is not running should not
  look like a hang) — every waiting request is answered with ``{"code": -32000, "data":
  {"reason": "daemon_unavailable", "url": …}}`` and so is every new one until the daemon is
  back; the message names the URL and, for a daemon on this machine, the command that starts it
  (``data.start``). A refused token (HTTP 401/403) is not retried: waiting and new requests are
  answered with reason ``unauthorized``.
* **Autostart** (``settings.autostart``, ``EXAI_AUTOSTART=1``). When a connection attempt to a
  loopback URL fails and nothing answers there, the bridge starts ``exai serve`` itself (one
  daemon however many bridges try at once; :mod:`exai.client.autostart`), and connects to it.
  A start that fails (the daemon exits, or does not listen in ``settings.autostart_wait_s``)
  answers the waiting requests with what happened and where the daemon's log is, and is not
  tried again for ``settings.autostart_wait_s``.
* **Clean stdio.** stdout carries only JSON-RPC, one message per line; logs go to stderr (in
  :func:`exai.client.stdio.run` even a stray ``print`` lands on stderr). A line longer than
  ``settings.max_frame_bytes`` is dropped as it arrives and refused with a JSON-RPC error
  (``message_too_large``) that carries the request's id, found by a scan of the line's first
  and last 4 KiB (:mod:`exai.server.idscan`), so the client's call fails at once instead of
  waiting for an answer it cannot match.
* **Never ended by one message.** Lines are parsed as strictly as the daemon parses frames
  (no ``NaN``; 100,000-deep nesting is a parse error, not a crash) and every message is encoded
  once, when it arrives, by the daemon's own encoder, which cannot fail on decoded JSON (a lone
  surrogate such as ``"\\ud800"`` is written as an escape). A request that cannot be read or
  sent (a parse error, larger than a frame once encoded) is answered with an error carrying its
  id; a connection closed with 1009 (the daemon refused a frame of ours as too large, or we
  refused an answer over our cap) answers the request concerned instead of re-sending it to
  every new connection forever. An answer from the daemon that cannot be written is replaced by
  an error carrying its id.
* **Everything read is answered.** On stdin EOF (a one-shot pipe: ``initialize``,
  ``tools/list`` and a call, then EOF) the bridge waits for the answers of every request it read,
  at most ``settings.call_timeout_s`` + :data:`DRAIN_MARGIN_S` (the daemon answers every call by
  its deadline), writes them, then tells the daemon the calls still waiting are cancelled and
  ends (exit 0). With nothing waiting it ends at once.
* **No orphans.** The death of its parent, or SIGTERM, ends the bridge at once
  (:meth:`Bridge.stop`, called by :mod:`exai.client.stdio`): no drain, but the daemon is still
  told that the calls waiting are cancelled, so none runs on for nobody.

Notifications flow both ways unchanged; a ``notifications/cancelled`` from the client also drops
its request from the re-send set. Requests from the daemon (``ping``, sampling, …) go to the
client, and the client's answers go back on the same connection (an answer meant for a
connection that has since broken is dropped: the new session never asked).

Resource handling:
    :meth:`Bridge.run` owns one task group: the stdin reader, the stdout writer and the
    connection loop (which owns, per connection, a task group with the daemon reader, the sender
    and the heartbeat). Everything ends when ``run`` returns.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import random
import ssl
import uuid
from typing import Any, Protocol

import anyio
import anyio.abc
import trio

from exai.client.autostart import AutostartFailed, ensure_daemon, loopback_target, start_hint
from exai.client.lines import DECODER, Entry, Oversized, dumps_line, to_client_line
from exai.client.ws import (
    ConnectionClosed,
    HandshakeRejected,
    NotTheMcpDoor,
    WebSocketConnection,
    WebSocketError,
    connect_websocket,
    make_ssl_context,
)
from exai.config import TOKEN_TEXT_RULE, Secret, Settings, is_token_text, redact_url
from exai.errors import SERVER_ERROR, ConfigError
from exai.logs import log_event
from exai.server.idscan import ID_SCAN_BYTES, recover_id

__all__ = ["IDEMPOTENCY_META_KEY", "Bridge", "backoff_delay"]


#: ``params._meta`` key the daemon dedupes re-sent ``tools/call`` requests by.
IDEMPOTENCY_META_KEY = "exai/idempotencyKey"
#: Longest idempotency key the daemon accepts.
MAX_IDEMPOTENCY_KEY = 200
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
#: Longest ``Retry-After`` honoured as is (a bigger one is clamped).
MAX_RETRY_AFTER_S = 60.0
#: A ping is sent this often on an idle-looking connection; no pong in time = connection lost.
PING_INTERVAL_S = 10.0
PING_TIMEOUT_S = 10.0
#: Bound on telling the daemon about cancelled calls when the client goes away.
GOODBYE_S = 0.5
#: After stdin EOF, answers are awaited this long beyond ``settings.call_timeout_s`` (the
#: daemon's timeout answer itself takes a moment to arrive).
DRAIN_MARGIN_S = 5.0
#: Bound on writing the last answers to stdout after stdin EOF (a client that stopped reading).
FLUSH_S = 2.0
#: Least time between two daemons started by one bridge (a daemon that listens, then dies at
#: once, must not be started again in a loop).
AUTOSTART_SPACING_S = 5.0
#: Bytes read from the client's stdin at a time.
READ_CHUNK = 65536

_INTERNAL_PREFIX = "exai-bridge:"
#: What a broken or closed stdio stream raises (trio's FdStream raises trio's own classes).
_STDIO_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class ByteReceiver(Protocol):
    """What the bridge reads the client from (trio streams fit)."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...


class ByteSender(Protocol):
    """What the bridge writes the client to (trio streams fit)."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...


class _ClientGone(Exception):
    """stdout is closed: nobody is listening any more."""


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base · 2^attempt)]."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** min(attempt, 30)))
    return rng.uniform(0.0, ceiling)


def _key(request_id: Any) -> str:
    return json.dumps(request_id, sort_keys=True)


class Bridge:
    """Pipe one MCP client (byte streams) to the exai daemon (see the module docstring).

    Args:
        settings: ``url``, ``token``, ``tls_ca``, ``call_timeout_s`` (the unreachable bound),
            ``handshake_timeout_s`` (bound on one connect attempt) and ``max_frame_bytes``.
        url: overrides ``settings.url``.
        token: overrides ``settings.token``.
        ssl_context: for ``wss://``; default the system store or ``settings.tls_ca``.
        max_buffer: messages held while disconnected (and requests in flight) before new
            requests are refused with reason ``bridge_overloaded``.
        unreachable_after_s: overrides ``settings.call_timeout_s`` as the unreachable bound.
        connect_wait_s: overrides ``settings.connect_wait_s``, the unreachable bound before the
            daemon was ever reached (never longer than the other bound).
        rng: randomness for the backoff jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        token: Secret | str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_buffer: int = 1000,
        unreachable_after_s: float | None = None,
        connect_wait_s: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.url = url or settings.effective_url
        tok = token if token is not None else settings.token
        self._token = Secret(tok) if isinstance(tok, str) else tok
        if self._token and not is_token_text(self._token.reveal()):
            raise ConfigError(f"EXAI_TOKEN: {TOKEN_TEXT_RULE}")
        self._ssl = ssl_context
        self.max_buffer = max_buffer
        self.unreachable_after_s = (
            settings.call_timeout_s if unreachable_after_s is None else unreachable_after_s
        )
        self.connect_wait_s = min(
            settings.connect_wait_s if connect_wait_s is None else connect_wait_s,
            self.unreachable_after_s,
        )
        self._rng = rng or random.Random()
        self.instance_id = str(uuid.uuid4())

        self._pending: dict[str, Entry] = {}
        self._queue: collections.deque[Entry] = collections.deque()
        self._queue_kick = anyio.Event()
        self._seq = 0
        self._out_send, self._out_recv = anyio.create_memory_object_stream[dict[str, Any]](
            max_buffer
        )
        self._handshake: dict[str, Any] | None = None  # last answered initialize/discover
        self._initialized_seen = False
        self._internal: dict[str, anyio.Event] = {}
        self._internal_seq = 0
        self._generation = 0
        self._server_requests: dict[str, int] = {}  # daemon request id -> generation
        self._connected = False
        self._conn: WebSocketConnection | None = None
        self._down_since: float | None = None
        self._expired = False  # the unreachable bound passed during this outage
        self._last_error = "not connected yet"
        self._ever_connected = False
        #: an autostart failed during this outage: waiting longer would only hide why
        self._hopeless = False
        #: no autostart before this loop time (after a failed one)
        self._autostart_after = 0.0
        #: kicked on every message to the client (the drain after stdin EOF waits on it)
        self._emitted = anyio.Event()
        self._emitting = 0
        self._stdout_done = anyio.Event()
        #: around reading stdin and the drain; :meth:`stop` cancels it
        self._reading = anyio.CancelScope()
        self._fatal: HandshakeRejected | NotTheMcpDoor | None = None
        #: the largest message sent on the current connection, and how that connection ended
        #: (a 1009 close names a message too large; see :meth:`_fail_too_large`)
        self._largest_sent: Entry | None = None
        self._closed: ConnectionClosed | None = None
        #: connections made so far (for tests and status).
        self.connections = 0

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return (
            f"<Bridge {redact_url(self.url)} {state} pending={len(self._pending)} "
            f"queued={len(self._queue)} connections={self.connections}>"
        )

    # -- public --------------------------------------------------------------------------

    async def run(self, stdin: ByteReceiver, stdout: ByteSender) -> None:
        """Bridge until stdin reaches EOF or stdout breaks.

        On EOF the requests read are answered first (:meth:`_drain`), then the daemon is told
        (bounded by :data:`GOODBYE_S`) that the calls still waiting are cancelled, the answers
        are written (bounded by :data:`FLUSH_S`) and the connection is closed.
        """
        self._down_since = anyio.current_time()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stdout_loop, stdout, tg.cancel_scope)
                tg.start_soon(self._connection_loop)
                with self._reading:
                    await self._stdin_loop(stdin)
                    await self._drain()
                await self._goodbye()
                self._out_send.close()  # the stdout loop writes what is left, then ends
                with anyio.move_on_after(FLUSH_S):
                    await self._stdout_done.wait()
                tg.cancel_scope.cancel()
        finally:
            self._out_send.close()
            self._out_recv.close()

    def stop(self) -> None:
        """End :meth:`run` soon (SIGTERM, the parent gone): stop reading, skip the drain, tell
        the daemon (bounded by :data:`GOODBYE_S`) that the calls still waiting are cancelled,
        write what is ready (bounded by :data:`FLUSH_S`). Safe to call at any time."""
        self._reading.cancel()

    # -- client side ---------------------------------------------------------------------

    async def _stdin_loop(self, stdin: ByteReceiver) -> None:
        limit = self.settings.max_frame_bytes
        buf = bytearray()
        # an oversized line is dropped as it arrives; its first and last bytes are kept to
        # find its id, so the refusal can be matched to the request (never "id": null when
        # the id can be found)
        oversized: Oversized | None = None
        while True:
            try:
                chunk = await stdin.receive_some(READ_CHUNK)
            except _STDIO_ERRORS:
                return
            if not chunk:
                if buf and oversized is None:
                    await self._line(bytes(buf))
                return
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line = bytes(buf[:nl])
                del buf[: nl + 1]
                if oversized is not None:
                    oversized.keep_tail(line)
                    await self._refuse_oversized(oversized, limit)
                    oversized = None
                    continue
                await self._line(line)
            if oversized is None and len(buf) > limit:
                oversized = Oversized(bytes(buf[:ID_SCAN_BYTES]))
                log_event(
                    "bridge.client_message_too_large",
                    logging.WARNING,
                    message=f"refused a message from the client larger than {limit} bytes",
                    limit_bytes=limit,
                )
                if oversized.rid is not None:  # found at the start: answer at once
                    await self._refuse_oversized(oversized, limit)
            if oversized is not None:
                oversized.keep_tail(buf)
                buf.clear()

    async def _refuse_oversized(self, oversized: Oversized, limit: int) -> None:
        if oversized.answered:
            return
        oversized.answered = True
        await self._emit_error(
            oversized.find_id(),
            -32600,
            f"message larger than {limit} bytes (EXAI_MAX_FRAME_BYTES); send less, e.g. fewer "
            "or smaller files or arguments",
            "message_too_large",
            extra={"max_bytes": limit},
        )

    async def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            message = DECODER.decode(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: a 100,000-deep [[[[ … is refused, not a crash of the bridge
            what = "nests too deep" if isinstance(exc, RecursionError) else "is not valid JSON"
            log_event(
                "bridge.client_line_invalid",
                logging.WARNING,
                message=f"the client sent a line that {what}",
            )
            await self._emit_error(
                recover_id(line), -32700, f"parse error: the message {what}", "parse_error"
            )
            return
        for item in message if isinstance(message, list) else [message]:
            await self._from_client(item)

    async def _from_client(self, msg: Any) -> None:
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            rid = msg.get("id") if isinstance(msg, dict) else None
            await self._emit_error(rid, -32600, "not a JSON-RPC 2.0 message", "invalid_request")
            return
        method = msg.get("method")
        if isinstance(method, str) and "id" in msg:
            await self._client_request(msg)
        elif isinstance(method, str):
            await self._client_notification(msg)
        elif "id" in msg:
            gen = self._server_requests.pop(_key(msg["id"]), None)
            if gen is None or gen != self._generation or not self._connected:
                log_event(
                    "bridge.client_answer_dropped",
                    message="dropped the client's answer to a request from a closed connection",
                )
                return
            entry = self._entry(msg, None)
            if entry is not None:
                self._enqueue(entry)
        else:
            await self._emit_error(None, -32600, "not a JSON-RPC 2.0 message", "invalid_request")

    async def _client_request(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        if self._fatal is not None:
            await self._emit_error(rid, SERVER_ERROR, str(self._fatal), self._fatal.reason)
            return
        if self._expired:
            await self._emit_unavailable(rid)
            return
        if len(self._pending) >= self.max_buffer or len(self._queue) >= self.max_buffer:
            await self._emit_error(
                rid,
                SERVER_ERROR,
                f"exai bridge is holding {self.max_buffer} messages; retry later",
                "bridge_overloaded",
                retry_after_s=1.0,
            )
            return
        key = _key(rid)
        if key in self._pending:
            await self._emit_error(
                rid, -32600, f"request id {rid!r} is already in flight", "duplicate_id"
            )
            return
        if msg.get("method") == "tools/call":
            msg = self._with_idempotency_key(msg)
        entry = self._entry(msg, key)
        if entry is None:
            await self._refuse_unencodable(msg)
            return
        self._pending[key] = entry
        self._enqueue(entry)

    def _entry(self, msg: dict[str, Any], key: str | None) -> Entry | None:
        """``msg`` encoded for the daemon, or ``None`` when it cannot be sent: it holds what
        JSON cannot carry, or its encoding is larger than a frame may be (the daemon would
        close the connection, and a re-sent request would close every new one too)."""
        try:
            text = dumps_line(msg)
        except (ValueError, TypeError, RecursionError):
            return None
        entry = Entry(self._next_seq(), msg, key, text)
        if entry.size > self.settings.max_frame_bytes:
            return None
        return entry

    async def _refuse_unencodable(self, msg: dict[str, Any]) -> None:
        limit = self.settings.max_frame_bytes
        log_event(
            "bridge.client_request_refused",
            logging.WARNING,
            message="refused a request from the client that cannot be sent to the daemon",
        )
        await self._emit_error(
            msg["id"],
            -32600,
            f"the message cannot be sent to the exai daemon: once encoded it is larger than "
            f"{limit} bytes (EXAI_MAX_FRAME_BYTES), or it holds a value JSON cannot carry",
            "message_too_large",
            extra={"max_bytes": limit},
        )

    def _with_idempotency_key(self, msg: dict[str, Any]) -> dict[str, Any]:
        params = msg.get("params")
        if not isinstance(params, dict):
            return msg  # invalid; the daemon will say so
        meta = params.get("_meta")
        meta = dict(meta) if isinstance(meta, dict) else {}
        if IDEMPOTENCY_META_KEY not in meta:
            rid = json.dumps(msg["id"])  # ASCII: a lone surrogate is escaped, never hashed raw
            key = f"{self.instance_id}:{rid}"
            if len(key) > MAX_IDEMPOTENCY_KEY:
                key = f"{self.instance_id}:sha256:{hashlib.sha256(rid.encode()).hexdigest()}"
            meta[IDEMPOTENCY_META_KEY] = key
        return {**msg, "params": {**params, "_meta": meta}}

    async def _client_notification(self, msg: dict[str, Any]) -> None:
        method = msg["method"]
        if method == "notifications/cancelled":
            params = msg.get("params")
            params = params if isinstance(params, dict) else {}
            entry = self._pending.pop(_key(params.get("requestId")), None)
            if entry is not None and not entry.ever_sent:
                # The daemon never saw it: drop both, nothing to tell.
                self._unqueue(entry)
                return
            if entry is not None:
                self._unqueue(entry)
                # the call may now run on a session that never saw this id (we reconnected):
                # the idempotency key lets the daemon find and cancel it all the same
                ikey = ((entry.msg.get("params") or {}).get("_meta") or {}).get(
                    IDEMPOTENCY_META_KEY
                )
                if ikey:
                    own_meta = params.get("_meta")
                    own_meta = own_meta if isinstance(own_meta, dict) else {}
                    meta = {**own_meta, IDEMPOTENCY_META_KEY: ikey}
                    msg = {**msg, "params": {**params, "_meta": meta}}
        elif method == "notifications/initialized":
            self._initialized_seen = True
        if self._fatal is not None or self._expired:
            log_event(
                "bridge.notification_dropped",
                logging.DEBUG,
                message=f"daemon out of reach: dropped a {method} notification from the client",
                method=method,
            )
            return
        if len(self._queue) >= self.max_buffer:
            log_event(
                "bridge.notification_dropped",
                logging.WARNING,
                message=f"bridge buffer full: dropped a {method} notification from the client",
                method=method,
            )
            return
        entry = self._entry(msg, None)
        if entry is None:
            log_event(
                "bridge.notification_dropped",
                logging.WARNING,
                message=f"dropped a {method} notification that cannot be sent to the daemon",
                method=method,
            )
            return
        self._enqueue(entry)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _enqueue(self, entry: Entry) -> None:
        self._queue.append(entry)
        self._kick()

    def _unqueue(self, entry: Entry) -> None:
        try:
            self._queue.remove(entry)
        except ValueError:
            pass

    def _kick(self) -> None:
        self._queue_kick.set()
        self._queue_kick = anyio.Event()

    # -- to the client -------------------------------------------------------------------

    async def _emit(self, msg: dict[str, Any]) -> None:
        # counted from before the first checkpoint: an answer whose request has just left
        # _pending is still on its way, and the drain must wait for it
        self._emitting += 1
        try:
            await self._out_send.send(msg)
        except anyio.ClosedResourceError:
            # stdin ended and the drain is over: an answer this late has nobody to go to
            log_event(
                "bridge.message_dropped",
                logging.DEBUG,
                message="dropped a message for the client after the drain",
            )
        finally:
            self._emitting -= 1
            self._emitted.set()
            self._emitted = anyio.Event()

    async def _drain(self) -> None:
        """stdin closed: wait until every request read has its answer (bounded)."""
        if not self._pending and not self._emitting:
            return
        log_event(
            "bridge.stdin_closed",
            logging.DEBUG,
            message=f"stdin closed; waiting for {len(self._pending)} answers",
            pending=len(self._pending),
        )
        with anyio.move_on_after(self.settings.call_timeout_s + DRAIN_MARGIN_S):
            while self._pending or self._emitting:
                await self._emitted.wait()
        if self._pending:
            waited = self.settings.call_timeout_s + DRAIN_MARGIN_S
            log_event(
                "bridge.drain_cancelled",
                logging.WARNING,
                message=f"stdin closed; {len(self._pending)} requests still unanswered after "
                f"{waited:.0f}s: cancelled",
                pending=len(self._pending),
            )

    async def _emit_error(
        self,
        rid: Any,
        code: int,
        message: str,
        reason: str,
        *,
        retry_after_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        data: dict[str, Any] = {"reason": reason, **(extra or {})}
        if retry_after_s is not None:
            data["retry_after_s"] = retry_after_s
        await self._emit(
            {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message, "data": data}}
        )

    async def _emit_unavailable(self, rid: Any) -> None:
        url = redact_url(self.url)
        message = f"exai daemon unreachable at {url}: {self._last_error}"
        extra: dict[str, Any] = {"url": url}
        hint = start_hint(self.url)
        if hint is None:
            message += "; is the exai daemon running there and reachable from this machine?"
        elif self.settings.autostart:
            message += f"; start it by hand with: {hint}"
            extra["start"] = hint
        else:
            message += (
                f"; start it with: {hint} (or set EXAI_AUTOSTART=1 in the bridge's environment "
                "to have the bridge start it)"
            )
            extra["start"] = hint
        await self._emit_error(rid, SERVER_ERROR, message, "daemon_unavailable", extra=extra)

    async def _fail_pending(self, fatal: bool) -> None:
        """Answer every waiting request: the daemon is unreachable, or refused us for good."""
        entries = sorted(self._pending.values(), key=lambda e: e.seq)
        for entry in entries:
            self._unqueue(entry)
        if fatal:
            # Notifications for a daemon we will never reach again are dropped with the rest.
            self._queue.clear()
        for entry in entries:
            if entry.key is None or self._pending.get(entry.key) is not entry:
                continue
            rid = entry.msg["id"]
            if fatal and self._fatal is not None:
                await self._emit_error(rid, SERVER_ERROR, str(self._fatal), self._fatal.reason)
            else:
                await self._emit_unavailable(rid)
            # dropped only once its answer is on its way: the drain after stdin EOF ends when
            # nothing is pending, and must not end before the last of these answers is out
            if self._pending.get(entry.key) is entry:
                del self._pending[entry.key]

    async def _stdout_loop(self, stdout: ByteSender, scope: anyio.CancelScope) -> None:
        try:
            async for msg in self._out_recv:
                line = to_client_line(msg)
                if line:
                    await stdout.send_all((line + "\n").encode("utf-8"))
        except _STDIO_ERRORS:
            log_event(
                "bridge.stdout_closed",
                logging.DEBUG,
                message="stdout is closed; the client is gone",
            )
            scope.cancel()
        finally:
            self._stdout_done.set()

    # -- daemon side ---------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        if self._ssl is None and self.url.startswith("wss://"):
            # reading CA files blocks: not on the event loop
            self._ssl = await anyio.to_thread.run_sync(make_ssl_context, self.settings)
        attempt = 0
        while True:
            try:
                with anyio.fail_after(self.settings.handshake_timeout_s):
                    conn = await connect_websocket(
                        self.url,
                        token=self._token,
                        ssl_context=self._ssl,
                        max_message_bytes=self.settings.max_frame_bytes,
                    )
            except (HandshakeRejected, NotTheMcpDoor) as exc:
                # (a bad token, a wrong URL: the daemon answers, so neither "unreachable" nor
                # "start it" is true, and retrying — or autostarting — cannot help)
                self._last_error = str(exc)
                if not exc.retryable:
                    log_event(
                        "bridge.connect_refused", logging.ERROR, message=f"{exc}; not retrying"
                    )
                    self._fatal = exc
                    await self._fail_pending(fatal=True)
                    return
                delay = backoff_delay(attempt, self._rng)
                if exc.retry_after_s is not None:
                    delay = min(exc.retry_after_s, MAX_RETRY_AFTER_S)
                log_event(
                    "bridge.connect_retry",
                    logging.WARNING,
                    message=f"{exc}; retrying in {delay:.2f}s",
                    delay_s=round(delay, 2),
                )
            except (WebSocketError, TimeoutError) as exc:
                self._last_error = str(exc) if str(exc) else "connect timed out"
                delay = backoff_delay(attempt, self._rng)
                if self.settings.autostart and await self._autostart():
                    attempt = 0
                    continue
                if attempt == 0 or attempt % 20 == 0:
                    log_event(
                        "bridge.connect_retry",
                        logging.WARNING,
                        message=f"{self._last_error}; retrying",
                    )
            else:
                attempt = 0
                async with conn:
                    await self._serve(conn)
                self._on_connection_lost()
                await self._fail_too_large()
                delay = backoff_delay(0, self._rng)
            attempt += 1
            await self._wait_or_expire(delay)

    async def _autostart(self) -> bool:
        """Start the daemon if nothing answers (:func:`~exai.client.autostart.ensure_daemon`);
        whether it answers now where it did not (then connect again at once)."""
        now = anyio.current_time()
        if now < self._autostart_after:
            return False
        if loopback_target(self.url) is None:
            # a daemon elsewhere cannot be started from here: wait for it as without autostart
            log_event(
                "bridge.autostart_not_local",
                logging.WARNING,
                message=f"EXAI_AUTOSTART is set, but {redact_url(self.url)} is not a URL on this "
                "machine: the bridge starts no daemon for it",
            )
            self._autostart_after = float("inf")
            return False
        try:
            started = await ensure_daemon(self.settings, self.url)
        except AutostartFailed as exc:
            self._autostart_after = anyio.current_time() + self.settings.autostart_wait_s
            self._last_error = f"EXAI_AUTOSTART: {exc}"
            log_event("bridge.autostart_failed", logging.ERROR, message=self._last_error)
            self._hopeless = True  # nothing will answer soon: the waiting learn why now
            return False
        if started == "started":
            log_event(
                "bridge.autostart_started",
                message=f"started the exai daemon for {redact_url(self.url)} (EXAI_AUTOSTART)",
            )
            self._autostart_after = anyio.current_time() + AUTOSTART_SPACING_S
        return started != "answering"

    def _on_connection_lost(self) -> None:
        self._connected = False
        self._conn = None
        self._down_since = anyio.current_time()
        resend = [e for e in self._pending.values() if e.sent]
        for entry in resend:
            entry.sent = False
        self._queue = collections.deque(sorted([*resend, *self._queue], key=lambda e: e.seq))
        for event in self._internal.values():
            event.set()
        self._internal.clear()
        log_event(
            "bridge.connection_lost",
            logging.WARNING,
            message=f"lost the connection to the daemon ({self._last_error}); reconnecting",
        )

    async def _wait_or_expire(self, delay: float) -> None:
        """Sleep ``delay``, but wake to answer waiting requests once the outage is too long."""
        assert self._down_since is not None
        bound = self.unreachable_after_s if self._ever_connected else self.connect_wait_s
        deadline = self._down_since + bound
        now = anyio.current_time()
        if not self._expired and (now + delay >= deadline or self._hopeless):
            if not self._hopeless:
                await anyio.sleep(max(0.0, deadline - now))
            self._expired = True
            down_s = anyio.current_time() - self._down_since
            log_event(
                "bridge.unreachable",
                logging.ERROR,
                message=f"exai daemon unreachable at {redact_url(self.url)} for {down_s:.1f}s: "
                "answering waiting requests with an error",
                down_s=round(down_s, 1),
            )
            await self._fail_pending(fatal=False)
            delay = max(0.0, now + delay - anyio.current_time())
        await anyio.sleep(delay)

    async def _fail_too_large(self) -> None:
        """After the connection closed with 1009 (a message too big), answer the request that
        cannot go through instead of re-sending it to every new connection forever.

        The daemon closed on a frame of ours larger than its limit: the largest one sent on
        that connection is such a frame. The bridge closed on an answer larger than its own
        limit: the id is read from the answer's first bytes.
        """
        closed, self._closed = self._closed, None
        largest, self._largest_sent = self._largest_sent, None
        if closed is None or closed.code != 1009:
            return
        if closed.oversized_head:  # an answer from the daemon we refused to take
            rid = recover_id(closed.oversized_head)
            entry = self._pending.pop(_key(rid), None) if rid is not None else None
            if entry is not None:
                self._unqueue(entry)
                await self._emit_error(
                    entry.msg["id"],
                    SERVER_ERROR,
                    "the exai daemon's answer is larger than EXAI_MAX_FRAME_BYTES "
                    f"({self.settings.max_frame_bytes} bytes) of this bridge",
                    "answer_too_large",
                    extra={"max_bytes": self.settings.max_frame_bytes},
                )
            return
        if largest is not None and largest.key and self._pending.get(largest.key) is largest:
            del self._pending[largest.key]
            self._unqueue(largest)
            await self._emit_error(
                largest.msg["id"],
                -32600,
                f"the exai daemon refused the message as too large ({largest.size} bytes; "
                f"the daemon's EXAI_MAX_FRAME_BYTES is lower than this bridge's)",
                "message_too_large",
            )

    async def _serve(self, conn: WebSocketConnection) -> None:
        """Run one connection until it breaks (or the bridge stops)."""
        self.connections += 1
        self._generation += 1
        self._server_requests.clear()
        self._largest_sent = None
        self._closed = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._guard, self._daemon_reader, conn, tg.cancel_scope)
            if self._handshake is not None:
                try:
                    await self._replay_handshake(conn)
                except WebSocketError as exc:
                    self._last_error = str(exc)
                    tg.cancel_scope.cancel()
                    return
            self._conn = conn
            self._connected = True
            self._ever_connected = True
            self._hopeless = False
            self._down_since = None
            if self._expired:
                log_event(
                    "bridge.reachable_again",
                    message=f"the daemon at {redact_url(self.url)} is reachable again",
                )
            self._expired = False
            tg.start_soon(self._guard, self._sender, conn, tg.cancel_scope)
            tg.start_soon(self._guard, self._heartbeat, conn, tg.cancel_scope)

    async def _guard(self, fn: Any, conn: WebSocketConnection, scope: anyio.CancelScope) -> None:
        try:
            await fn(conn)
        except WebSocketError as exc:
            self._last_error = str(exc)
            if isinstance(exc, ConnectionClosed) and self._closed is None:
                self._closed = exc
        scope.cancel()

    async def _replay_handshake(self, conn: WebSocketConnection) -> None:
        assert self._handshake is not None
        self._internal_seq += 1
        rid = f"{_INTERNAL_PREFIX}{self.instance_id}:{self._internal_seq}"
        answered = anyio.Event()
        self._internal[rid] = answered
        await conn.send_message(dumps_line({**self._handshake, "id": rid}))
        with anyio.move_on_after(self.settings.handshake_timeout_s) as scope:
            await answered.wait()
        if scope.cancelled_caught:
            log_event(
                "bridge.handshake_unanswered",
                logging.WARNING,
                message=f"the daemon did not answer the replayed {self._handshake['method']}",
            )
        queued_initialized = any(
            e.msg.get("method") == "notifications/initialized" for e in self._queue
        )
        if (
            self._handshake["method"] == "initialize"
            and self._initialized_seen
            and not queued_initialized
        ):
            await conn.send_message(
                dumps_line({"jsonrpc": "2.0", "method": "notifications/initialized"})
            )

    async def _sender(self, conn: WebSocketConnection) -> None:
        while True:
            while self._queue:
                entry = self._queue.popleft()
                if entry.key is not None:
                    if self._pending.get(entry.key) is not entry:
                        continue  # answered or cancelled meanwhile
                    entry.sent = entry.ever_sent = True
                try:
                    await conn.send_message(entry.text)
                except WebSocketError:
                    if entry.key is None:
                        self._queue.appendleft(entry)  # a notification: keep it for next time
                    raise
                if self._largest_sent is None or entry.size > self._largest_sent.size:
                    self._largest_sent = entry
            await self._queue_kick.wait()

    async def _heartbeat(self, conn: WebSocketConnection) -> None:
        while True:
            await anyio.sleep(PING_INTERVAL_S)
            with anyio.move_on_after(PING_TIMEOUT_S) as scope:
                await conn.ping()
            if scope.cancelled_caught:
                raise WebSocketError(f"the daemon did not answer a ping in {PING_TIMEOUT_S:g}s")

    async def _daemon_reader(self, conn: WebSocketConnection) -> None:
        generation = self._generation
        while True:
            text = await conn.receive_message()
            try:
                message = json.loads(text)
            except (ValueError, RecursionError):
                log_event(
                    "bridge.daemon_message_invalid",
                    logging.WARNING,
                    message="the daemon sent a message that is not JSON; ignored",
                )
                continue
            for msg in message if isinstance(message, list) else [message]:
                if isinstance(msg, dict):
                    await self._from_daemon(msg, generation)

    async def _from_daemon(self, msg: dict[str, Any], generation: int) -> None:
        method = msg.get("method")
        if method is None:
            rid = msg.get("id")
            if isinstance(rid, str) and rid.startswith(_INTERNAL_PREFIX):
                event = self._internal.pop(rid, None)
                if event is not None:
                    event.set()
                if "error" in msg:
                    log_event(
                        "bridge.handshake_refused",
                        logging.WARNING,
                        message=f"the daemon refused the replayed handshake: {msg['error']}",
                    )
                return
            entry = self._pending.pop(_key(rid), None)
            if entry is None:
                log_event(
                    "bridge.answer_dropped",
                    logging.DEBUG,
                    message=f"dropped an answer for id {rid!r} (answered, cancelled or not ours)",
                )
                return
            if entry.msg.get("method") in ("initialize", "server/discover") and "result" in msg:
                self._handshake = {k: v for k, v in entry.msg.items() if k != "id"}
            await self._emit(msg)
            return
        if "id" in msg:
            self._server_requests[_key(msg["id"])] = generation
        await self._emit(msg)

    async def _goodbye(self) -> None:
        """stdin closed: tell the daemon the calls still waiting are no longer wanted."""
        waiting = sorted((e for e in self._pending.values() if e.ever_sent), key=lambda e: e.seq)
        self._pending.clear()
        self._queue.clear()
        conn = self._conn
        if conn is None or not waiting:
            return
        with anyio.move_on_after(GOODBYE_S):
            for entry in waiting:
                cancelled = {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": entry.msg["id"], "reason": "client went away"},
                }
                try:
                    await conn.send_message(dumps_line(cancelled))
                except WebSocketError:
                    return
