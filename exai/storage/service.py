"""The conversation service the tools use: threads, limits, durability, cache and replay.

::

    async with ConversationService.open(settings, bridge=bridge) as conversations:
        thread = await conversations.start_or_continue(args.get("continuation_id"), "chat")
        messages = build_history(thread, token_budget=100_000)  # exai.tools.history
        ...                                              # call the model
        thread = await conversations.add_turns(
            thread, [Turn(role="user", content=prompt, tool="chat"),
                     Turn(role="assistant", content=answer, tool="chat",
                          provider="kimi", model=model)],
            idempotency_key=call_key,
        )
        remaining = conversations.turns_remaining(thread)

Durability: :meth:`ConversationService.add_turns` returns only once the turns are committed to
the primary store or fsync'd to the local spool. The primary store sits behind its breaker, and
each call is bounded by ``settings.store_timeout_s`` inside the caller's own deadline (at most
80 % of what is left of it, so a failed write still leaves time to spool). When the breaker is
open or the write fails retryably, the turns go to the spool and the call succeeds; when the
spool is full it fails with :class:`~exai.errors.StorageUnavailableError`
(``data.reason = "storage_unavailable"``) and nothing is written. A background task replays the
spool, idempotently and in order, as soon as the store's breaker closes (that transition is the
signal, not a poll), record by record. A new turn of a thread that still has spooled turns first
pushes that thread's spooled turns to the store (order is kept) and is then written directly; only
while the store is down does it queue behind them in the spool. Reads merge spooled turns in.

Ownership: a thread belongs to the client identity that created it (``owner``); any other identity
gets exactly the answer an unknown id gets, unless
``settings.conversation_shared_across_identities`` is on. Thread ids are random (uuid4, 122
bits). A call re-run under the same exactly-once key (after a crash) continues the thread its
first run created: the store keeps each thread's *creation key* (a digest of owner and call key)
under a unique index and sends the re-run's write to that thread.

Thread creation is lazy: a new thread is only an id until its first turns are written (the
store creates the row with them), so a call that fails leaves no empty thread behind.

Resource handling:
    :meth:`ConversationService.open` owns the store, the spool, the Redis client and a task
    group running the replay, invalidation and expiry tasks. Leaving it normally first gives the
    replay up to ``settings.spool_flush_timeout_s`` to empty the spool, then cancels the tasks and
    closes everything; whatever is left stays on disk and is replayed by the next start.

Error handling:
    :class:`~exai.errors.ConversationNotFound`: unknown, malformed or expired
    ``continuation_id``. :class:`~exai.errors.InvalidParams` (``field="continuation_id"``): the
    thread is out of turns or bytes. :class:`~exai.errors.StorageUnavailableError`: store down
    and spool full. Reads while the store is down and the cache misses raise
    :class:`~exai.errors.CircuitOpenError` or :class:`~exai.errors.StoreUnavailableError`.
    Store errors that leave the service carry a message without any server detail (no path,
    host or driver text: those go to the log as ``store.error``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import anyio
import attrs

from exai.config import Settings
from exai.errors import (
    CircuitOpenError,
    ConversationNotFound,
    InvalidParams,
    StorageUnavailableError,
    StoreError,
    StoreUnavailableError,
)
from exai.logs import log_event
from exai.resilience import CircuitBreaker
from exai.resilience import loop as aio
from exai.resilience.backoff import Backoff, DrainStatistics, Wakeup, drain_loop
from exai.storage.base import ConversationStore
from exai.storage.breakers import on_close, store_breaker
from exai.storage.model import Thread, Turn, turn_key
from exai.storage.recent import RecentThreads
from exai.storage.redis_cache import (
    GuardedRedis,
    IdempotencyResults,
    ThreadCache,
    _breaker_status,
)
from exai.storage.replay import SpoolReplay
from exai.storage.spool import Spool, open_spool
from exai.storage.stores import open_store, store_kind

__all__ = ["ConversationService", "creation_key", "new_thread_id"]

T = TypeVar("T")

_THREAD_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_START_NEW = "start a new thread (omit continuation_id)"


def new_thread_id() -> str:
    """A fresh ``continuation_id``: a random uuid4 (122 random bits from ``os.urandom``), so
    nothing logged (session ids, request ids, idempotency keys) lets anyone derive it."""
    return str(uuid.uuid4())


def creation_key(owner: str, call_key: str) -> str:
    """The key a new thread is created under: a digest of the owner and the call's
    exactly-once key (stored, never shown; a re-run of the call finds its thread by it)."""
    # (surrogatepass: a lone surrogate in a client's key must not make this raise)
    return hashlib.sha256(f"{owner}\0{call_key}".encode("utf-8", "surrogatepass")).hexdigest()[:40]


class ConversationService:
    """Threads over a primary store, a spool and an optional Redis cache.

    Build it with :meth:`open`; the constructor is for tests that assemble the parts.

    Args:
        settings: limits (turns, bytes, TTL), ``store_timeout_s``, the thread cache budget,
            whether threads are shared across identities.
        store: the primary store (opened).
        spool: the local spool (opened).
        breaker: the primary store's breaker.
        cache: the Redis thread cache, if any.
        idempotency: the Redis idempotency results, if any.
        clock: wall-clock seconds for timestamps and TTL decisions (tests pass their own).
        replay_min_delay_s, replay_max_delay_s: the replay's backoff after a pass that applied
            nothing (never shorter than the breaker's retry time).
    """

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        spool: Spool,
        *,
        breaker: CircuitBreaker,
        cache: ThreadCache | None = None,
        idempotency: IdempotencyResults | None = None,
        clock: Callable[[], float] = time.time,
        replay_min_delay_s: float = 0.05,
        replay_max_delay_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.breaker = breaker
        self.cache = cache
        self.idempotency = idempotency
        self.clock = clock
        # The last store view of recently used threads: read only while the store is down.
        self.recent = RecentThreads(max_entries=1024, max_bytes=settings.thread_cache_max_bytes)
        self.replay = SpoolReplay(
            settings=settings,
            store=store,
            spool=spool,
            breaker=breaker,
            primary=self._primary,
            recent=self.recent,
            cache=cache,
            min_delay_s=replay_min_delay_s,
            max_delay_s=replay_max_delay_s,
        )
        self._redis_backoff = Backoff(
            replay_min_delay_s, max(replay_min_delay_s, replay_max_delay_s)
        )
        self.invalidation_stats = DrainStatistics()
        self._redis_recovered = Wakeup()
        if cache is not None:
            on_close(cache.guard.breaker, self._redis_recovered)
        self.spooled_writes = 0
        self.redirected_writes = 0

    @property
    def replay_stats(self) -> DrainStatistics:
        """The replay's passes, errors and records."""
        return self.replay.stats

    @property
    def replay_rejected(self) -> int:
        """Spooled records the store refused for good (set aside, see ``docs/storage.md``)."""
        return self.replay.rejected

    @property
    def replay_errors(self) -> int:
        """Replay passes that failed (the store was away)."""
        return self.replay.stats.errors

    async def wait_replayed(self) -> None:
        """Return once the spool is empty and every cache invalidation delivered; bound it
        with the caller's deadline."""
        await self.replay.wait_replayed()

    async def flush(self, timeout_s: float) -> bool:
        """Give the replay up to ``timeout_s`` to empty the spool (graceful shutdown); True
        when it is empty. Redis invalidations are not waited for (Redis is a cache)."""
        return await self.replay.flush(timeout_s)

    # -- construction -------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        *,
        bridge: Any = None,
        store: ConversationStore | None = None,
        spool: Spool | None = None,
        cache: ThreadCache | None = None,
        clock: Callable[[], float] = time.time,
        breaker: CircuitBreaker | None = None,
        redis_breaker: CircuitBreaker | None = None,
        cache_ttl_s: float = 300.0,
        replay_min_delay_s: float = 0.05,
        replay_max_delay_s: float = 5.0,
    ) -> AsyncIterator[ConversationService]:
        """Open the store ``settings`` names (migrating it), the spool in the state directory,
        Redis when ``settings.redis_url`` is set, and the background tasks.

        Args:
            bridge: the daemon's :class:`~exai.storage.aio_bridge.AsyncioBridge`; needed for
                PostgreSQL and Redis. When None and one is needed, the service opens its own.
            store: an opened store to use instead of the one the settings name (tests,
                embedding); the caller keeps closing it.
            spool: an opened spool to use instead of the one in the state directory (tests);
                the caller keeps closing it.
            cache: a Redis thread cache to use instead of one built from ``redis_url``
                (tests); its guard is used for idempotency results too.
            breaker: the primary store's breaker (default :func:`store_breaker`).
            redis_breaker: Redis's breaker (default :func:`store_breaker` named ``redis``).
            cache_ttl_s: the longest a thread stays in the Redis cache.

        Raises:
            ConfigError: a bad storage URL.
            StoreUnavailableError: the primary store cannot be reached at start.
            StoreError: the store refuses to open (a corrupt SQLite file: the message names
                the file and how to recover).
        """
        url = settings.effective_storage_url
        kind = store.kind if store is not None else store_kind(url)
        async with AsyncExitStack() as stack:
            needs_bridge = (kind == "postgres" and store is None) or (
                settings.redis_url and cache is None
            )
            if bridge is None and needs_bridge:
                from exai.storage.aio_bridge import open_asyncio_bridge

                bridge = await stack.enter_async_context(open_asyncio_bridge())
            if store is None:
                store = await stack.enter_async_context(open_store(settings, bridge))
            if spool is None:
                stem = "turns-" + hashlib.sha256(url.encode()).hexdigest()[:12]
                spool = await stack.enter_async_context(
                    open_spool(
                        settings.state_path / "spool",
                        stem,
                        max_bytes=settings.spool_max_bytes,
                        io_timeout_s=settings.store_timeout_s,
                    )
                )
            idem = None
            if cache is not None:
                idem = IdempotencyResults(cache.guard, prefix=cache.prefix)
            elif settings.redis_url:
                from exai.storage.aio_bridge import BridgedRedis

                redis = BridgedRedis.from_url(
                    bridge,
                    settings.redis_url.reveal(),
                    max_connections=settings.redis_pool_max,
                    socket_timeout_s=settings.store_timeout_s,
                )
                stack.push_async_callback(_bounded_shielded, redis.aclose, settings.store_timeout_s)
                guard = GuardedRedis(
                    redis,
                    redis_breaker or store_breaker("redis", settings),
                    call_timeout_s=settings.store_timeout_s,
                )
                cache = ThreadCache(guard, prefix=settings.redis_key_prefix, ttl_s=cache_ttl_s)
                idem = IdempotencyResults(guard, prefix=settings.redis_key_prefix)
            service = cls(
                settings,
                store,
                spool,
                breaker=breaker or store_breaker(f"store:{kind}", settings),
                cache=cache,
                idempotency=idem,
                clock=clock,
                replay_min_delay_s=replay_min_delay_s,
                replay_max_delay_s=replay_max_delay_s,
            )
            async with _single_errors(), anyio.create_task_group() as tg:
                tg.start_soon(service.replay.run)
                if cache is not None:
                    tg.start_soon(service._invalidation_loop)
                tg.start_soon(service._expire_loop)
                try:
                    yield service
                except BaseException:
                    tg.cancel_scope.cancel()
                    raise
                # a graceful end: give the replay a bounded chance to empty the spool
                await service.flush(settings.spool_flush_timeout_s)
                tg.cancel_scope.cancel()

    # -- reading --------------------------------------------------------------------------
    async def start_or_continue(
        self,
        continuation_id: str | None,
        tool: str,
        *,
        call_key: str = "",
        owner: str = "anonymous",
    ) -> Thread:
        """A new thread (``continuation_id`` None) owned by ``owner``, or the live thread
        ``continuation_id`` names if ``owner`` may use it.

        ``tool`` is the tool continuing it: any tool may continue any thread. ``call_key`` is
        the call's exactly-once key: a new thread is created under it, so a re-run of the
        call continues the thread its first run created.

        Raises:
            ConversationNotFound: unknown, malformed, expired, or another identity's id (the
                same answer for each: no oracle); the message says to start a new thread.
            InvalidParams: the thread has no turns left (``field="continuation_id"``).
            CircuitOpenError, StoreUnavailableError: the store cannot be read.
        """
        owner = _storable_key(owner)
        if continuation_id is None:
            ck = creation_key(owner, call_key) if call_key else None
            if ck is not None:
                # a re-run of a call whose first run is still in the spool: the same thread
                spooled = self.spool.thread_for_creation_key(ck)
                if spooled is not None:
                    found = self._merge_spool(spooled, self.recent.get(spooled))
                    if found is not None and self._may_use(found, owner):
                        return found
            now = self.clock()
            return Thread(
                id=new_thread_id(),
                created_at=now,
                updated_at=now,
                expires_at=now + self.settings.conversation_ttl_s,
                owner=owner,
                creation_key=ck,
            )
        if not isinstance(continuation_id, str) or not _THREAD_ID.match(continuation_id):
            raise ConversationNotFound(
                f"continuation_id is not a valid thread id; {_START_NEW}",
                data={"continuation_id": str(continuation_id)[:128]},
            )
        thread = await self.get_thread(continuation_id)
        if thread is None or thread.expired(self.clock()) or not self._may_use(thread, owner):
            raise ConversationNotFound(
                f"conversation {continuation_id} does not exist or has expired; {_START_NEW}",
                data={"continuation_id": continuation_id},
            )
        if self.turns_remaining(thread) <= 0:
            raise InvalidParams(
                f"conversation {continuation_id} has used all its "
                f"{self.settings.conversation_max_turns} turns; {_START_NEW}",
                field="continuation_id",
            )
        return thread

    def _may_use(self, thread: Thread, owner: str) -> bool:
        """Whether ``owner`` may read and continue ``thread`` (see docs/security.md)."""
        if self.settings.conversation_shared_across_identities:
            return True
        # a thread written before ownership was recorded (owner None) belongs to nobody
        return thread.owner is not None and thread.owner == owner

    async def get_thread(self, thread_id: str) -> Thread | None:
        """The thread as the store has it plus its spooled turns, or None. Expiry and
        ownership are not checked here (see :meth:`start_or_continue`).

        Raises:
            CircuitOpenError, StoreUnavailableError: the store cannot be read, the cache
                misses and the spool does not hold the whole thread.
        """
        stored: Thread | None = None
        gen: bytes | None = None
        cached = None
        if self.cache is not None:
            cached, gen = await self.cache.lookup(thread_id)
        if cached is not None:
            stored = cached
        else:
            try:
                stored = await self._primary(self.store.get_thread, thread_id)
            except (CircuitOpenError, StoreUnavailableError):
                if not self._known_is_whole(thread_id):
                    raise
                stored = self.recent.get(thread_id)
            else:
                if self.cache is not None and stored is not None:
                    await self.cache.fill(stored, gen, now=self.clock())
        if stored is not None:
            self.recent.put(stored)
        return self._merge_spool(thread_id, stored)

    def _known_is_whole(self, thread_id: str) -> bool:
        """While the store cannot be read: True when the thread as this process last saw it
        in the store, plus its spooled turns, is the whole thread (no turn in between)."""
        known = self.recent.get(thread_id)
        pending = self.spool.pending(thread_id)
        if known is None and not pending:
            return False
        have = len(known.turns) if known is not None else 0
        return not pending or pending[0].base <= have

    def shrink_caches(self) -> int:
        """Forget the in-process copies of recent threads (memory pressure); returns how many.

        They only serve reads while the store is down; the store and the spool keep
        everything.
        """
        return self.recent.clear()

    def _merge_spool(self, thread_id: str, stored: Thread | None) -> Thread | None:
        pending = self.spool.pending(thread_id)
        if not pending:
            return stored
        turns = [t for r in pending for t in r.turns]
        if stored is None:
            first = min(t.created_at or 0.0 for t in turns)
            stored = Thread(
                id=thread_id,
                created_at=first,
                updated_at=first,
                expires_at=first + self.settings.conversation_ttl_s,
                owner=pending[0].owner,
                creation_key=pending[0].creation_key,
            )
        return stored.with_turns(turns, ttl_s=self.settings.conversation_ttl_s)

    def turns_remaining(self, thread: Thread) -> int:
        """Turns the thread may still take."""
        return max(0, self.settings.conversation_max_turns - len(thread.turns))

    def check_room(self, thread: Thread, *, turns: int, sizes: Mapping[str, int]) -> None:
        """Refuse, before any upstream call, a call whose turns the thread could not store.

        ``turns`` is how many turns the call will write; ``sizes`` the bytes of what the
        caller sends that will be stored, by the argument's name (``{"arguments.prompt":
        n}``). The model's answer is not counted: an answer that was paid for is always kept
        (bounded by the provider's answer cap); the next call on a thread it filled is
        refused here, before paying.

        Raises:
            InvalidParams: out of turns (``field="arguments.continuation_id"``) or bytes (the
                field is the largest of ``sizes``), with the numbers and what to do.
        """
        s = self.settings
        used = len(thread.turns)
        if used + turns > s.conversation_max_turns:
            left = max(0, s.conversation_max_turns - used)
            raise InvalidParams(
                f"conversation {thread.id} has {left} of its {s.conversation_max_turns} turns "
                f"left and this call stores {turns}; {_START_NEW}",
                field="arguments.continuation_id",
            )
        have = thread.size_bytes
        adding = sum(sizes.values())
        if not sizes or have + adding <= s.conversation_max_bytes:
            return
        field, size = max(sizes.items(), key=lambda kv: kv[1])
        if size > s.conversation_max_bytes or not thread.turns:
            raise InvalidParams(
                f"{field} is {size} bytes, more than the {s.conversation_max_bytes} bytes a "
                "conversation can hold (EXAI_CONVERSATION_MAX_BYTES); shorten it",
                field=field,
            )
        raise InvalidParams(
            f"{field} is {size} bytes and conversation {thread.id} already holds {have} of its "
            f"{s.conversation_max_bytes} bytes; shorten {field} or {_START_NEW}",
            field=field,
        )

    # -- writing --------------------------------------------------------------------------
    async def add_turns(
        self,
        thread: Thread | str,
        turns: Sequence[Turn],
        idempotency_key: str,
        *,
        owner: str = "anonymous",
    ) -> Thread:
        """Append ``turns`` to ``thread`` durably; the thread as it is now.

        ``idempotency_key`` identifies the call (the daemon core's request key): the i-th turn
        is stored under ``<key>#<i>``, so repeating a call writes nothing twice. Missing
        ``created_at`` is stamped with the clock. A thread given by id that does not exist
        yet is created owned by ``owner``. The returned thread's id may differ from
        ``thread``'s when this call re-ran under the key that created another thread: the
        turns went there (see :func:`creation_key`).

        Raises:
            InvalidParams: the turns would exceed the thread's turn limit, or what the caller
                sent (every turn but the model's answers) its byte limit.
            StorageUnavailableError: the store is unavailable and the spool is full.
            StoreError: the store rejected the write for another reason.
        """
        if isinstance(thread, str):
            found = await self.get_thread(thread)
            if found is None:
                now = self.clock()
                found = Thread(
                    id=thread,
                    created_at=now,
                    updated_at=now,
                    expires_at=now + self.settings.conversation_ttl_s,
                    owner=_storable_key(owner),
                )
            thread = found
        now = self.clock()
        # keys stay distinct: a surrogate becomes its escape, not a replacement char
        key = _storable_key(idempotency_key)
        # Text a store cannot hold (NUL for PostgreSQL, lone surrogates for any UTF-8 store)
        # is replaced here rather than spooled and refused at every replay.
        contents = [await _storable(t.content) for t in turns]
        prepared = [
            Turn(
                role=t.role,
                content=content,
                tool=t.tool,
                provider=t.provider,
                model=t.model,
                files=tuple([await _storable(f) for f in t.files]) if t.files else (),
                created_at=t.created_at if t.created_at is not None else now,
                thread_id=thread.id,
                seq=None,
                idempotency_key=turn_key(key, i),
            )
            for i, (t, content) in enumerate(zip(turns, contents, strict=True))
        ]
        after = thread.with_turns(prepared, ttl_s=self.settings.conversation_ttl_s)
        self._check_limits(thread, after, prepared)
        base = len(thread.turns)
        creating = thread.creation_key if base == 0 else None
        if self.spool.has_pending(thread.id):
            try:
                # keep the thread's order: push its spooled turns to the store first
                await self.replay.flush_thread(thread.id)
            except (CircuitOpenError, StoreUnavailableError):
                pass
            if self.spool.has_pending(thread.id):
                # the store is still away: queue behind them
                await self._spool_write(thread, prepared, base, creating, cause=None)
                return after
        try:
            result = await self._primary(
                functools.partial(
                    self.store.append_turns,
                    thread.id,
                    prepared,
                    owner=thread.owner,
                    creation_key=creating,
                )
            )
        except (CircuitOpenError, StoreUnavailableError) as exc:
            await self._spool_write(thread, prepared, base, creating, cause=exc)
            return after
        if result.thread_id and result.thread_id != thread.id:
            after = await self._redirected(thread, result.thread_id)
        else:
            self.recent.put(after)
        if self.cache is not None:
            await self.cache.invalidate(after.id)
        return after

    async def _redirected(self, thread: Thread, other: str) -> Thread:
        """The thread a re-run's write landed in (it was created by the first run)."""
        self.redirected_writes += 1
        log_event("conversation.redirected", thread_id=other)
        try:
            found = await self.get_thread(other)
        except (CircuitOpenError, StoreUnavailableError):
            found = None
        return found if found is not None else attrs.evolve(thread, id=other)

    async def add_turn(
        self, thread: Thread | str, turn: Turn, idempotency_key: str, *, owner: str = "anonymous"
    ) -> Thread:
        """:meth:`add_turns` with one turn."""
        return await self.add_turns(thread, [turn], idempotency_key, owner=owner)

    def _check_limits(self, before: Thread, after: Thread, adding: Sequence[Turn]) -> None:
        s = self.settings
        if len(after.turns) > s.conversation_max_turns:
            raise InvalidParams(
                f"conversation {before.id} would exceed its limit of {s.conversation_max_turns} "
                f"turns ({len(before.turns)} used); {_START_NEW}",
                field="continuation_id",
            )
        # Only what the caller sent counts here: a model's answer was paid for and is kept
        # (check_room refuses the next call on a full thread before it pays).
        sent = sum(t.size_bytes for t in adding if t.role != "assistant")
        if sent and before.size_bytes + sent > s.conversation_max_bytes:
            raise InvalidParams(
                f"conversation {before.id} would exceed its limit of {s.conversation_max_bytes} "
                f"bytes ({before.size_bytes} used); {_START_NEW}",
                field="continuation_id",
            )

    async def _spool_write(
        self,
        thread: Thread,
        turns: list[Turn],
        base: int,
        creating: str | None,
        *,
        cause: BaseException | None,
    ) -> None:
        try:
            await self.spool.append(
                thread.id, turns, base=base, owner=thread.owner, creation_key=creating
            )
        except StorageUnavailableError as full:
            if cause is not None:
                raise full from cause
            raise
        self.spooled_writes += 1
        self.replay.work.set()

    # -- the primary store under its breaker and the deadline ----------------------------
    async def _primary(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        bound = self.settings.store_timeout_s
        # (exai.resilience.loop: anyio's clock and scopes without its backend lookup per call
        # under trio — three of them per store call, two store calls per chat call)
        now = aio.current_time()
        deadline = aio.current_effective_deadline()
        if deadline != math.inf:
            bound = min(bound, max(0.0, 0.8 * (deadline - now)))
        kind = self.store.kind
        try:
            async with self.breaker:
                # (a plain cancel scope: ``fail_after`` is a generator context manager, dearer
                # per store call)
                with aio.cancel_scope(deadline=now + bound) as scope:
                    result = await fn(*args)
                if scope.cancelled_caught:
                    raise StoreUnavailableError(
                        f"the {kind} store did not answer within {bound:.3g}s"
                    )
                if self.spool.depth:
                    # the store answers: a replay waiting out its backoff starts now
                    self.replay.recovered.set()
                return result
        except StoreUnavailableError as exc:
            _log_store_error(kind, exc)
            raise StoreUnavailableError(
                f"the {kind} conversation store is unavailable",
                retry_after_s=exc.retry_after_s,
            ) from exc
        except StoreError as exc:
            _log_store_error(kind, exc)
            raise StoreError(f"the {kind} conversation store failed") from exc

    # -- background -----------------------------------------------------------------------
    async def _invalidation_loop(self) -> None:
        assert self.cache is not None
        guard = self.cache.guard
        await drain_loop(
            guard.flush_pending,
            lambda: guard.pending,
            backoff=self._redis_backoff,
            work=guard.work,
            recovered=self._redis_recovered,
            breaker=guard.breaker,
            stats=self.invalidation_stats,
        )

    async def _expire_loop(self) -> None:
        interval = min(3600.0, max(60.0, self.settings.conversation_ttl_s / 10))
        while True:
            await anyio.sleep(interval)
            try:
                await self._primary(self.store.delete_expired, self.clock())
            except (CircuitOpenError, StoreError):
                pass

    # -- status -----------------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        """The daemon's bridged Redis client (awaitable from trio), or None without Redis.

        Shared with the provider layer's Redis token buckets, which have breakers of their own.
        """
        return self.cache.guard.redis if self.cache is not None else None

    def not_ready_reason(self) -> str | None:
        """Why the daemon should not get traffic because of its conversation store, or None.

        A corrupt store, and a local (SQLite) store whose breaker is open, make the daemon not
        ready: another daemon would serve better. A shared (PostgreSQL) store's outage does
        not: every daemon sees it, the spool keeps calls working, and taking every daemon out
        of a balancer at once would turn an outage of the store into one of the service.
        """
        kind = self.store.kind
        if getattr(self.store, "corrupt", False):
            return f"the {kind} conversation store is corrupt (see the log)"
        if kind == "sqlite" and self.breaker.state == "open":
            return f"the {kind} conversation store is unavailable"
        return None

    def metrics_snapshot(self) -> dict[str, Any]:
        """Breakers, pools and the spool for ``/metrics`` (see :mod:`exai.server.metrics`)."""
        breakers = [self.breaker.statistics()]
        pools: dict[str, dict[str, int]] = {}
        primary_pool = self.store.status().get("pool") or {}
        pools[f"store:{self.store.kind}"] = {
            "in_use": int(primary_pool.get("in_use", 0) or 0),
            "size": int(primary_pool.get("max", primary_pool.get("size", 0)) or 0),
        }
        if self.cache is not None:
            guard = self.cache.guard
            breakers.append(guard.breaker.statistics())
            redis_pool = guard.redis.status()
            pools["redis"] = {
                "in_use": int(redis_pool.get("in_use", 0) or 0),
                "size": int(redis_pool.get("max", 0) or 0),
            }
        spool = self.spool.status()
        return {
            "breakers": breakers,
            "pools": pools,
            "spool": {
                "depth": spool["depth"],
                "bytes": spool["bytes"],
                "writes": spool["appended"],
            },
        }

    def status(self) -> dict[str, Any]:
        """Each store's breaker, pool use, the spool, the replay and the thread cache."""
        primary = dict(self.store.status())
        primary["breaker"] = _breaker_status(self.breaker, self.breaker.statistics())
        redis = None
        if self.cache is not None:
            redis = {
                **self.cache.guard.status(),
                "cache": self.cache.status(),
                "invalidation_loop": self.invalidation_stats.to_dict(),
            }
        return {
            "primary": primary,
            "spool": {
                **self.spool.status(),
                "spooled_writes": self.spooled_writes,
                "replay_errors": self.replay_errors,
                "replay_rejected": self.replay_rejected,
                "replay_loop": self.replay_stats.to_dict(),
            },
            "thread_cache": self.recent.status(),
            "redirected_writes": self.redirected_writes,
            "redis": redis,
        }


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


#: characters of a text :func:`_storable` replaces in one step (the regular expression takes
#: ≈ 20 ns a character: a 4 MiB answer in one pass was a loop step of ≈ 80 ms)
STORABLE_STEP_CHARS = 256 * 1024


def _clean(text: str) -> bool:
    """Whether ``text`` holds no NUL and no surrogate: C scans, ≈ 1-2 ns a character."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _storable(text: str) -> str:
    """``text`` with NUL and lone surrogates (every surrogate in a Python str is lone)
    replaced by U+FFFD; a long text is replaced :data:`STORABLE_STEP_CHARS` at a time, each
    part a step of its own (the pattern matches single characters, so parts replace as the
    whole would)."""
    if len(text) <= STORABLE_STEP_CHARS:
        return _UNSTORABLE.sub("\ufffd", text)
    if _clean(text):
        return text
    parts = []
    for start in range(0, len(text), STORABLE_STEP_CHARS):
        await anyio.lowlevel.checkpoint()
        parts.append(_UNSTORABLE.sub("\ufffd", text[start : start + STORABLE_STEP_CHARS]))
    return "".join(parts)


def _storable_key(key: str) -> str:
    """A key with NUL and surrogates escaped (``\\ud800``), so it stays apart from others."""
    if not _UNSTORABLE.search(key):
        return key
    return key.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _log_store_error(kind: str, exc: BaseException) -> None:
    # the whole text (paths, hosts, driver messages) is for the operator's log only
    log_event(
        "store.error",
        logging.WARNING,
        store=kind,
        error=type(exc).__name__,
        detail=str(exc)[:300],
    )


async def _bounded_shielded(fn: Callable[[], Awaitable[Any]], bound_s: float) -> None:
    """Run a closing call even when the caller is cancelled, but never longer than
    ``bound_s`` (a dead server must not hold up the shutdown)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(bound_s):
        await fn()


@asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Unwrap a task group's one-exception group, so the public context manager raises the
    body's own error (the background tasks never raise)."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
