"""The spool's replay: turns written to the local spool while the store was away are applied to
the store, idempotently and in order, as soon as it is back.

:meth:`SpoolReplay.run` is a drain loop (:func:`exai.resilience.backoff.drain_loop`): it runs a
pass when the spool has new records (:attr:`~SpoolReplay.work`) or the store's breaker closes
(:attr:`~SpoolReplay.recovered`: the transition is the signal, not a poll), and backs off after
a pass that applied nothing. A pass goes over the spool oldest first, a batch per store
transaction (at most :data:`REPLAY_BATCH_RECORDS` records and :data:`REPLAY_BATCH_BYTES`
bytes; the record count halves when a batch runs out of time and doubles back as batches
succeed; one record at a time while the breaker is on probation). A batch the store refuses
for good is applied record by record, so only the bad record is set aside
(:mod:`exai.storage.rejected`). Every applied record updates the thread cache and invalidates
Redis's copy.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from exai.config import Settings
from exai.errors import CircuitOpenError, StoreError, StoreUnavailableError
from exai.logs import log_event
from exai.resilience import CircuitBreaker
from exai.resilience.backoff import Backoff, DrainStatistics, Wakeup, drain_loop
from exai.storage.base import AppendResult, ConversationStore
from exai.storage.breakers import on_close
from exai.storage.recent import RecentThreads
from exai.storage.redis_cache import ThreadCache
from exai.storage.rejected import set_aside
from exai.storage.spool import Spool, SpoolRecord

__all__ = ["REPLAY_BATCH_BYTES", "REPLAY_BATCH_RECORDS", "SpoolReplay"]

#: the spool's replay writes at most this many records, and bytes, per store transaction (the
#: record count halves when a batch runs out of time and doubles back as batches succeed)
REPLAY_BATCH_RECORDS = 64
REPLAY_BATCH_BYTES = 1 << 20


class SpoolReplay:
    """Applies the spool to the store (see the module docstring).

    Args:
        settings: ``store_timeout_s`` (setting a record aside), ``conversation_ttl_s``.
        store: the primary store.
        spool: the local spool.
        breaker: the store's breaker (its closing starts a pass).
        primary: ``await primary(fn, *args)`` runs ``fn`` on the store under its breaker and
            the caller's deadline (the service's own path to the store).
        recent: the service's thread cache, kept up to date with what lands.
        cache: the Redis thread cache, if any (invalidated for what lands).
        min_delay_s, max_delay_s: the backoff after a pass that applied nothing.

    Attributes:
        work: set when the spool has new records.
        recovered: set when the store answers again (its breaker closed, or a call went
            through while records wait).
        stats: passes, errors and records of the drain loop.
        rejected: records set aside because the store refused them for good.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        store: ConversationStore,
        spool: Spool,
        breaker: CircuitBreaker,
        primary: Callable[..., Awaitable[Any]],
        recent: RecentThreads,
        cache: ThreadCache | None,
        min_delay_s: float,
        max_delay_s: float,
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.breaker = breaker
        self.primary = primary
        self.recent = recent
        self.cache = cache
        self.backoff = Backoff(min_delay_s, max(min_delay_s, max_delay_s))
        self.stats = DrainStatistics()
        self.work = Wakeup()  # the spool has new records
        self.recovered = Wakeup()  # the store's breaker closed
        self.progress = Wakeup()  # the replay finished a pass
        on_close(breaker, self.recovered)
        self.batch_records = REPLAY_BATCH_RECORDS  # adapts: halved on a timeout, doubled back
        self.rejected = 0

    async def flush_thread(self, thread_id: str) -> None:
        """Apply one thread's spooled records to the store, in order (bounded: a thread has at
        most ``conversation_max_turns`` records)."""
        for record in self.spool.pending(thread_id):
            if self.spool.is_pending(record):
                await self._apply(record)
                self.spool.mark_applied(record)

    async def run(self) -> None:
        await drain_loop(
            self._step,
            lambda: self.spool.depth,
            backoff=self.backoff,
            work=self.work,
            recovered=self.recovered,
            breaker=self.breaker,
            stats=self.stats,
        )

    async def _step(self) -> int:
        """One pass over the spool, oldest first, a batch per store transaction; the number of
        records applied. A pass that applied some records and then failed returns that number
        (progress: the next pass starts at once); one that applied none raises (it waits)."""
        before = self.spool.replayed
        try:
            batch: list[SpoolRecord] = []
            size = 0
            for record in self.spool.records():
                if not self.spool.is_pending(record):
                    continue
                batch.append(record)
                size += record.size_bytes
                # while the breaker is not closed the store is on probation: probe with one
                # record, not a full batch
                limit = self.batch_records if self.breaker.state == "closed" else 1
                if len(batch) >= limit or size >= REPLAY_BATCH_BYTES:
                    await self._apply_batch(batch)
                    batch, size = [], 0
                    await self.spool.maybe_compact()
            if batch:
                await self._apply_batch(batch)
        except (CircuitOpenError, StoreError):
            if self.spool.replayed == before:
                raise
            self.stats.errors += 1
        finally:
            await self.spool.maybe_compact(final=True)
            self.progress.set()
        return self.spool.replayed - before

    async def _apply_batch(self, batch: list[SpoolRecord]) -> None:
        """Apply records in one store transaction and mark them applied; a batch the store
        refuses for good is applied record by record, so only the bad record is set aside."""
        if len(batch) == 1:
            await self._apply(batch[0])
            self.spool.mark_applied(batch[0])
            return
        try:
            results = await self.primary(
                functools.partial(
                    self.store.append_batch,
                    [(r.thread_id, list(r.turns), r.owner, r.creation_key) for r in batch],
                )
            )
        except StoreUnavailableError:
            # too big a transaction for the store's bound (a slow store, lock waits): halve it
            self.batch_records = max(1, len(batch) // 2)
            raise
        except CircuitOpenError:
            raise
        except StoreError:
            for record in batch:
                if self.spool.is_pending(record):
                    await self._apply(record)
                    self.spool.mark_applied(record)
            return
        self.batch_records = min(REPLAY_BATCH_RECORDS, 2 * self.batch_records)
        landed: dict[str, None] = {}
        for record, result in zip(batch, results, strict=True):
            landed[self._applied(record, result)] = None
            self.spool.mark_applied(record)
        if self.cache is not None:
            for thread_id in landed:
                await self.cache.invalidate(thread_id)

    async def _apply(self, record: SpoolRecord) -> None:
        try:
            result = await self.primary(
                functools.partial(
                    self.store.append_turns,
                    record.thread_id,
                    list(record.turns),
                    owner=record.owner,
                    creation_key=record.creation_key,
                )
            )
        except (CircuitOpenError, StoreUnavailableError):
            raise  # the store is away: keep the record and retry later
        except StoreError as exc:
            # The store refuses this record for good: set it aside (fsync'd, never lost) so it
            # cannot block every later record of every thread behind it.
            # (a disk that does not answer raises StoreUnavailableError: then the record stays
            # in the spool and is tried again later)
            await set_aside(self.spool.path, record, self.settings.store_timeout_s)
            self.rejected += 1
            log_event(
                "spool.record_rejected",
                logging.ERROR,
                thread_id=record.thread_id,
                turns=len(record.turns),
                error=str(exc.__cause__ or exc)[:200],
            )
            return
        landed = self._applied(record, result)
        if self.cache is not None:
            await self.cache.invalidate(landed)

    def _applied(self, record: SpoolRecord, result: AppendResult) -> str:
        """Bring the thread cache up to date with a record the store now has; the thread id
        it landed in."""
        landed = result.thread_id or record.thread_id
        known = self.recent.get(landed)
        if known is not None:
            if record.base <= len(known.turns):
                self.recent.put(
                    known.with_turns(record.turns, ttl_s=self.settings.conversation_ttl_s)
                )
            else:
                self.recent.forget(landed)
        return landed

    async def wait_replayed(self) -> None:
        """Return once the spool is empty and every cache invalidation delivered; bound it
        with the caller's deadline."""
        while self.spool.depth or (self.cache is not None and self.cache.guard.pending):
            self.progress.clear()
            self.work.set()
            if self.cache is not None and self.cache.guard.pending:
                self.cache.guard.work.set()
            with anyio.move_on_after(0.05):
                await self.progress.wait()

    async def flush(self, timeout_s: float) -> bool:
        """Give the replay up to ``timeout_s`` to empty the spool (graceful shutdown); True
        when it is empty. Redis invalidations are not waited for (Redis is a cache)."""
        if self.spool.depth == 0:
            return True
        with anyio.move_on_after(timeout_s):
            self.work.set()
            while self.spool.depth:
                self.progress.clear()
                await self.progress.wait()
        left = self.spool.depth
        log_event(
            "spool.shutdown_flush",
            logging.INFO if left == 0 else logging.WARNING,
            replayed=self.spool.replayed,
            left=left,
        )
        return left == 0
