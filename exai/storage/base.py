"""The :class:`ConversationStore` protocol every store implements (:mod:`exai.storage.stores`
picks one by URL).

A store is the single source of truth for conversations. It knows nothing about breakers,
deadlines, the spool or the cache: :class:`~exai.storage.service.ConversationService` wraps it
with those. Every store method is idempotent where it writes:

- ``append_turns`` creates the thread row when it is missing (with its ``owner`` and
  ``creation_key``) and writes each turn unless a turn with the same ``idempotency_key`` exists,
  in one transaction. Sequence numbers are assigned by the store, gap-free and in call order, so
  two daemons appending to one thread never collide. When ``creation_key`` already created
  another thread (a re-run of the same call), the turns go to that thread and the result says
  which (``AppendResult.thread_id``).
- ``create_thread`` is an upsert.

Errors: a store maps its driver's errors to :class:`~exai.errors.StoreUnavailableError` (could
not reach the database, connection lost: retrying later may work) and
:class:`~exai.errors.StoreError` (anything else).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from exai.storage.model import Thread, Turn

__all__ = ["AppendResult", "BatchItem", "ConversationStore"]

#: one write of a batch: (thread id, turns, owner, creation key), as ``append_turns`` takes them
BatchItem = tuple[str, Sequence[Turn], str | None, str | None]


@attrs.frozen(kw_only=True)
class AppendResult:
    """What one ``append_turns`` did.

    Attributes:
        written: turns newly written (the others were duplicates of earlier writes).
        turn_count: turns in the thread after the write.
        thread_id: the thread the turns are in (another thread than the one asked for when
            the creation key had created it); empty when the store does not say.
    """

    written: int
    turn_count: int
    thread_id: str = ""


@runtime_checkable
class ConversationStore(Protocol):
    """Where threads live. Used as an async context manager (``async with store:``)."""

    #: ``"sqlite"`` or ``"postgres"``.
    kind: str

    async def __aenter__(self) -> ConversationStore: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def create_thread(self, thread_id: str, *, created_at: float) -> None:
        """Create an empty thread; a no-op when it exists."""
        ...

    async def append_turns(
        self,
        thread_id: str,
        turns: Sequence[Turn],
        *,
        owner: str | None = None,
        creation_key: str | None = None,
    ) -> AppendResult:
        """Append ``turns`` (each with an ``idempotency_key`` and ``created_at``) in one
        transaction, creating the thread (owned by ``owner``, under ``creation_key``) when
        missing; duplicates (same key) are skipped. When ``creation_key`` names an existing
        thread, the turns go there."""
        ...

    async def append_batch(self, items: Sequence[BatchItem]) -> list[AppendResult]:
        """Several ``append_turns`` in one transaction, applied in order: all or none. The
        spool's replay uses it (one round trip per batch instead of per record)."""
        ...

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        """Append one turn; True if written, False if that key was already written."""
        ...

    async def get_thread(self, thread_id: str) -> Thread | None:
        """The thread with its turns and owner, or None. Expiry and ownership are the caller's
        business."""
        ...

    async def delete_expired(self, now: float) -> int:
        """Delete threads whose ``expires_at`` is before ``now``; the number deleted."""
        ...

    def status(self) -> dict[str, Any]:
        """Kind, location (secrets redacted) and pool use."""
        ...
