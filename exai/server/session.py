"""One MCP session: a WebSocket connection after the upgrade.

The session owns a nursery with a reader (this task), a writer and one responder task per
``tools/call``. Outgoing messages go through a bounded channel to the writer: responses wait for
room (back-pressure onto the slow client's own calls), progress notifications are dropped when
the channel is full (they are advisory).

Error handling:
    A frame over ``max_frame_bytes`` closes with 1009 and invalid UTF-8 with 1007 (both done by
    wsproto/trio-websocket), a binary frame closes with 1003. Every other bad input gets a
    JSON-RPC error and the session stays up. Over the message rate a request gets
    ``data.reason = "rate_limited"``; sustained abuse — more than ``session_abuse_limit``
    rate-limited messages beyond a tenth of the rate — closes the connection with 1008.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from exai import errors
from exai.logs import log_event
from exai.resilience import TokenBucket
from exai.server import protocol as p
from exai.server.calls import Execution, Watcher
from exai.tools.base import ToolContext
from exai.tools.schema import validate

if TYPE_CHECKING:
    from exai.server.app import Daemon
    from exai.server.auth import Identity

__all__ = ["Session"]

_session_ids = itertools.count(1)

#: outgoing messages buffered per session before responses wait and progress is dropped
SEND_QUEUE = 256


def unwrap_exception(exc: BaseException) -> BaseException:
    """The one error a caller should see: groups of one are unwrapped, an ExaiError preferred."""
    while isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions
        preferred = [e for e in inner if isinstance(e, errors.ExaiError)]
        exc = preferred[0] if preferred else inner[0]
    return exc


class Session:
    """Serve one WebSocket connection until it closes or the daemon stops."""

    def __init__(
        self, daemon: Daemon, conn: WebSocketConnection, ip: str, identity: Identity
    ) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.conn = conn
        self.ip = ip
        self.identity = identity
        # unique across daemons and restarts: it is part of the keys that make a call's
        # writes (conversation turns) idempotent in a shared store
        self.id = f"{daemon.instance_id}-s{next(_session_ids)}"
        self.bucket = TokenBucket(self.settings.session_rate_per_s, self.settings.session_burst)
        # made on first use: most sessions are idle most of the time, and 10,000 of them
        # should cost little memory
        self._limiter: trio.CapacityLimiter | None = None
        self._abuse: TokenBucket | None = None
        self.identity_bucket = daemon.identity_bucket(identity.name)
        self.era = p.EraGate()
        # request id (as JSON) → (execution, watcher, responder cancel scope)
        self.inflight: dict[str, tuple[Execution, Watcher, trio.CancelScope]] = {}
        self._send, self._outbox = trio.open_memory_channel[str](SEND_QUEUE)
        self._writer_done = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.closing_reason: tuple[int, str] | None = None

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """This connection's in-flight limiter (``session_max_inflight``)."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.settings.session_max_inflight)
        return self._limiter

    @property
    def abuse(self) -> TokenBucket:
        """Rate-limited messages drain this bucket; it refills at a tenth of the message rate.

        A client that keeps sending over its rate empties it and is closed with 1008, while
        one that overshoots now and then never is.
        """
        if self._abuse is None:
            self._abuse = TokenBucket(
                max(self.settings.session_rate_per_s / 10, 0.1), self.settings.session_abuse_limit
            )
        return self._abuse

    # ---------------------------------------------------------------- running
    async def run(self) -> None:
        """Serve until the peer goes away; on exit every call of this session is detached."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                try:
                    await self._reader()
                finally:
                    # Detach before the responders wind down: a call nobody else watches is
                    # cancelled now, even one still waiting (shielded) for its slots.
                    self._detach_all()
                    nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            self._detach_all()
            self.inflight.clear()
            self.nursery = None

    def _detach_all(self) -> None:
        for ex, watcher, _ in list(self.inflight.values()):
            ex.detach(watcher)

    async def close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with ``code`` (bounded: a stuck peer gets 1 s)."""
        self.closing_reason = (code, reason)
        self._send.close()
        with trio.move_on_after(1.0):
            await self._writer_done.wait()
        with trio.move_on_after(1.0):
            await self.conn.aclose(code, reason)

    async def _writer(self) -> None:
        try:
            async with self._outbox:
                async for text in self._outbox:
                    await self.conn.send_message(text)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            # the peer went away with answers still queued: stop reading too; the answers are
            # kept by the executions for a reconnecting bridge
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()
        finally:
            self._writer_done.set()

    async def send(self, msg: dict[str, Any]) -> None:
        """Queue a message that must be delivered (waits for room in the bounded queue)."""
        try:
            await self._send.send(p.encode(msg))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the session is closing; nothing more can be delivered

    def send_progress(self, msg: dict[str, Any]) -> None:
        """Queue an advisory message; dropped (and counted) when the queue is full."""
        try:
            self._send.send_nowait(p.encode(msg))
        except trio.WouldBlock:
            self.daemon.stats.progress_dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.conn.get_message()
            except ConnectionClosed:
                return
            if isinstance(message, bytes):
                await self.close(1003, "binary frames are not supported; send JSON-RPC as text")
                return
            await self._handle_text(message)
            if self.closing_reason is not None:
                return

    # ---------------------------------------------------------------- dispatch
    async def _handle_text(self, text: str) -> None:
        msg = p.decode(text, max_depth=self.settings.max_json_depth)
        if isinstance(msg, p.DecodeError):
            await self.send(p.error(msg.id, msg.code, msg.message, msg.data))
            return
        if isinstance(msg, p.Response):
            return  # the daemon sends no requests that need answers
        if isinstance(msg, p.Notification) and msg.method == "notifications/cancelled":
            self._cancel(msg.params)  # never rate limited: it frees resources
            return
        wait = self.bucket.try_acquire(1)
        if wait <= 0 and self.identity_bucket is not None:
            wait = self.identity_bucket.try_acquire(1)
        if wait > 0:
            self.daemon.stats.rejections["rate_limited"] += 1
            if self.abuse.try_acquire(1) > 0:
                log_event("session.abuse_closed", logging.WARNING, session=self.id, ip=self.ip)
                await self.close(1008, "message rate limit exceeded repeatedly")
                return
            if isinstance(msg, p.Request):
                exc = errors.RateLimitedError(
                    f"more than {self.settings.session_rate_per_s:g} messages/s on this "
                    "connection; slow down",
                    retry_after_s=wait,
                )
                await self.send(p.error_from_exception(msg.id, exc))
            # Stop reading this connection for one message interval: TCP back-pressure then
            # slows a flooding client down, so its refusals cannot take the CPU that other
            # sessions need. Every request still gets its answer.
            await trio.sleep(min(wait, 1.0 / self.settings.session_rate_per_s))
            return
        if isinstance(msg, p.Notification):
            return  # notifications/initialized and others need no action
        await self._handle_request(msg)

    async def _handle_request(self, req: p.Request) -> None:
        method, params = req.method, req.params
        try:
            self.era.admit(method, params)
            if method == "tools/call":
                self._start_call(req)
                return
            if method == "initialize":
                requested = params.get("protocolVersion")
                res = p.initialize_result(
                    requested if isinstance(requested, str) else None,
                    server_version=self.daemon.version,
                    instructions=self.daemon.instructions,
                )
            elif method == "server/discover":
                res = p.discover_result(
                    server_name="exai",
                    server_version=self.daemon.version,
                    instructions=self.daemon.instructions,
                )
            elif method == "ping":
                res = {}
            elif method == "tools/list":
                res = {"tools": self.daemon.registry.to_mcp()}
            else:
                raise errors.MethodNotFound(f"method not found: {method!r}")
            await self.send(p.result(req.id, self._finalize(method, res)))
        except errors.ExaiError as exc:
            await self.send(p.error_from_exception(req.id, exc))

    def _finalize(self, method: str, res: dict[str, Any]) -> dict[str, Any]:
        """Add what this connection's protocol era requires to a result (at send time, so a
        stored result can be re-sent to a connection of the other era)."""
        return p.finalize_result(method, res, modern=self.era.modern)

    def _response(self, req_id: Any, payload: dict[str, Any]) -> dict[str, Any]:
        if "result" in payload:
            return p.result(req_id, self._finalize("tools/call", payload["result"]))
        return {"jsonrpc": "2.0", "id": req_id, **payload}

    # ---------------------------------------------------------------- tools/call
    def _start_call(self, req: p.Request) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(self._respond_call, req)

    async def _respond_call(self, req: p.Request) -> None:
        id_key = json.dumps(req.id)
        daemon = self.daemon
        owner = False
        try:
            name, args = p.tools_call_params(req.params)
            client_key = p.idempotency_key(req.params)
            # A client's key is scoped to its identity: another token holder can neither join
            # the call nor read its result.
            key = (
                f"k:{self.identity.name}:{client_key}" if client_key else f"s:{self.id}:{id_key}"
            )
            stored = daemon.calls.finished(key)
            if stored is not None:
                await self.send(self._response(req.id, stored))
                return
            ex = daemon.calls.running.get(key)
            if ex is None:
                spec = daemon.registry.get(name)
                if spec is None:
                    raise errors.InvalidParams(f"unknown tool: {name!r}", field="name")
                validate(spec.input_schema, args)
                # Reserve the key before the first await: a duplicate that arrives while this
                # request looks for a shared result or waits for slots joins it instead of
                # running the tool a second time.
                ex = Execution(key=key, tool=name, client_key=bool(client_key))
                daemon.calls.running[key] = ex
                owner = True
        except errors.ExaiError as exc:
            self._audit_refusal(req, exc)
            await self.send(p.error_from_exception(req.id, exc))
            return
        watcher = Watcher(self.send_progress, p.progress_token(req.params))
        with trio.CancelScope() as responder_scope:
            self.inflight[id_key] = (ex, watcher, responder_scope)
            ex.attach(watcher)
            try:
                if owner:
                    # the start belongs to the execution, not to this responder: requests that
                    # joined still want it if this one goes (bounded by slot_wait_s)
                    with ex.wait_scope:
                        await self._start(ex, args, req)
                await ex.done.wait()
                # (cancelled by notifications/cancelled: no response, by the spec)
                if ex.payload is not None:
                    await self.send(self._response(req.id, ex.payload))
            finally:
                self.inflight.pop(id_key, None)
                ex.detach(watcher)
                self.daemon.notify()

    async def _start(self, ex: Execution, args: dict[str, Any], req: p.Request) -> None:
        """Answer a reserved execution from another daemon's stored result, or start it.

        Whatever stops it from starting (no slot in time, shutting down, cancellation) ends
        the reservation, so the joined duplicates get the same answer and a later retry runs.
        """
        daemon = self.daemon
        started = False
        try:
            shared = None
            if ex.client_key:
                shared = await daemon.shared_result(ex.key.removeprefix("k:"))
            if shared is not None:
                ex.payload = shared
                daemon.calls.store(ex.key, shared)
            else:
                await self._launch(ex, args, req)
                started = True
        except errors.ExaiError as exc:
            self._audit_refusal(req, exc)
            ex.payload = {"error": p.error_from_exception(None, exc)["error"]}
        finally:
            if not started:
                daemon.calls.running.pop(ex.key, None)
                ex.done.set()
                daemon.notify()

    async def _launch(self, ex: Execution, args: dict[str, Any], req: p.Request) -> None:
        """Take the session, identity and global slots within ``slot_wait_s`` and start the
        execution in the daemon's calls nursery."""
        daemon = self.daemon
        name, key = ex.tool, ex.key
        if daemon.draining:
            raise errors.OverloadedError(
                "the daemon is shutting down; retry on the next one", retry_after_s=1.0
            )
        if daemon.overloaded_reason is not None:
            daemon.stats.rejections["overloaded"] += 1
            raise errors.OverloadedError(
                f"the daemon is not accepting new calls ({daemon.overloaded_reason})",
                retry_after_s=1.0,
            )
        # per connection → per client identity → global; all or none, within slot_wait_s
        wanted: list[tuple[trio.CapacityLimiter, str]] = [
            (self.limiter, f"this connection's {self.settings.session_max_inflight}")
        ]
        ident_limiter = daemon.identity_limiter(self.identity.name)
        if ident_limiter is not None:
            wanted.append(
                (ident_limiter, f"client {self.identity.name!r}'s {ident_limiter.total_tokens}")
            )
        wanted.append((daemon.inflight, f"the daemon's {self.settings.max_inflight}"))
        held: list[trio.CapacityLimiter] = []
        started = trio.current_time()
        try:
            with trio.move_on_after(self.settings.slot_wait_s):
                for limiter, _ in wanted:
                    await limiter.acquire_on_behalf_of(ex)
                    held.append(limiter)
            daemon.metrics.slot_wait.observe(trio.current_time() - started)
            if len(held) < len(wanted):
                which = wanted[len(held)][1]
                daemon.stats.rejections["overloaded"] += 1
                raise errors.OverloadedError(
                    f"{which} in-flight calls are all busy; retry shortly",
                    retry_after_s=self.settings.slot_wait_s,
                )
        except BaseException:
            for limiter in held:
                limiter.release_on_behalf_of(ex)
            raise
        ctx = ToolContext(
            settings=self.settings,
            services=daemon.services,
            request_id=req.id,
            call_key=key,
            session_id=self.id,
            client=self.identity.name,
            peer=self.ip,
        )
        assert daemon.calls_nursery is not None
        daemon.calls_nursery.start_soon(
            daemon.run_execution, ex, args, ctx, held, name=f"call:{name}:{key[:40]}"
        )

    def _audit_refusal(self, req: p.Request, exc: errors.ExaiError) -> None:
        """An audit line for a call refused before it ran (bad arguments, no slot, …)."""
        name = req.params.get("name")
        self.daemon.audit.record(
            tool=name if isinstance(name, str) else "",
            outcome=exc.reason,
            client=self.identity.name,
            peer=self.ip,
            duration_s=0.0,
            session=self.id,
            request_id=req.id,
        )

    def _cancel(self, params: dict[str, Any]) -> None:
        rid = params.get("requestId")
        entry = self.inflight.get(json.dumps(rid)) if isinstance(rid, (str, int)) else None
        if entry is None:
            # Unknown here — but a bridge that reconnected sends the call's idempotency key
            # with the cancel: an execution of that key that nobody watches any more is
            # cancelled rather than left to its orphan grace.
            key = p.idempotency_key(params)
            orphan = (
                self.daemon.calls.running.get(f"k:{self.identity.name}:{key}") if key else None
            )
            if orphan is not None and not orphan.watchers:
                orphan.cancel()
                log_event("call.cancelled", session=self.id, tool=orphan.tool, orphan=True)
            return  # otherwise unknown or already finished: ignore, as the spec says
        ex, watcher, responder_scope = entry
        responder_scope.cancel()
        if ex.watchers == [watcher]:
            ex.cancel()
        log_event("call.cancelled", session=self.id, tool=ex.tool)
