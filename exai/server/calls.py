"""Executions of ``tools/call``: the exactly-once registry and the runner.

An :class:`Execution` is one run of a tool. One started with the client's idempotency key lives
in the runner's calls nursery, not in the session that started it, so that a bridge which lost
its connection can reconnect and *join* the execution instead of running the tool again; one
without a key cannot outlive its session (it is cancelled when its last watcher leaves), so it
runs in the task of the request that started it — one task per call, not two. Sessions attach
to an execution as watchers (to receive its progress and its result) and detach when they close.

The lifecycle, in order: a session reserves the execution's key in the :class:`CallRegistry`
(``running``), takes its slots, and hands it to :meth:`CallRunner.start` (keyed) or runs
:meth:`CallRunner.run` itself (unkeyed); the run is the tool under the call's deadline with a
heartbeat, stores the answer (here and, for a client's
idempotency key, in the store shared by daemons), releases the slots, counts, times and audits
the call, and wakes every watcher.

Resource handling:
    An execution holds one slot of its session's limiter and one of the global limiter from
    before it starts until it ends (released in ``finally``). When its last watcher detaches,
    an execution started without an idempotency key is cancelled at once; one started with a
    key (a bridge that will re-send) is given ``orphan_grace_s`` to be adopted, then cancelled.
    :class:`CallRunner` is an async context manager owning the nursery keyed executions run in.

The :class:`CallRegistry` maps a key — the client's ``_meta["exai/idempotencyKey"]`` or, when
absent, ``session id + request id`` — to the running execution or to its finished response,
kept for ``ttl_s``, at most ``max_entries`` of them and ``max_bytes`` in all (oldest first
out), each answer's text stored once (:func:`~exai.server.compact.compact`) and pickled: a
stored answer is one ``bytes`` object, which the cycle collector never walks, instead of the
half-dozen dicts and lists of its JSON — 10,000 answers kept for ten minutes were most of the
objects every full collection walked (issue 18). Every entry carries the digest of the request
that made it (:func:`exai.server.protocol.call_digest`): the same key asking another question is
another call, never answered from this one.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import pickle
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol

import attrs
import trio

from exai import errors
from exai.config import Settings
from exai.logs import log_event
from exai.server import protocol as p
from exai.server.audit import AuditLog
from exai.server.compact import approx_size, compact, expand
from exai.server.shared_calls import SharedCalls
from exai.server.stats import DaemonStats
from exai.tools.base import ToolContext, ToolRegistry

__all__ = [
    "CallRegistry",
    "CallRunner",
    "Changes",
    "Execution",
    "Finished",
    "SharedResults",
    "Watcher",
]

_ids = itertools.count(1)


@attrs.define(eq=False)
class Watcher:
    """A session waiting for an execution: where to send progress (``None`` = no progress)."""

    send_progress: Callable[[dict[str, Any]], None]
    progress_token: str | int | None


@attrs.define(eq=False)
class Execution:
    """One run of a tool, joined by every request with the same key and digest.

    Attributes:
        key: the exactly-once key (``k:<identity>:<idempotency key>`` or
            ``s:<session>:<request id>``).
        digest: :func:`exai.server.protocol.call_digest` of the request that started it.
        deadline: when the call must have finished (``trio.current_time()`` clock), fixed at
            admission: time spent waiting for a slot counts against it.
        payload_bytes: the answer's size as stored (:func:`approx_size`), once done.
    """

    key: str
    tool: str
    client_key: bool
    digest: str = ""
    deadline: float = float("inf")
    payload_bytes: int = 0
    #: the run: cancelled by :meth:`cancel`, and at ``deadline`` (then ``cancelled`` is False)
    scope: trio.CancelScope = attrs.field(
        default=attrs.Factory(
            lambda self: trio.CancelScope(deadline=self.deadline), takes_self=True
        )
    )
    #: the wait for a shared result and slots before the run: shielded from the responder
    #: that started it (other requests may have joined), cancelled only by :meth:`cancel`
    wait_scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    done: trio.Event = attrs.field(factory=trio.Event)
    adopted: trio.Event = attrs.field(factory=trio.Event)
    orphaned: trio.Event = attrs.field(factory=trio.Event)
    watchers: list[Watcher] = attrs.field(factory=list)
    payload: dict[str, Any] | None = None  # {"result": …} or {"error": …}
    cancelled: bool = False
    #: keep the answer in the registry for a re-sent request; ``False`` when no request can
    #: ever name this execution again (an HTTP request's own one-shot id)
    keep: bool = True
    started_at: float = 0.0
    progress_value: float = 0.0
    number: int = attrs.field(factory=lambda: next(_ids))

    @property
    def shared_key(self) -> str:
        """The key of this call's result in the store shared by daemons (client keys only)."""
        return f"{self.key.removeprefix('k:')}#{self.digest}"

    @property
    def call_key(self) -> str:
        """The key a tool makes its own writes idempotent with: a request id reused for
        another question (another digest) is another call."""
        return f"{self.key}~{self.digest}"

    def attach(self, watcher: Watcher) -> None:
        self.watchers.append(watcher)
        if self.client_key:  # (only a keyed execution is ever orphaned: see detach)
            if self.orphaned.is_set():
                self.orphaned = trio.Event()
            self.adopted.set()

    def detach(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)
        if not self.watchers and not self.done.is_set():
            if self.client_key:
                # give a reconnecting bridge time to re-send and adopt this execution
                self.adopted = trio.Event()
                self.orphaned.set()
            else:
                self.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        self.wait_scope.cancel()
        self.scope.cancel()

    def progress(
        self,
        message: str | None,
        *,
        make: Callable[..., dict[str, Any]],
        value: float | None = None,
        total: float | None = None,
    ) -> None:
        """Send a progress notification to every watcher that asked for progress.

        The MCP spec wants the value to strictly increase. A tool's own ``value`` (and
        ``total``) is passed on when it is above the last one sent; otherwise — a heartbeat,
        or a tool going backwards — the last value plus a thousandth is sent, without a total.
        """
        if value is not None and value > self.progress_value:
            self.progress_value = float(value)
        else:
            self.progress_value = round(self.progress_value + 0.001, 6)
            total = None
        for w in list(self.watchers):
            if w.progress_token is not None:
                w.send_progress(make(w.progress_token, self.progress_value, total, message))


@attrs.frozen
class Finished:
    """A finished call's answer as the registry gives it back."""

    digest: str
    payload: dict[str, Any]
    nbytes: int


#: a stored answer at least this large (:func:`approx_size`) keeps its long strings out of
#: its pickle (:func:`_freeze`)
FREEZE_APART_BYTES = 64 * 1024
#: a string longer than this is kept apart from a large answer's pickle
_APART_CHARS = 16 * 1024

_Frozen = bytes | tuple[bytes, tuple[str, ...]] | dict[str, Any]


class _LongApart(pickle.Pickler):
    """A pickler that leaves out every string longer than :data:`_APART_CHARS` (kept
    beside the pickle, in :attr:`long`)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.long: list[str] = []

    def persistent_id(self, obj: Any) -> int | None:
        if type(obj) is str and len(obj) > _APART_CHARS:
            self.long.append(obj)
            return len(self.long) - 1
        return None


class _LongBack(pickle.Unpickler):
    def __init__(self, data: bytes, long: tuple[str, ...]) -> None:
        super().__init__(io.BytesIO(data))
        self.long = long

    def persistent_load(self, pid: Any) -> str:
        return self.long[pid]


def _freeze(payload: dict[str, Any], nbytes: int = 0) -> _Frozen:
    """A stored answer as the registry keeps it: pickled, one ``bytes`` object the cycle
    collector never walks (a dict, its lists and dicts are walked by every full collection for
    as long as they are kept). Only this process reads it back (:func:`_thaw`). An answer that
    cannot be pickled (a tool's odd object in it) is kept as it is.

    A large one (``nbytes`` over :data:`FREEZE_APART_BYTES`) keeps its long strings beside
    the pickle, as they are (a ``str`` is no container: the collector never walks it either):
    pickling them copied and encoded every byte in one step (≈ 10 ms for 16 MiB, issue 18).
    """
    try:
        if nbytes < FREEZE_APART_BYTES:
            return pickle.dumps(payload, pickle.HIGHEST_PROTOCOL)
        buf = io.BytesIO()
        pickler = _LongApart(buf)
        pickler.dump(payload)
        return (buf.getvalue(), tuple(pickler.long)) if pickler.long else buf.getvalue()
    except (pickle.PicklingError, TypeError, AttributeError, ValueError, RecursionError):
        return payload


def _thaw(stored: _Frozen) -> dict[str, Any]:
    # (only ever what _freeze made)
    if isinstance(stored, bytes):
        payload: dict[str, Any] = pickle.loads(stored)
        return payload
    if isinstance(stored, tuple):
        data, long = stored
        thawed: dict[str, Any] = _LongBack(data, long).load()
        return thawed
    return stored


class CallRegistry:
    """Running executions and finished answers by key, bounded in count, bytes and time.

    Finished answers are kept for ``ttl_s``, at most ``max_entries`` of them and ``max_bytes``
    in all (:func:`approx_size` of the stored form, the answer text stored once: see
    :func:`compact`); the oldest go first. Each is kept pickled (see :func:`_freeze`). An
    answer larger than ``max_bytes`` on its own is not kept: a re-send of its request runs
    again, as after the TTL.
    """

    def __init__(
        self, *, ttl_s: float, max_entries: int, max_bytes: int, orphan_grace_s: float
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.orphan_grace_s = orphan_grace_s
        self.running: dict[str, Execution] = {}
        # key → (expires_at, digest, compacted payload as kept by _freeze, bytes)
        self._finished: OrderedDict[str, tuple[float, str, _Frozen, int]] = (
            OrderedDict()
        )
        self.nbytes = 0
        #: answers dropped before their TTL to stay within the byte or count budget
        self.evicted = 0
        #: answers too large to keep at all
        self.too_large = 0

    def finished(self, key: str) -> Finished | None:
        """The stored answer of ``key`` (expanded), or ``None``."""
        item = self._finished.get(key)
        if item is None:
            return None
        expires_at, digest, payload, nbytes = item
        if expires_at <= trio.current_time():
            self._drop(key)
            return None
        return Finished(digest, expand(_thaw(payload)), nbytes)

    def store(self, key: str, digest: str, payload: dict[str, Any]) -> int:
        """Keep ``payload`` for ``key``; returns its size in bytes as stored."""
        now = trio.current_time()
        stored = compact(payload)
        nbytes = approx_size(stored)
        if key in self._finished:
            self._drop(key)
        if nbytes > self.max_bytes:
            self.too_large += 1
        else:
            self._finished[key] = (now + self.ttl_s, digest, _freeze(stored, nbytes), nbytes)
            self.nbytes += nbytes
        while self._finished:
            oldest_key, (exp, _, _, _) = next(iter(self._finished.items()))
            over = len(self._finished) > self.max_entries or self.nbytes > self.max_bytes
            if not over and exp > now:
                break
            self._drop(oldest_key)
            if over:
                self.evicted += 1
        return nbytes

    def _drop(self, key: str) -> None:
        item = self._finished.pop(key, None)
        if item is not None:
            self.nbytes -= item[3]

    def shrink(self, keep_fraction: float = 1.0) -> int:
        """Drop expired answers, then the oldest until at most ``keep_fraction`` of
        ``max_bytes`` is held (memory pressure). Returns how many were dropped."""
        now = trio.current_time()
        expired = [k for k, (exp, _, _, _) in self._finished.items() if exp <= now]
        for k in expired:
            self._drop(k)
        dropped = len(expired)
        while self._finished and self.nbytes > keep_fraction * self.max_bytes:
            self._drop(next(iter(self._finished)))
            self.evicted += 1
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._finished)

    async def orphan_watch(self, ex: Execution) -> None:
        """Cancel ``ex`` when it has had no watcher for ``orphan_grace_s``."""
        while True:
            await ex.orphaned.wait()
            with trio.move_on_after(self.orphan_grace_s):
                await ex.adopted.wait()
            if not ex.watchers:
                ex.cancel()
                return


class Changes:
    """A wake-up for whoever waits until executions, sessions or responders have changed.

    :meth:`notify` is called by whatever changed them (an execution ending, a session closing);
    :meth:`wait_for` re-checks its predicate on every notification. Used by the daemon's drain.
    """

    def __init__(self) -> None:
        # (a parking lot: notified several times per call, mostly with nobody waiting, which
        # costs nothing here where an Event was made anew each time)
        self._waiters = trio.lowlevel.ParkingLot()

    def notify(self) -> None:
        """Wake :meth:`wait_for` waiters."""
        if self._waiters:  # (unparking nobody still cost ≈ 0.8 µs, several times a call)
            self._waiters.unpark_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (re-checked on every :meth:`notify`); the caller
        bounds the wait."""
        while not predicate():
            await self._waiters.park()


class Slot(Protocol):
    """A slot an execution holds until it ends: a ``trio.CapacityLimiter`` held on its behalf,
    or a deployment-wide one (:class:`exai.server.shared_limits.SharedSlot`)."""

    def release_on_behalf_of(self, borrower: Any) -> None: ...


class SharedResults(Protocol):
    """Finished results shared by every daemon (Redis), keyed by the client's idempotency key
    (:class:`exai.storage.IdempotencyResults`)."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def put(self, key: str, payload: dict[str, Any], ttl_s: float) -> None: ...


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Histogram(Protocol):
    def labels(self, *labelvalues: str) -> _Observer: ...


class CallRunner:
    """Runs executions in its nursery, each under its deadline, and finishes them.

    Args:
        settings: ``call_timeout_s`` (a tool without its own timeout), ``heartbeat_interval_s``,
            ``store_timeout_s`` and ``idempotency_ttl_s`` (the shared results).
        tools: where each execution's tool is looked up.
        calls: the registry the answers are stored in and the running executions removed from.
        stats: counts each call by outcome and by tool.
        call_duration: a histogram labelled ``(tool, outcome)``.
        audit: one line per call.
        changes: notified when an execution ends.
        shared: the results shared by daemons (``None`` without Redis).

    Resource handling:
        ``async with runner:`` owns the calls nursery; leaving it waits for every execution
        (the daemon's drain cancels them past its bound).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        tools: ToolRegistry,
        calls: CallRegistry,
        stats: DaemonStats,
        call_duration: _Histogram,
        audit: AuditLog,
        changes: Changes,
        shared: SharedResults | None = None,
    ) -> None:
        self.settings = settings
        self.tools = tools
        self.calls = calls
        self.stats = stats
        self.call_duration = call_duration
        self.audit = audit
        self.changes = changes
        self.shared = shared
        #: exactly-once across daemons (claim / join / finish in Redis), set by the daemon's
        #: composition when it has Redis; then it replaces ``shared``'s lookup and write
        self.shared_calls: SharedCalls | None = None
        self._claimed: set[str] = set()  # keys of the calls this daemon claimed
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: AbstractAsyncContextManager[trio.Nursery] | None = None
        #: running executions due a heartbeat, oldest due first: ``[due, execution]`` (the
        #: execution is set to ``None`` when it ends, so the entry holds no answer)
        self._beats: collections.deque[list[Any]] = collections.deque()
        self._beat_wakeup = trio.Event()
        self._beat_stop = False
        #: the histogram's child per (tool, outcome): ``labels()`` takes a lock and builds keys
        self._timers: dict[tuple[str, str], _Observer] = {}

    async def __aenter__(self) -> CallRunner:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        if self.settings.heartbeat_interval_s > 0:
            self._nursery.start_soon(self._heartbeats, name="exai.heartbeats")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery_cm is not None
        assert self._nursery is not None
        try:
            # the heartbeat ticker ends with the last call (the drain waits for calls only)
            if self.settings.heartbeat_interval_s > 0:
                self._beat_stop = True
                self._beat_wakeup.set()
            return await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery = None

    def start(
        self,
        ex: Execution,
        args: dict[str, Any],
        ctx: ToolContext,
        limiters: list[Slot],
    ) -> None:
        """Start ``ex`` in the calls nursery; its slots (``limiters``, held on behalf of ``ex``)
        are released when it ends."""
        assert self._nursery is not None, "the runner is not open"
        self._nursery.start_soon(
            self.run, ex, args, ctx, limiters, name=f"call:{ex.tool}:{ex.key[:40]}"
        )

    async def shared_result(self, client_key: str) -> dict[str, Any] | None:
        """A result stored by another daemon for ``client_key`` (Redis), if configured."""
        store = self.shared
        if store is None:
            return None
        try:
            with trio.move_on_after(self.settings.store_timeout_s):
                result: dict[str, Any] | None = await store.get(client_key)
                return result
        except errors.ExaiError:
            return None
        return None

    async def claim(self, ex: Execution) -> dict[str, Any] | None:
        """Before a keyed call runs here: the result another daemon stored for it, or — while
        another daemon runs it — that daemon's result once it has one (the wait is bounded by
        the call's deadline, with heartbeats to the client); ``None`` when this daemon is to
        run it (see :mod:`exai.server.shared_calls`).

        Raises:
            DeadlineExceeded: the call's deadline passed while another daemon ran it.
        """
        sc = self.shared_calls
        if sc is None:
            return await self.shared_result(ex.shared_key)
        deadline = ex.deadline
        if deadline == float("inf"):
            deadline = trio.current_time() + self.settings.call_timeout_s
        # the run key outlives this daemon's deadline for the call a little; a daemon that
        # dies frees it sooner (its liveness key lapses)
        run_ttl_s = max(1.0, deadline - trio.current_time()) + 5.0
        claim = await sc.claim(ex.shared_key, run_ttl_s)
        if claim.kind == "running":
            log_event("call.joined_elsewhere", tool=ex.tool, owner=claim.owner_id)
            async with trio.open_nursery() as nursery:
                ex.started_at = trio.current_time()
                nursery.start_soon(self._heartbeat, ex)
                with trio.move_on_at(deadline):
                    claim = await sc.join(ex.shared_key, run_ttl_s, claim)
                nursery.cancel_scope.cancel()
            if claim.kind == "running":
                raise errors.DeadlineExceeded(
                    f"tool {ex.tool!r}: the daemon running this call did not finish it before "
                    "its deadline"
                )
        if claim.kind == "owner":
            self._claimed.add(ex.key)
        return claim.result

    async def release_claim(self, ex: Execution) -> None:
        """A claimed call that will not run here after all: let another daemon run it."""
        sc = self.shared_calls
        if sc is None or ex.key not in self._claimed:
            return
        self._claimed.discard(ex.key)
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.store_timeout_s):
            await sc.finish(ex.shared_key, None)

    async def run(
        self,
        ex: Execution,
        args: dict[str, Any],
        ctx: ToolContext,
        limiters: list[Slot],
    ) -> None:
        """Run one tool call under its deadline; store its response; release its slots."""
        spec = self.tools.get(ex.tool)
        assert spec is not None
        timeout = spec.timeout_s if spec.timeout_s is not None else self.settings.call_timeout_s
        ex.started_at = trio.current_time()
        if ex.deadline == float("inf"):
            ex.deadline = ex.scope.deadline = ex.started_at + timeout
        outcome = "ok"

        async def progress(
            progress: float | None = None, total: float | None = None, message: str | None = None
        ) -> None:
            ex.progress(message, make=p.progress_notification, value=progress, total=total)

        ctx.progress = progress
        beat = self._beat(ex)
        try:
            with ex.scope:
                if ex.client_key:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.calls.orphan_watch, ex)
                        outcome = await self._run_tool(ex, spec, args, ctx)
                        nursery.cancel_scope.cancel()
                else:
                    outcome = await self._run_tool(ex, spec, args, ctx)
            if ex.scope.cancelled_caught:
                if ex.cancelled:
                    outcome = "cancelled"
                    ex.payload = None
                else:
                    # the deadline, fixed at admission: waiting for a slot counted
                    exc = errors.DeadlineExceeded(
                        f"tool {ex.tool!r} did not finish within its deadline of {timeout:g}s"
                    )
                    ex.payload = {"error": p.error_from_exception(None, exc)["error"]}
                    outcome = "timeout"
        except trio.Cancelled:
            # cancelled from outside: an unkeyed call run by its responder, whose session is
            # going (or the daemon stopping)
            outcome = "cancelled"
            ex.payload = None
            raise
        finally:
            if beat is not None:
                beat[1] = None
                if self._beat_stop:
                    self._beat_wakeup.set()  # (the ticker may be waiting for this call)
            self.calls.running.pop(ex.key, None)
            if ex.payload is not None:
                ex.payload_bytes = (
                    self.calls.store(ex.key, ex.digest, ex.payload)
                    if ex.keep
                    else approx_size(ex.payload)
                )
            await self._share_result(ex)
            for limiter in limiters:
                limiter.release_on_behalf_of(ex)
            self.stats.calls[outcome] += 1
            self.stats.by_tool[(ex.tool, outcome)] += 1
            timer = self._timers.get((ex.tool, outcome))
            if timer is None:
                timer = self._timers[(ex.tool, outcome)] = self.call_duration.labels(
                    ex.tool, outcome
                )
            timer.observe(trio.current_time() - ex.started_at)
            ex.done.set()
            self.changes.notify()
            duration_s = trio.current_time() - ex.started_at
            self.audit.record(
                tool=ex.tool,
                outcome=outcome,
                client=ctx.client,
                peer=ctx.peer,
                provider=ctx.annotations.get("provider"),
                model=ctx.annotations.get("model"),
                key_fp=ctx.annotations.get("key_fingerprint"),
                duration_s=duration_s,
                session=ctx.session_id,
                request_id=ctx.request_id,
            )
            log_event(
                "call.finished",
                tool=ex.tool,
                client=ctx.client,
                outcome=outcome,
                duration_s=round(trio.current_time() - ex.started_at, 4),
                provider=ctx.annotations.get("provider"),
                model=ctx.annotations.get("model"),
            )

    async def _run_tool(
        self, ex: Execution, spec: Any, args: dict[str, Any], ctx: ToolContext
    ) -> str:
        """Run the tool (its deadline is ``ex.scope``'s); sets ``ex.payload``, returns the
        outcome."""
        try:
            result = await spec.handler(args, ctx)
            ex.payload = {"result": result.to_mcp()}
            return "ok"
        except Exception as raw:
            exc2 = errors.unwrap_exception(raw)
            if isinstance(exc2, errors.ExaiError):
                ex.payload = {"error": p.error_from_exception(None, exc2)["error"]}
                return exc2.reason
            log_event("call.crashed", logging.ERROR, tool=ex.tool, exc_type=type(exc2).__name__)
            ex.payload = {
                "error": p.error(
                    None,
                    -32603,
                    f"internal error in tool {ex.tool!r} ({type(exc2).__name__})",
                    {"reason": "internal_error"},
                )["error"]
            }
            return "internal_error"

    def _beat(self, ex: Execution) -> list[Any] | None:
        """Schedule ``ex``'s heartbeats (one ticker for every call, not a task per call)."""
        interval = self.settings.heartbeat_interval_s
        if interval <= 0:
            return None
        entry: list[Any] = [ex.started_at + interval, ex]
        self._beats.append(entry)
        if len(self._beats) == 1:
            self._beat_wakeup.set()
        return entry

    async def _heartbeats(self) -> None:
        """Send each running call a heartbeat (progress) every ``heartbeat_interval_s``.

        One task for all calls: every entry is due ``interval`` after it was queued, so the
        queue stays in due order by appending (a call is re-queued after each beat).
        """
        interval = self.settings.heartbeat_interval_s
        beats = self._beats
        while True:
            if not beats:
                if self._beat_stop:
                    return  # the runner is closing and no call is left running
                self._beat_wakeup = trio.Event()
                await self._beat_wakeup.wait()
                continue
            entry = beats[0]
            ex = entry[1]
            if ex is None:  # ended
                beats.popleft()
                continue
            now = trio.current_time()
            if entry[0] > now:
                self._beat_wakeup = trio.Event()
                with trio.move_on_at(entry[0]):
                    await self._beat_wakeup.wait()
                continue
            beats.popleft()
            elapsed = now - ex.started_at
            ex.progress(f"{ex.tool}: still working ({elapsed:.0f}s)", make=p.progress_notification)
            entry[0] = now + interval
            beats.append(entry)

    async def _share_result(self, ex: Execution) -> None:
        sc = self.shared_calls
        if sc is not None and ex.client_key:
            # the result for every daemon (first one wins), and the run key dropped; a call
            # cancelled here leaves no result, so a daemon waiting for it runs it
            self._claimed.discard(ex.key)
            with trio.CancelScope(shield=True), trio.move_on_after(self.settings.store_timeout_s):
                await sc.finish(ex.shared_key, ex.payload)
            return
        store = self.shared
        if store is None or not ex.client_key or ex.payload is None:
            return
        with trio.move_on_after(self.settings.store_timeout_s) as scope:
            scope.shield = True  # finishing bookkeeping even while being cancelled
            try:
                await store.put(ex.shared_key, ex.payload, self.settings.idempotency_ttl_s)
            except errors.ExaiError:
                pass

    async def _heartbeat(self, ex: Execution) -> None:
        interval = self.settings.heartbeat_interval_s
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            elapsed = trio.current_time() - ex.started_at
            ex.progress(f"{ex.tool}: still working ({elapsed:.0f}s)", make=p.progress_notification)
