"""The conversation service the tools use: threads, limits, durability, cache and replay.

::

    async with ConversationService.open(settings, bridge=bridge) as conversations:
        thread = await conversations.start_or_continue(args.get("continuation_id"), "chat")
        messages = conversations.build_history(thread, token_budget=100_000)
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
spool, idempotently and in order, once the store answers again. While a thread has spooled turns,
its new turns are spooled behind them (order is kept) and reads of it merge them in.

Thread creation is lazy: a new thread is only an id until its first turns are written (the
store creates the row with them), so a call that fails leaves no empty thread behind.

Resource handling:
    :meth:`ConversationService.open` owns the store, the spool, the Redis client and a task
    group running the replay and expiry tasks; leaving it cancels them and closes everything.
    The spool stays on disk and is replayed by the next start.

Error handling:
    :class:`~exai.errors.ConversationNotFound`: unknown, malformed or expired
    ``continuation_id``. :class:`~exai.errors.InvalidParams` (``field="continuation_id"``): the
    thread is out of turns or bytes. :class:`~exai.errors.StorageUnavailableError`: store down
    and spool full. Reads while the store is down and the cache misses raise
    :class:`~exai.errors.CircuitOpenError` or :class:`~exai.errors.StoreUnavailableError`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
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
from exai.storage.base import ConversationStore, open_store, store_kind
from exai.storage.model import Thread, Turn, turn_key
from exai.storage.redis_cache import (
    GuardedRedis,
    IdempotencyResults,
    ThreadCache,
    _breaker_status,
)
from exai.storage.spool import Spool, SpoolRecord, encode_record, open_spool

__all__ = [
    "ConversationService",
    "build_history",
    "estimate_tokens",
    "migrate_storage",
    "new_thread_id",
    "store_breaker",
]

T = TypeVar("T")

_THREAD_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_START_NEW = "start a new thread (omit continuation_id)"


#: namespace of thread ids derived from a call's exactly-once key
_THREAD_NS = uuid.UUID("6f1c2a4e-3b7d-5e8f-9a0b-1c2d3e4f5a6b")


def new_thread_id(call_key: str = "") -> str:
    """A fresh ``continuation_id``; derived from ``call_key`` when given, so a re-run of the
    same call (a retry after a crash, on another daemon) continues the thread its first run
    wrote instead of writing its turns nowhere."""
    return str(uuid.uuid5(_THREAD_NS, call_key)) if call_key else str(uuid.uuid4())


def estimate_tokens(text: str) -> int:
    """A cheap token estimate: a quarter of the characters, at least one."""
    return max(1, math.ceil(len(text) / 4))


def build_history(
    thread: Thread,
    token_budget: int,
    *,
    estimate: Callable[[str], int] = estimate_tokens,
    per_message_tokens: int = 4,
) -> list[dict[str, str]]:
    """The newest turns of ``thread`` that fit in ``token_budget``, oldest first, as chat
    messages (``{"role", "content"}``). Each turn costs ``estimate(content)`` plus
    ``per_message_tokens``. A turn that does not fit ends the walk back in time, so the history
    is always the most recent contiguous slice."""
    picked: list[Turn] = []
    used = 0
    for turn in reversed(thread.turns):
        cost = estimate(turn.content) + per_message_tokens
        if used + cost > token_budget:
            break
        picked.append(turn)
        used += cost
    picked.reverse()
    return [{"role": t.role, "content": t.content} for t in picked]


def store_breaker(name: str, settings: Settings) -> CircuitBreaker:
    """The default breaker in front of a store: opens at a 50 % failure rate over the last 10
    calls (after 4), or when every call of the window took ``store_timeout_s``; open 1 s at
    first, doubling to 30 s."""
    return CircuitBreaker(
        name,
        failure_rate_threshold=0.5,
        slow_call_rate_threshold=1.0,
        slow_call_duration_s=settings.store_timeout_s,
        minimum_calls=4,
        window_size=10,
        half_open_max_calls=1,
        open_duration_s=1.0,
        max_open_duration_s=30.0,
    )


class ConversationService:
    """Threads over a primary store, a spool and an optional Redis cache.

    Build it with :meth:`open`; the constructor is for tests that assemble the parts.

    Args:
        settings: limits (turns, bytes, TTL), ``store_timeout_s``.
        store: the primary store (opened).
        spool: the local spool (opened).
        breaker: the primary store's breaker.
        cache: the Redis thread cache, if any.
        idempotency: the Redis idempotency results, if any.
        clock: wall-clock seconds for timestamps and TTL decisions (tests pass their own).
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
        self._replay_min_s = replay_min_delay_s
        self._replay_max_s = replay_max_delay_s
        self._wake = anyio.Event()
        self._drained = anyio.Event()
        # The last store view of recently used threads: read only while the store is down.
        self._known: OrderedDict[str, Thread] = OrderedDict()
        self._known_max = 1024
        self.spooled_writes = 0
        self.replay_errors = 0
        self.replay_rejected = 0

    # -- construction -------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        *,
        bridge: Any = None,
        store: ConversationStore | None = None,
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
            breaker: the primary store's breaker (default :func:`store_breaker`).
            redis_breaker: Redis's breaker (default :func:`store_breaker` named ``redis``).
            cache_ttl_s: the longest a thread stays in the Redis cache.

        Raises:
            ConfigError: a bad storage URL.
            StoreUnavailableError: the primary store cannot be reached at start.
        """
        url = settings.effective_storage_url
        kind = store.kind if store is not None else store_kind(url)
        async with AsyncExitStack() as stack:
            needs_bridge = (kind == "postgres" and store is None) or settings.redis_url
            if bridge is None and needs_bridge:
                from exai.storage.aio_bridge import open_asyncio_bridge

                bridge = await stack.enter_async_context(open_asyncio_bridge())
            if store is None:
                store = await stack.enter_async_context(open_store(settings, bridge))
            stem = "turns-" + hashlib.sha256(url.encode()).hexdigest()[:12]
            spool = await stack.enter_async_context(
                open_spool(settings.state_path / "spool", stem, max_bytes=settings.spool_max_bytes)
            )
            cache = idem = None
            if settings.redis_url:
                from exai.storage.aio_bridge import BridgedRedis

                redis = BridgedRedis.from_url(
                    bridge,
                    settings.redis_url.reveal(),
                    max_connections=settings.redis_pool_max,
                    socket_timeout_s=settings.store_timeout_s,
                )
                stack.push_async_callback(_shielded, redis.aclose)
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
                tg.start_soon(service._replay_loop)
                tg.start_soon(service._expire_loop)
                try:
                    yield service
                finally:
                    tg.cancel_scope.cancel()

    # -- reading --------------------------------------------------------------------------
    async def start_or_continue(
        self, continuation_id: str | None, tool: str, *, call_key: str = ""
    ) -> Thread:
        """A new thread (``continuation_id`` None) or the live thread it names.

        ``tool`` is the tool continuing it: any tool may continue any thread.

        Raises:
            ConversationNotFound: unknown, malformed or expired id; the message says to start
                a new thread.
            InvalidParams: the thread has no turns left (``field="continuation_id"``).
            CircuitOpenError, StoreUnavailableError: the store cannot be read.
        """
        if continuation_id is None:
            # (no read: the id is derived from the call key, so a re-run writes into the
            # thread its first run started, and its already-written turns are skipped by key)
            now = self.clock()
            return Thread(
                id=new_thread_id(call_key),
                created_at=now,
                updated_at=now,
                expires_at=now + self.settings.conversation_ttl_s,
            )
        if not isinstance(continuation_id, str) or not _THREAD_ID.match(continuation_id):
            raise ConversationNotFound(
                f"continuation_id is not a valid thread id; {_START_NEW}",
                data={"continuation_id": str(continuation_id)[:128]},
            )
        thread = await self.get_thread(continuation_id)
        if thread is None or thread.expired(self.clock()):
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

    async def get_thread(self, thread_id: str) -> Thread | None:
        """The thread as the store has it plus its spooled turns, or None. Expiry is not
        checked here (see :meth:`start_or_continue`).

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
                stored = self._known.get(thread_id)
            else:
                if self.cache is not None and stored is not None:
                    await self.cache.fill(stored, gen, now=self.clock())
        if stored is not None:
            self._remember(stored)
        return self._merge_spool(thread_id, stored)

    def _known_is_whole(self, thread_id: str) -> bool:
        """While the store cannot be read: True when the thread as this process last saw it
        in the store, plus its spooled turns, is the whole thread (no turn in between)."""
        known = self._known.get(thread_id)
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
        n = len(self._known)
        self._known.clear()
        return n

    def _remember(self, thread: Thread) -> None:
        self._known[thread.id] = thread
        self._known.move_to_end(thread.id)
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)

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
            )
        return stored.with_turns(turns, ttl_s=self.settings.conversation_ttl_s)

    def turns_remaining(self, thread: Thread) -> int:
        """Turns the thread may still take."""
        return max(0, self.settings.conversation_max_turns - len(thread.turns))

    def build_history(
        self,
        thread: Thread,
        token_budget: int,
        *,
        estimate: Callable[[str], int] = estimate_tokens,
        per_message_tokens: int = 4,
    ) -> list[dict[str, str]]:
        """:func:`build_history` of ``thread``."""
        return build_history(
            thread, token_budget, estimate=estimate, per_message_tokens=per_message_tokens
        )

    # -- writing --------------------------------------------------------------------------
    async def add_turns(
        self, thread: Thread | str, turns: Sequence[Turn], idempotency_key: str
    ) -> Thread:
        """Append ``turns`` to ``thread`` durably; the thread as it is now.

        ``idempotency_key`` identifies the call (the daemon core's request key): the i-th turn
        is stored under ``<key>#<i>``, so repeating a call writes nothing twice. Missing
        ``created_at`` is stamped with the clock.

        Raises:
            InvalidParams: the turns would exceed the thread's turn or byte limit.
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
                )
            thread = found
        now = self.clock()
        prepared = [
            attrs.evolve(
                t,
                # PostgreSQL text cannot hold NUL: replace it here rather than spool a turn
                # the store will refuse
                content=t.content.replace("\x00", "\ufffd"),
                thread_id=thread.id,
                seq=None,
                created_at=t.created_at if t.created_at is not None else now,
                idempotency_key=turn_key(idempotency_key, i),
            )
            for i, t in enumerate(turns)
        ]
        after = thread.with_turns(prepared, ttl_s=self.settings.conversation_ttl_s)
        self._check_limits(thread, after)
        base = len(thread.turns)
        if self.spool.has_pending(thread.id):
            # keep the thread's order: its earlier turns are still waiting in the spool
            await self._spool_write(thread.id, prepared, base, cause=None)
            return after
        try:
            await self._primary(self.store.append_turns, thread.id, prepared)
        except (CircuitOpenError, StoreUnavailableError) as exc:
            await self._spool_write(thread.id, prepared, base, cause=exc)
            return after
        self._remember(after)
        if self.cache is not None:
            await self.cache.invalidate(thread.id)
        return after

    async def add_turn(self, thread: Thread | str, turn: Turn, idempotency_key: str) -> Thread:
        """:meth:`add_turns` with one turn."""
        return await self.add_turns(thread, [turn], idempotency_key)

    def _check_limits(self, before: Thread, after: Thread) -> None:
        s = self.settings
        if len(after.turns) > s.conversation_max_turns:
            raise InvalidParams(
                f"conversation {before.id} would exceed its limit of {s.conversation_max_turns} "
                f"turns ({len(before.turns)} used); {_START_NEW}",
                field="continuation_id",
            )
        if after.size_bytes > s.conversation_max_bytes and after.size_bytes > before.size_bytes:
            raise InvalidParams(
                f"conversation {before.id} would exceed its limit of {s.conversation_max_bytes} "
                f"bytes ({before.size_bytes} used); {_START_NEW}",
                field="continuation_id",
            )

    async def _spool_write(
        self, thread_id: str, turns: list[Turn], base: int, *, cause: BaseException | None
    ) -> None:
        try:
            await self.spool.append(thread_id, turns, base=base)
        except StorageUnavailableError as full:
            if cause is not None:
                raise full from cause
            raise
        self.spooled_writes += 1
        self._kick()

    # -- the primary store under its breaker and the deadline ----------------------------
    async def _primary(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        bound = self.settings.store_timeout_s
        deadline = anyio.current_effective_deadline()
        if deadline != math.inf:
            bound = min(bound, max(0.0, 0.8 * (deadline - anyio.current_time())))
        async with self.breaker:
            try:
                with anyio.fail_after(bound):
                    return await fn(*args)
            except TimeoutError as exc:
                raise StoreUnavailableError(
                    f"the {self.store.kind} store did not answer within {bound:.3g}s"
                ) from exc

    # -- background -----------------------------------------------------------------------
    def _kick(self) -> None:
        self._wake.set()

    async def _replay_loop(self) -> None:
        delay = self._replay_min_s
        while True:
            # a fresh event first, then the check: a kick after this line is never lost
            wake = self._wake = anyio.Event()
            guard = self.cache.guard if self.cache is not None else None
            if self.spool.depth == 0 and (guard is None or guard.pending == 0):
                self._drained.set()
                await wake.wait()
                continue
            try:
                if self.spool.depth:
                    await self.spool.replay(self._apply)
                if guard is not None and guard.pending:
                    await guard.flush_pending()
            except CircuitOpenError as exc:
                delay = max(self._replay_min_s, exc.retry_after_s or 0.0)
            except StoreError:
                self.replay_errors += 1
                delay = min(self._replay_max_s, max(self._replay_min_s, delay * 2))
            else:
                delay = self._replay_min_s
                continue
            with anyio.move_on_after(delay):
                await wake.wait()

    async def _apply(self, record: SpoolRecord) -> None:
        try:
            await self._primary(self.store.append_turns, record.thread_id, list(record.turns))
        except (CircuitOpenError, StoreUnavailableError):
            raise  # the store is away: keep the record and retry later
        except StoreError as exc:
            # The store refuses this record for good: set it aside (fsync'd, never lost) so it
            # cannot block every later record of every thread behind it.
            await anyio.to_thread.run_sync(
                _append_rejected,
                Path(str(self.spool.path) + ".rejected"),
                encode_record(record.thread_id, record.base, list(record.turns)),
                limiter=_REJECT_LIMITER,
            )
            self.replay_rejected += 1
            log_event(
                "spool.record_rejected",
                logging.ERROR,
                thread_id=record.thread_id,
                turns=len(record.turns),
                error=str(exc)[:200],
            )
            return
        if self.cache is not None:
            await self.cache.invalidate(record.thread_id)

    async def wait_replayed(self) -> None:
        """Return once the spool is empty and every cache invalidation delivered; bound it
        with the caller's deadline."""
        while self.spool.depth or (self.cache is not None and self.cache.guard.pending):
            if self._drained.is_set():
                self._drained = anyio.Event()
            drained = self._drained
            self._kick()
            await drained.wait()

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

    def metrics_snapshot(self) -> dict[str, Any]:
        """Breakers, pools and the spool for ``/metrics`` (see :mod:`exai.metrics`)."""
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
        """Each store's breaker, pool use and the spool's depth (for ``exai status``)."""
        primary = dict(self.store.status())
        primary["breaker"] = _breaker_status(self.breaker, self.breaker.statistics())
        redis = None
        if self.cache is not None:
            redis = {**self.cache.guard.status(), "cache": self.cache.status()}
        return {
            "primary": primary,
            "spool": {
                **self.spool.status(),
                "spooled_writes": self.spooled_writes,
                "replay_errors": self.replay_errors,
                "replay_rejected": self.replay_rejected,
            },
            "redis": redis,
        }


_REJECT_LIMITER = anyio.CapacityLimiter(1)


def _append_rejected(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


async def _shielded(fn: Callable[[], Awaitable[Any]]) -> None:
    with anyio.CancelScope(shield=True):
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


async def migrate_storage(settings: Settings, *, bridge: Any = None) -> dict[str, Any]:
    """Open the configured store, applying pending migrations (``exai migrate``); what was
    done, secrets redacted."""
    async with AsyncExitStack() as stack:
        if bridge is None and store_kind(settings.effective_storage_url) == "postgres":
            from exai.storage.aio_bridge import open_asyncio_bridge

            bridge = await stack.enter_async_context(open_asyncio_bridge())
        store = await stack.enter_async_context(open_store(settings, bridge))
        applied = list(getattr(store, "migrations_applied", []))
        return {"store": store.status(), "applied": applied}
