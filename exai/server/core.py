"""The session core: decoded JSON-RPC messages in, executions and answers out — any transport.

A door (the WebSocket session, the Streamable HTTP door, the old daemon's op protocol) reads
its transport, hands each message's text to :meth:`SessionCore.handle_text` (or an already
decoded message to :meth:`SessionCore.handle_message`), and writes what the core queues in its
:attr:`SessionCore.outbox`. Everything between is here, once:

Admission (nothing is started for a request before it):
    a message first pays the message token bucket (one message per started 256 KiB), before
    it is decoded; then :func:`exai.server.protocol.decode` checks its nesting and element count
    at C speed before building any object. A ``tools/call`` is admitted only if the core's
    :class:`~exai.server.budget.Ledger` (``session_max_pending`` requests and
    ``session_max_pending_bytes`` bytes not yet answered) and the daemon's
    :class:`~exai.server.budget.MemoryBudget` have room; otherwise it is refused at once with
    ``data.reason = "overloaded"``. Only then is its responder task started.

Slots:
    an admitted call takes one of the core's ``session_max_inflight`` slots; when all are busy
    it waits in a FIFO of at most ``session_queue_max`` calls, each until its own deadline
    (``call_timeout_s`` from admission); beyond the FIFO it is refused with "overloaded". The
    identity and daemon-wide slots are then waited for at most ``slot_wait_s``, and the
    identity's slot of the deployment (Redis) after them. Between its session slot and the
    others, a call takes its turn of a scheduler round: once a round has run for
    ``round_budget_s``, calls begin in the rounds after, a few per round
    (:mod:`exai.server.pacing`); the calls waiting for turns are so at most
    ``session_max_inflight`` per connection. A call that waited for any of its other slots
    takes a turn again once it holds them (a freed slot lets its waiters go all at once), and
    one that waited finds out after its turn whether the daemon began to drain (then it is
    handed over or refused). Every one of these waits ends at the call's deadline at the
    latest (``timeout``, its slots given back): they run in the execution's shielded wait
    scope, which nothing else cuts.

Exactly-once:
    a call's key is the client's ``_meta["exai/idempotencyKey"]`` (scoped to its identity;
    claimed across daemons through :class:`~exai.server.shared_calls.SharedCalls`) or the
    core's id and the request id; with the digest of its method and params it names one
    :class:`~exai.server.calls.Execution`, which a re-sent request joins or whose stored answer
    it gets.

Eras and versions:
    every request is vetted by an :class:`~exai.server.protocol.EraGate` — the core's own for a
    connection that keeps one era (WebSocket), or one per request for a door that is told the
    era with each request (Streamable HTTP). A tool's argument errors are answered as the
    *negotiated* version wants (:func:`exai.server.protocol.argument_error_result`).

Progress, cancellation, audit:
    a watcher per request forwards the execution's progress to its ``progressToken`` (advisory:
    dropped and counted when the outbox is full); ``notifications/cancelled`` cancels a call
    down to its upstream request; every refusal before a call runs is audited.

What the core leaves to its door: reading and writing the transport, the transport's own
limits (frame or body size, handshake, the writer's deadline), closing, and draining. The
door gives the core a ``close(code, reason)`` callback (used when a client keeps sending past
its rate) and the nursery its responders run in (:attr:`SessionCore.nursery`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import attrs
import trio

from exai import errors
from exai.config import Settings
from exai.logs import log_event
from exai.resilience import TokenBucket
from exai.server import protocol as p
from exai.server.admission import CallSlots
from exai.server.audit import AuditLog
from exai.server.auth import Identity
from exai.server.budget import Ledger, MemoryBudget
from exai.server.calls import CallRegistry, CallRunner, Changes, Execution, Slot, Watcher
from exai.server.outbox import Outbox
from exai.server.pacing import RoundPacer
from exai.server.pieces import Text, encode_reply_pieces
from exai.server.readiness import Readiness
from exai.server.shared_limits import SharedLimits
from exai.server.stats import DaemonStats
from exai.tools.base import ToolContext, ToolRegistry
from exai.tools.schema import validate

__all__ = [
    "BYTES_PER_MESSAGE_TOKEN",
    "SEND_QUEUE",
    "Handled",
    "SessionCore",
    "SessionShared",
]

_core_ids = itertools.count(1)

#: outgoing messages queued per core at most (bytes are bounded by the pending budget)
SEND_QUEUE = 256
#: a message costs one token of the message bucket per started this many bytes
BYTES_PER_MESSAGE_TOKEN = 256 * 1024
#: an answer larger than this is encoded in pieces (see ``_respond_call``)
LARGE_ANSWER_BYTES = 64 * 1024

#: what :meth:`SessionCore.handle_text` did with a message:
#: ``answered`` — an answer (or a refusal) is queued; ``call`` — a tools/call was admitted and its
#: responder started; ``nothing`` — a notification or a client's response, never answered;
#: ``handed_over`` — a keyed call reached a draining daemon and is left for the client to re-send
#: elsewhere; ``closed`` — the door was asked to close (sustained abuse)
Handled = Literal["answered", "call", "nothing", "handed_over", "closed"]

#: a message decoder: text → one message (the JSON-RPC one, or a door's own translation)
Decoder = Callable[[str], "p.Request | p.Notification | p.Response | p.DecodeError"]


async def _closed(code: int, reason: str) -> None:
    """A released core's ``close``: its door is gone, there is nothing left to close."""


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


@attrs.frozen(kw_only=True)
class SessionShared:
    """What every session core of a daemon shares, handed to each by the composition root
    (:func:`exai.server.services.compose`). Nothing here refers back to the daemon.

    Attributes:
        instance_id: this daemon run's random id (core ids are built on it).
        version: the server version ``initialize`` and ``server/discover`` report.
        instructions: the instructions they report.
        tools: the tools (``tools/list``, and the lookup of a call's tool).
        tool_services: what a tool's :class:`~exai.tools.base.ToolContext` carries.
        readiness: whether new calls are admitted (draining, overloaded).
        slots: the daemon-wide and per-identity call limiters and message buckets.
        budget: the daemon's pending-bytes budget.
        calls: running executions and finished answers (exactly-once).
        runner: runs an admitted call; looks up results other daemons stored.
        changes: notified when a core's calls or responders change.
        stats: counters of refusals and dropped progress.
        slot_wait: a histogram of the time a call waited for its slots.
        audit: one line per call refused before it ran.
        shared_limits: the identity's in-flight and message limits across every daemon.
        pacer: the time budget of a scheduler round for calls' starts and answers
            (:mod:`exai.server.pacing`).
    """

    instance_id: str
    version: str
    instructions: str
    tools: ToolRegistry
    tool_services: dict[str, Any]
    readiness: Readiness
    slots: CallSlots
    budget: MemoryBudget
    calls: CallRegistry
    runner: CallRunner
    changes: Changes
    stats: DaemonStats
    slot_wait: _Observer
    audit: AuditLog
    #: per-identity limits held for the deployment (Redis); ``None`` without Redis
    shared_limits: SharedLimits | None = None
    pacer: RoundPacer = attrs.field(factory=RoundPacer)


@attrs.frozen
class _Served:
    """How one request is served: its era, and the version the client negotiated (``None``
    when it never did: a handshake connection that skipped ``initialize``)."""

    modern: bool
    negotiated: str | None


class SessionCore:
    """The transport-independent part of one session (see the module docstring).

    Args:
        shared: what every core of the daemon shares.
        settings: the daemon's settings when the session was admitted.
        ip: the client's address (for the audit log and the tools).
        identity: who the session authenticated as.
        close: ``close(code, reason)``: the door closes its transport (used when the client
            keeps sending past its rate; WebSocket close codes).
        id: the core's id (default: ``<instance>-s<n>``). Unique across daemons and restarts:
            it is part of the keys that make a call's writes idempotent in a shared store.
        encode: turns a message into the text the door writes (``None`` = drop it); the door
            of the old op protocol translates here.
        encode_large: the same, for a call's answer over :data:`LARGE_ANSWER_BYTES`: encoded
            in pieces, with checkpoints between (:func:`exai.server.pieces.encode_pieces`).
        bucket: the message bucket to charge (default: a new one per core; a door whose
            sessions are shorter than its connections passes the connection's).

    Attributes:
        outbox: what the door writes, in order (answers wait for room, progress is dropped
            when there is none); every byte queued is charged to :attr:`ledger`.
        nursery: where responders run; set by the door before it hands over messages.
        closing_reason: set once the door is closing; the door stops reading.
    """

    #: its HTTP session was ended (``DELETE``) while its call ran, and the call cancelled: the
    #: request still waiting is answered with the error ``session_ended`` for its id, so the
    #: client's pending request settles (set by the HTTP door; a class default: nothing held)
    session_ended = False

    #: admitted calls whose answer is made and is being queued or written (the rest of
    #: ``ledger.count`` still run): a door closing on its peer's word waits a grace for those
    #: that run, and for these as long as its peer reads (exai.server.session)
    answering = 0

    def __init__(
        self,
        shared: SessionShared,
        settings: Settings,
        ip: str,
        identity: Identity,
        *,
        close: Callable[[int, str], Awaitable[None]],
        id: str | None = None,
        encode: Callable[[dict[str, Any]], str | None] = p.encode_reply,
        encode_large: Callable[[dict[str, Any]], Awaitable[Text | None]] = encode_reply_pieces,
        bucket: TokenBucket | None = None,
    ) -> None:
        self.shared = shared
        self.settings = s = settings
        self.ip = ip
        self.identity = identity
        self.id = id or f"{shared.instance_id}-s{next(_core_ids)}"
        self._close = close
        self.encode = encode
        self.encode_large = encode_large
        self.bucket = bucket or TokenBucket(s.session_rate_per_s, s.session_burst)
        # made on first use: most sessions are idle most of the time, and 10,000 of them
        # should cost little memory
        self._limiter: trio.CapacityLimiter | None = None
        self._abuse: TokenBucket | None = None
        self.identity_bucket = shared.slots.identity_bucket(identity.name)
        self.era = p.EraGate()
        # request id (as JSON) → (execution, watcher, responder cancel scope)
        self.inflight: dict[str, tuple[Execution, Watcher, trio.CancelScope]] = {}
        self.ledger = Ledger(s.session_max_pending, s.session_max_pending_bytes, shared.budget)
        self.outbox = Outbox(SEND_QUEUE, s.session_max_pending_bytes, self.ledger)
        #: calls waiting in this core's FIFO for one of its slots
        self.queued = 0
        self.nursery: trio.Nursery | None = None
        self.closing_reason: tuple[int, str] | None = None
        #: called when a responder has finished (answered, refused or cancelled)
        self.on_call_done: Callable[[], None] | None = None
        #: a call of this core was cancelled by its client (``notifications/cancelled``): a
        #: call that ends unanswered without it was handed over or stopped by the daemon
        self.cancelled_by_client = False
        #: whether a request may come again with the same id to this core's id (a WebSocket
        #: session, an HTTP session): then unkeyed answers are kept for it; a core that serves
        #: one request and is gone (a stateless HTTP request) keeps none
        self.ids_recur = True

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """This session's in-flight limiter (``session_max_inflight``)."""
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.settings.session_max_inflight)
        return self._limiter

    @property
    def abuse(self) -> TokenBucket:
        """Rate-limited messages drain this bucket; it refills at a tenth of the message rate.

        A client that keeps sending over its rate empties it and is closed (1008), while
        one that overshoots now and then never is.
        """
        if self._abuse is None:
            self._abuse = TokenBucket(
                max(self.settings.session_rate_per_s / 10, 0.1), self.settings.session_abuse_limit
            )
        return self._abuse

    # ---------------------------------------------------------------- lifecycle
    def detach_all(self) -> None:
        """Stop watching every call of this core: a call nobody else watches is cancelled (or,
        with an idempotency key, left its orphan grace to be adopted by a re-send)."""
        for ex, watcher, _ in list(self.inflight.values()):
            ex.detach(watcher)

    def release_all(self) -> None:
        """The session is over: detach every call, drop what is queued, give every byte back."""
        self.detach_all()
        self.inflight.clear()
        self.nursery = None
        self.outbox.close(drop=True)
        self.ledger.release_all()
        self.shared.changes.notify()
        # The door's bound methods held here (``close``, the outbox's ``direct``) and a door's
        # closure over this core (``on_call_done``) make the session's objects a reference
        # cycle: dropped, they are freed as the session ends instead of waiting for the cycle
        # collector — 70-odd objects per WebSocket session, 20-odd per HTTP request, every one
        # of them walked and freed by a collection that blocks the loop (issue 18).
        self._close = _closed
        self.on_call_done = None
        self.outbox.direct = None

    async def close(self, code: int, reason: str) -> None:
        """Ask the door to close (``closing_reason`` is set first)."""
        self.closing_reason = (code, reason)
        await self._close(code, reason)

    # ---------------------------------------------------------------- output
    async def send(self, msg: dict[str, Any]) -> None:
        """Queue a message that must be delivered (waits for room in the bounded outbox)."""
        text = self.encode(msg)
        if text is None:
            return
        try:
            await self.outbox.put(text)
        except trio.ClosedResourceError:
            pass  # the session is closing; nothing more can be delivered

    def send_progress(self, msg: dict[str, Any]) -> None:
        """Queue an advisory message; dropped (and counted) when the outbox is full — checked
        before the message is encoded, and again with its size."""
        if self.outbox.full():
            self.shared.stats.progress_dropped += 1
            return
        text = self.encode(msg)
        if text is not None and not self.outbox.put_nowait(text):
            self.shared.stats.progress_dropped += 1

    # ---------------------------------------------------------------- input
    def rate_wait(self, text: str) -> float:
        """Take this message's cost from the message buckets; > 0 is how long until it fits."""
        cost = min(1 + len(text) // BYTES_PER_MESSAGE_TOKEN, self.settings.session_burst)
        wait = self.bucket.try_acquire(cost)
        if wait <= 0 and self.identity_bucket is not None:
            wait = self.identity_bucket.try_acquire(min(cost, self.settings.identity_burst))
        return wait

    def decode(self, text: str) -> p.Request | p.Notification | p.Response | p.DecodeError:
        """:func:`exai.server.protocol.decode` with this daemon's limits."""
        s = self.settings
        return p.decode(text, max_depth=s.max_json_depth, max_elements=s.max_json_elements)

    async def handle_text(
        self, text: str, gate: p.EraGate | None = None, *, decoder: Decoder | None = None
    ) -> Handled:
        """Handle one message's text: rate, decode, dispatch.

        Args:
            text: the message (a WebSocket frame, an HTTP body).
            gate: the era gate to vet a request with (default: the core's own).
            decoder: how to decode ``text`` (default: JSON-RPC, :meth:`decode`).
        """
        # Cheap checks first: the message bucket is paid before anything is decoded.
        wait = await self.pay_rate(text)
        if wait > 0:
            return await self.over_rate(text, wait, decoder or self.decode)
        return await self.handle_message((decoder or self.decode)(text), gate)

    async def pay_rate(self, text: str) -> float:
        """Take the message's cost from the local buckets and, with Redis, the identity's
        bucket of the deployment; > 0 is how long until it would fit (then it was not taken
        from the later buckets)."""
        wait = self.rate_wait(text)
        limits = self.shared.shared_limits
        if wait <= 0 and self.identity_bucket is not None and limits is not None:
            # the identity's message rate holds for the deployment (Redis), after the local
            # buckets admitted the message
            cost = min(1 + len(text) // BYTES_PER_MESSAGE_TOKEN, self.settings.identity_burst)
            wait = await limits.message_wait(self.identity.name, cost)
        return wait

    async def handle_message(
        self,
        msg: p.Request | p.Notification | p.Response | p.DecodeError,
        gate: p.EraGate | None = None,
    ) -> Handled:
        """Dispatch one decoded message (its rate already paid)."""
        if isinstance(msg, p.DecodeError):
            await self.send(p.error(msg.id, msg.code, msg.message, msg.data))
            return "answered"
        if isinstance(msg, p.Response):
            return "nothing"  # the daemon sends no requests that need answers
        if isinstance(msg, p.Notification):
            if msg.method == "notifications/cancelled":
                self.cancel(msg.params)
            return "nothing"  # notifications/initialized and others need no action
        return await self.handle_request(msg, gate or self.era)

    async def over_rate(self, text: str, wait: float, decoder: Decoder) -> Handled:
        """A message over the message rate: answered without decoding it (the id is peeked
        at), except a cancellation, which is never rate limited: it frees resources."""
        peeked = p.peek(text)
        if peeked.method is None or peeked.method == "notifications/cancelled":
            # a cancellation, or a message whose head says nothing: decode it (bounded work)
            msg = decoder(text)
            if isinstance(msg, p.Notification) and msg.method == "notifications/cancelled":
                self.cancel(msg.params)
                return "nothing"
            if isinstance(msg, p.Request):
                peeked = p.Peeked(msg.id, msg.method)
            elif not isinstance(msg, p.DecodeError):
                peeked = p.Peeked(None, "")
        self.shared.stats.rejections["rate_limited"] += 1
        if self.abuse.try_acquire(1) > 0:
            log_event("session.abuse_closed", logging.WARNING, session=self.id, ip=self.ip)
            await self.close(1008, "message rate limit exceeded repeatedly")
            return "closed"
        handled: Handled = "nothing"
        if peeked.id is not None or peeked.method is None:
            exc = errors.RateLimitedError(
                f"more than {self.settings.session_rate_per_s:g} messages/s on this "
                "connection; slow down",
                retry_after_s=wait,
            )
            await self.send(p.error_from_exception(peeked.id, exc))
            handled = "answered"
        # Stop reading this connection for one message interval: TCP back-pressure then
        # slows a flooding client down, so its refusals cannot take the CPU that other
        # sessions need. Every request still gets its answer.
        await trio.sleep(min(wait, 1.0 / self.settings.session_rate_per_s))
        return handled

    async def handle_request(self, req: p.Request, gate: p.EraGate) -> Handled:
        """Vet ``req`` with ``gate`` and answer it, or admit it as a call."""
        method, params = req.method, req.params
        try:
            version = gate.admit(method, params)
            served = _Served(
                gate.modern, version if gate.modern or gate.version is not None else None
            )
            if method == "tools/call":
                return await self._start_call(req, served)
            if method == "initialize":
                requested = params.get("protocolVersion")
                res = p.initialize_result(
                    requested if isinstance(requested, str) else None,
                    server_version=self.shared.version,
                    instructions=self.shared.instructions,
                )
            elif method == "server/discover":
                res = p.discover_result(
                    server_name="exai",
                    server_version=self.shared.version,
                    instructions=self.shared.instructions,
                )
            elif method == "ping":
                res = {}
            elif method == "tools/list":
                res = {"tools": self.shared.tools.to_mcp()}
            else:
                raise errors.MethodNotFound(f"method not found: {method!r}")
            await self.send(p.result(req.id, p.finalize_result(method, res, modern=gate.modern)))
        except errors.ExaiError as exc:
            await self.send(p.error_from_exception(req.id, exc))
        return "answered"

    def _response(self, req_id: Any, payload: dict[str, Any], served: _Served) -> dict[str, Any]:
        """The response to a call, as the request's era and negotiated version want it (at send
        time: a stored answer may be re-sent to a request of another era or version)."""
        if "result" in payload:
            res = payload["result"]
        else:
            res = p.argument_error_result(payload["error"], served.negotiated)
            if res is None:
                return {"jsonrpc": "2.0", "id": req_id, **payload}
        return p.result(req_id, p.finalize_result("tools/call", res, modern=served.modern))

    # ---------------------------------------------------------------- tools/call
    async def _start_call(self, req: p.Request, served: _Served) -> Handled:
        """Admit the call, then start its responder; a call that does not fit is refused."""
        readiness = self.shared.readiness
        overloaded = readiness.overloaded_reason
        if readiness.draining and p.idempotency_key(req.params):
            # Handed over, not refused: the client re-sends a keyed call (same id, same key)
            # when its connection closes, and its door closes as soon as its running calls are
            # answered, so the call runs on a daemon that is not stopping and the client never
            # sees an error.
            self.shared.stats.rejections["handed_over"] += 1
            return "handed_over"
        if readiness.draining:
            refusal: str | None = "the daemon is shutting down; retry on the next one"
        elif overloaded is not None:
            refusal = f"the daemon is not accepting new calls ({overloaded})"
        else:
            refusal = self.ledger.refusal(req.cost_bytes)
        if refusal is not None:
            self.shared.stats.rejections["overloaded"] += 1
            exc = errors.OverloadedError(refusal, retry_after_s=1.0)
            self._audit_refusal(req, exc)
            # (waits for room like any answer: a client that does not read stops being read)
            await self.send(p.error_from_exception(req.id, exc))
            return "answered"
        self.ledger.admit(req.cost_bytes)
        assert self.nursery is not None, "the door sets the nursery before handing over messages"
        self.nursery.start_soon(self._respond_call, req, served)
        return "call"

    async def _respond_call(self, req: p.Request, served: _Served) -> None:
        charged = req.cost_bytes
        answering = False
        try:
            payload = await self._run_call(req)
            if payload is None:
                return  # cancelled by notifications/cancelled: no response, by the spec
            self.answering += 1
            answering = True
            # From here the answer is what this request holds, not its arguments.
            size = max(payload[1], 0)
            self.ledger.add(size - charged)
            charged = size
            await self.outbox.wait_room(size)
            text: Text | None
            if size > LARGE_ANSWER_BYTES:
                # A large answer is encoded in pieces, a step each (exai.server.pieces): one
                # call encoding 16 MiB held the loop ≈ 0.1 s. A small one is encoded at once, in
                # one call and the same step (every scheduler round costs CPU at concurrency 1).
                text = await self.encode_large(self._response(req.id, payload[0], served))
            else:
                text = self.encode(self._response(req.id, payload[0], served))
            if text is not None:
                # (written by this task when nothing is queued: no hand-off to the writer)
                await self.outbox.put(text, direct=True)
        except trio.ClosedResourceError:
            pass  # the session is closing
        finally:
            if answering:
                self.answering -= 1
            self.ledger.done(charged)
            self.shared.changes.notify()  # (a draining daemon waits for its sessions' answers)
            if self.on_call_done is not None:
                self.on_call_done()

    async def _run_call(self, req: p.Request) -> tuple[dict[str, Any], int] | None:
        """The call's payload (``{"result"}`` or ``{"error"}``) and its size, or ``None``."""
        id_key = _id_key(req.id)
        calls = self.shared.calls
        owner = False
        try:
            name, args = p.tools_call_params(req.params)
            client_key = p.idempotency_key(req.params)
            digest = p.call_digest(req.method, req.params)
            # A client's key is scoped to its identity: another token holder can neither join
            # the call nor read its result.
            key = f"k:{self.identity.name}:{client_key}" if client_key else f"s:{self.id}:{id_key}"
            ex = calls.running.get(key)
            if ex is not None and ex.digest != digest:
                raise errors.InvalidRequest(
                    f"request id {_clip_id(req.id)} is already in use by a call that is still "
                    "running; JSON-RPC ids must be unique among requests in flight",
                    data={"field": "id", "id": req.id},
                )
            if ex is None:
                stored = calls.finished(key)
                if stored is not None and stored.digest == digest:
                    return stored.payload, stored.nbytes
                # (the same id asking something else after the first finished: a new call)
                spec = self.shared.tools.get(name)
                if spec is None:
                    raise errors.InvalidParams(f"unknown tool: {name!r}", field="name")
                validate(spec.input_schema, args)
                timeout = spec.timeout_s if spec.timeout_s is not None else None
                # Reserve the key before the first await: a duplicate that arrives while this
                # request looks for a shared result or waits for slots joins it instead of
                # running the tool a second time.
                ex = Execution(
                    key=key,
                    tool=name,
                    client_key=bool(client_key),
                    digest=digest,
                    deadline=trio.current_time() + (timeout or self.settings.call_timeout_s),
                    keep=bool(client_key) or self.ids_recur,
                )
                calls.running[key] = ex
                owner = True
        except errors.ExaiError as exc:
            self._audit_refusal(req, exc)
            return {"error": p.error_from_exception(None, exc)["error"]}, 0
        watcher = Watcher(self.send_progress, p.progress_token(req.params))
        with trio.CancelScope() as responder_scope:
            entry = (ex, watcher, responder_scope)
            self.inflight[id_key] = entry
            ex.attach(watcher)
            try:
                if owner:
                    # An unkeyed call whose slots are all free starts at once: nothing waits,
                    # so no scope is needed to shield the wait.
                    # A call begins in a scheduler round only while the round is within its
                    # time budget (exai.server.pacing): a storm's intake does not stall the
                    # loop. One that must wait waits in _launch once it holds its session slot
                    # (_start ends the reservation if it never starts); so does a keyed call,
                    # which first looks for a result elsewhere (with Redis, a round trip).
                    paced = not ex.client_key and self.shared.pacer.try_turn()
                    launched = self._launch_now(ex, req) if paced else None
                    if launched is None:
                        # the start belongs to the execution, not to this responder: requests
                        # that joined still want it if this one goes (bounded by its deadline)
                        with ex.wait_scope:
                            launched = await self._start(ex, args, req, paced=paced)
                    if launched is not None:
                        # An unkeyed call runs in its responder's task (one task per call, not
                        # two): it cannot outlive its session anyway (its last watcher leaving
                        # cancels it), and only requests of this session can join it. This
                        # responder's own scope is cancelled by notifications/cancelled only
                        # while no later request of the same id joined (the cancel finds the
                        # latest), so it then is the only watcher and Execution.cancel() would
                        # follow anyway.
                        await self.shared.runner.run(ex, args, launched.ctx, launched.held)
                if not ex.done.is_set():
                    # (an already finished call is not waited for: Event.wait would still
                    # yield to the scheduler once, a round that costs CPU at concurrency 1)
                    await ex.done.wait()
                if ex.payload is not None:
                    return ex.payload, ex.payload_bytes
            finally:
                if self.inflight.get(id_key) is entry:
                    del self.inflight[id_key]
                ex.detach(watcher)
                self.shared.changes.notify()
        return None

    async def _start(
        self, ex: Execution, args: dict[str, Any], req: p.Request, *, paced: bool = True
    ) -> _Launched | None:
        """Answer a reserved execution from another daemon's stored result, or start it.

        Returns what the caller needs to run an unkeyed execution in its own task (see
        :meth:`_launch`); ``None`` when it was answered, refused, or started in the runner.

        Whatever stops it from starting (no slot in time, shutting down, cancellation) ends
        the reservation, so the joined duplicates get the same answer and a later retry runs.
        ``paced``: whether the call has its scheduler round's turn already
        (:meth:`~exai.server.pacing.RoundPacer.try_turn`); if not, it takes one once it holds
        its session slot (:meth:`_launch`).
        """
        shared = self.shared
        started = False
        launched = None
        try:
            elsewhere = None
            if ex.client_key:
                # a result another daemon stored, or the one it is running now
                elsewhere = await shared.runner.claim(ex)
            if elsewhere is not None:
                ex.payload = elsewhere
                ex.payload_bytes = shared.calls.store(ex.key, ex.digest, elsewhere)
            else:
                launched = await self._launch(ex, args, req, paced=paced)
                started = True
        except _HandedOver:
            shared.stats.rejections["handed_over"] += 1  # no answer: re-sent elsewhere
        except errors.ExaiError as exc:
            # every refusal of a call before it began is counted here, the one place they all
            # pass (no slot, its deadline ending a wait for a slot or its turn, the drain
            # beginning while it waited, another daemon's run past its deadline); the runner
            # counts the calls it ran
            shared.stats.rejections[exc.reason] += 1
            self._audit_refusal(req, exc)
            ex.payload = {"error": p.error_from_exception(None, exc)["error"]}
        finally:
            if not started:
                await shared.runner.release_claim(ex)
                shared.calls.running.pop(ex.key, None)
                ex.done.set()
                shared.changes.notify()
        return launched

    async def _session_slot(self, ex: Execution) -> bool:
        """Take one of this session's slots, waiting in its FIFO until the call's deadline;
        whether it had to wait.

        Raises:
            OverloadedError: every slot is busy and the FIFO is full.
            DeadlineExceeded: the call's deadline passed while it waited.
        """
        limiter = self.limiter
        try:
            limiter.acquire_on_behalf_of_nowait(ex)
            return False
        except trio.WouldBlock:
            pass
        s = self.settings
        if self.queued >= s.session_queue_max:
            raise errors.OverloadedError(
                f"this connection's {s.session_max_inflight} in-flight calls are all busy and "
                f"{self.queued} more are waiting (EXAI_SESSION_QUEUE_MAX="
                f"{s.session_queue_max}); retry shortly",
                retry_after_s=1.0,
            )
        self.queued += 1
        try:
            with trio.move_on_at(ex.deadline):
                await limiter.acquire_on_behalf_of(ex)
                return True
        finally:
            self.queued -= 1
        raise errors.DeadlineExceeded(
            f"tool {ex.tool!r} waited for one of this connection's {s.session_max_inflight} "
            "slots until its deadline"
        )

    async def _answer_room(self, ex: Execution) -> bool:
        """Wait (until the call's deadline) for room for one more answer before starting it;
        whether it had to wait.

        A request costs little when admitted, but its answer may be large: a session that
        holds ``session_max_pending_bytes`` of unread answers starts no new call until the
        client reads, and no session starts one while its pool of the daemon's budget is
        used up (see :class:`~exai.server.budget.MemoryBudget`). So beyond the budget there can
        only be the answers of calls already running.

        Raises:
            DeadlineExceeded: the deadline passed first.
        """
        room = self._answer_room_now
        if room():
            return False
        with trio.move_on_at(ex.deadline):
            await self.shared.budget.wait_until(room)
            return True
        raise errors.DeadlineExceeded(
            f"tool {ex.tool!r} waited until its deadline for this connection's unread answers "
            "to be read"
        )

    def _answer_room_now(self) -> bool:
        """Whether one more answer may start now (see :meth:`_answer_room`)."""
        budget, ledger = self.shared.budget, self.ledger
        if ledger.nbytes >= self.settings.session_max_pending_bytes:
            return False
        if budget.charged_bytes < budget.limit_bytes:
            return True
        if not ledger.light or self.limiter.borrowed_tokens > 1:
            # (answers still to come count too: only a session's one call at a time may
            # start from the reserve)
            return budget.heavy_bytes < budget.limit_bytes
        return budget.light_bytes < budget.reserve_bytes

    def _launch_now(self, ex: Execution, req: p.Request) -> _Launched | None:
        """An unkeyed call's start when nothing has to wait — the daemon is not draining, the
        session, identity and daemon-wide slots are free (taken here, in that order, as
        :meth:`_launch` takes them), there is room for its answer, it is the session's only
        call and no deployment-wide slot is needed: its context and slots, as :meth:`_launch`
        returns them. ``None`` with nothing taken otherwise; then :meth:`_start` takes the
        way that waits, refuses or hands over (the same checks again, in the same order)."""
        shared = self.shared
        if shared.readiness.draining:
            return None
        slots = shared.slots
        ident_limiter = slots.identity_limiter(self.identity.name)
        if ident_limiter is not None and shared.shared_limits is not None:
            return None
        limiter = self.limiter
        try:
            limiter.acquire_on_behalf_of_nowait(ex)
        except trio.WouldBlock:
            return None
        held: list[Slot] = [limiter]
        try:
            if limiter.borrowed_tokens > 1 or not self._answer_room_now():
                return None
            for other in (ident_limiter, slots.inflight):
                if other is not None:
                    other.acquire_on_behalf_of_nowait(ex)
                    held.append(other)
        except trio.WouldBlock:
            return None
        finally:
            if len(held) < (3 if ident_limiter is not None else 2):
                for taken in held:
                    taken.release_on_behalf_of(ex)
        shared.slot_wait.observe(0.0)
        return _Launched(self._context(ex, req), held)

    def _context(self, ex: Execution, req: p.Request) -> ToolContext:
        return ToolContext(
            settings=self.settings,
            services=self.shared.tool_services,
            request_id=req.id,
            call_key=ex.call_key,
            session_id=self.id,
            client=self.identity.name,
            peer=self.ip,
        )

    async def _launch(
        self, ex: Execution, args: dict[str, Any], req: p.Request, *, paced: bool = True
    ) -> _Launched | None:
        """Take the session slot (FIFO, until the call's deadline), then the call's turn of a
        scheduler round unless ``paced`` (it had one) and the slot was free at once — a call
        that waited for its slot begins rounds later, so it takes a turn then — then room for
        its answer and the identity and global slots within ``slot_wait_s`` (and the
        identity's slot of the deployment), and a turn again if it had to wait for any of
        them; then hand a keyed execution to the daemon's call runner (it may outlive this
        session: a reconnecting bridge adopts it), and return an unkeyed one's context and
        slots for its responder to run it (:meth:`~exai.server.calls.CallRunner.run`).

        The turn comes after the session slot: the calls waiting for turns are then at most
        ``session_max_inflight`` per connection, so one connection's queued calls cannot put a
        lone client's call behind all of them (:mod:`exai.server.pacing`). A call that waited
        finds out after its turn whether the daemon began to drain meanwhile: then it is
        handed over or refused, as it would have been had it come a moment later."""
        shared = self.shared
        slots = shared.slots
        self._refuse_if_draining(ex)
        started = trio.current_time()
        waited = await self._session_slot(ex)
        # local limiters, and the deployment-wide identity slot
        held: list[Slot] = [self.limiter]
        try:
            if waited or not paced:
                await self._turn(ex)
            # (from here: whether it waited since its turn, so begins in a later round)
            waited = await self._answer_room(ex)
            if self.limiter.borrowed_tokens > 1:
                # A session's second and later concurrent calls take a shared slot too,
                # waiting (until the deadline) while a quarter of the daemon's slots is left
                # for sessions running one call each: a bridge multiplexing a whole
                # editor does not make everyone else wait for a slot.
                waited = True  # (acquire_on_behalf_of is a schedule point, even when free)
                with trio.move_on_at(ex.deadline):
                    await slots.shared_inflight.acquire_on_behalf_of(ex)
                    held.append(slots.shared_inflight)
                if len(held) == 1:
                    raise errors.DeadlineExceeded(
                        f"tool {ex.tool!r} waited for a slot until its deadline"
                    )
        except BaseException:
            for limiter in held:
                limiter.release_on_behalf_of(ex)
            raise
        base = len(held)
        # then per client identity → global; all or none, within slot_wait_s
        wanted: list[tuple[trio.CapacityLimiter, str]] = []
        ident_limiter = slots.identity_limiter(self.identity.name)
        if ident_limiter is not None:
            wanted.append(
                (ident_limiter, f"client {self.identity.name!r}'s {ident_limiter.total_tokens}")
            )
        wanted.append((slots.inflight, f"the daemon's {self.settings.max_inflight}"))
        try:
            # free slots are taken at once; a cancel scope is opened only to wait for one
            for limiter, _ in wanted:
                try:
                    limiter.acquire_on_behalf_of_nowait(ex)
                except trio.WouldBlock:
                    break
                held.append(limiter)
            if len(held) < len(wanted) + base:
                waited = True
                with trio.move_on_at(self._slot_wait_until(ex)):
                    for limiter, _ in wanted[len(held) - base :]:
                        await limiter.acquire_on_behalf_of(ex)
                        held.append(limiter)
            shared.slot_wait.observe(trio.current_time() - started)
            if len(held) < len(wanted) + base:
                self._raise_if_expired(ex)
                which = wanted[len(held) - base][1]
                raise errors.OverloadedError(
                    f"{which} in-flight calls are all busy; retry shortly",
                    retry_after_s=self.settings.slot_wait_s,
                )
            if ident_limiter is not None and shared.shared_limits is not None:
                # the identity's limit holds for the deployment, not per daemon (Redis)
                slot = None
                waited = True
                with trio.move_on_at(self._slot_wait_until(ex)):
                    slot = await shared.shared_limits.identity_slot(self.identity.name, ex.key)
                if slot is None:
                    self._raise_if_expired(ex)
                    raise errors.OverloadedError(
                        f"client {self.identity.name!r}'s {ident_limiter.total_tokens} in-flight "
                        "calls across the deployment are all busy; retry shortly",
                        retry_after_s=self.settings.slot_wait_s,
                    )
                held.append(slot)
            if waited:
                # let go by a freed slot (with every other waiter a release lets go at once)
                # or by the client's reads: it begins rounds after its turn, so a turn again
                await self._turn(ex)
        except BaseException:
            for limiter in held:
                limiter.release_on_behalf_of(ex)
            raise
        ctx = self._context(ex, req)
        if not ex.client_key:
            return _Launched(ctx, held)
        shared.runner.start(ex, args, ctx, held)
        return None

    def _slot_wait_until(self, ex: Execution) -> float:
        """When a wait for an identity or daemon-wide slot ends: after ``slot_wait_s``, or at
        the call's deadline if that comes first."""
        return min(ex.deadline, trio.current_time() + self.settings.slot_wait_s)

    def _raise_if_expired(self, ex: Execution) -> None:
        """A wait for slots ended without them: at the call's deadline it is answered as
        expired, as a call whose deadline ends any other of its waits is.

        Raises:
            DeadlineExceeded: the deadline has passed.
        """
        if trio.current_time() >= ex.deadline:
            raise errors.DeadlineExceeded(
                f"tool {ex.tool!r} waited for a slot until its deadline"
            )

    async def _turn(self, ex: Execution) -> None:
        """Take the call's turn of a scheduler round (:meth:`RoundPacer.turn
        <exai.server.pacing.RoundPacer.turn>`), waiting for it until the call's deadline, as
        for its slots; then — it may have waited for it, and for its slots before — the call is
        handed over or refused if the daemon began to drain meanwhile
        (:meth:`_refuse_if_draining`).

        Raises:
            DeadlineExceeded: the deadline passed while it waited (in the execution's shielded
                wait scope nothing else cut the wait: the call kept its slots until its turn).
        """
        pacer = self.shared.pacer
        if not pacer.try_turn():  # (a turn that passes at once needs no scope)
            with trio.move_on_at(ex.deadline) as bound:
                await pacer.turn()
            if bound.cancelled_caught:
                raise errors.DeadlineExceeded(
                    f"tool {ex.tool!r} waited for its turn to begin until its deadline"
                )
        self._refuse_if_draining(ex)

    def _refuse_if_draining(self, ex: Execution) -> None:
        """A call about to begin on a draining daemon: a keyed one is handed over (its client
        re-sends it elsewhere, see :meth:`_start_call`), an unkeyed one refused.

        Raises:
            _HandedOver: a keyed call.
            OverloadedError: an unkeyed call.
        """
        if self.shared.readiness.draining:
            if ex.client_key:
                raise _HandedOver
            raise errors.OverloadedError(
                "the daemon is shutting down; retry on the next one", retry_after_s=1.0
            )

    def _audit_refusal(self, req: p.Request, exc: errors.ExaiError) -> None:
        """An audit line for a call refused before it ran (bad arguments, no slot, …)."""
        name = req.params.get("name")
        self.shared.audit.record(
            tool=name if isinstance(name, str) else "",
            outcome=exc.reason,
            client=self.identity.name,
            peer=self.ip,
            duration_s=0.0,
            session=self.id,
            request_id=req.id,
        )

    # ---------------------------------------------------------------- cancellation
    def cancel(self, params: dict[str, Any]) -> bool:
        """``notifications/cancelled``: cancel the call ``params["requestId"]`` names, or — for a
        bridge that reconnected — the orphaned call of the ``_meta`` idempotency key. Returns
        whether a call was found (an unknown or finished one is ignored, as the spec says)."""
        rid = params.get("requestId")
        entry = self.inflight.get(_id_key(rid)) if isinstance(rid, (str, int)) else None
        if entry is None:
            # Unknown here — but a bridge that reconnected sends the call's idempotency key
            # with the cancel: an execution of that key that nobody watches any more is
            # cancelled rather than left to its orphan grace.
            try:
                key = p.idempotency_key(params)
            except errors.InvalidParams:
                return False  # (a notification is never answered)
            orphan = self.shared.calls.running.get(f"k:{self.identity.name}:{key}") if key else None
            if orphan is not None and not orphan.watchers:
                orphan.cancel()
                log_event("call.cancelled", session=self.id, tool=orphan.tool, orphan=True)
                return True
            return False
        ex, watcher, responder_scope = entry
        self.cancelled_by_client = True
        responder_scope.cancel()
        if ex.watchers == [watcher]:
            ex.cancel()
        log_event("call.cancelled", session=self.id, tool=ex.tool)
        return True


@attrs.frozen
class _Launched:
    """An unkeyed execution ready to run in its responder's task: its context, and the slots
    it holds (released when it ends)."""

    ctx: ToolContext
    held: list[Slot]


class _HandedOver(Exception):
    """A keyed call that reached a draining daemon: left unanswered for its client to re-send
    to another daemon once its door closes."""


def _id_key(rid: Any) -> str:
    """A request id as JSON (``1`` and ``"1"`` are different ids); an integer's text is its
    JSON."""
    return str(rid) if type(rid) is int else json.dumps(rid)


def _clip_id(rid: Any) -> str:
    text = json.dumps(rid, ensure_ascii=True)
    return text if len(text) <= 80 else text[:79] + "…"
