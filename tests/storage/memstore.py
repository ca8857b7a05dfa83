"""An in-memory conversation store for tests that run on trio's ``MockClock`` (no threads, no
sockets: virtual time only moves when every task waits).

It keeps the store contract (idempotency keys, creation keys, owners, gap-free sequence
numbers) and has switches for outages: ``down`` (every call fails as unreachable), ``hang``
(every call waits until released), ``delay_s`` (every append takes that long, in virtual time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import attrs

from exai.errors import StoreUnavailableError
from exai.storage.base import AppendResult
from exai.storage.model import Thread, Turn


class MemoryStore:
    kind = "memory"

    def __init__(self, ttl_s: float = 3600.0) -> None:
        self.ttl_s = ttl_s
        self.threads: dict[str, Thread] = {}
        self.by_creation: dict[str, str] = {}
        self.keys: set[str] = set()
        self.down = False
        self.hang = False
        self.delay_s = 0.0
        self.calls = 0
        self.appends = 0
        self.batches = 0
        self.released = anyio.Event()

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def _gate(self) -> None:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.hang:
            await self.released.wait()
        if self.down:
            raise StoreUnavailableError("the test cut the store")

    def release(self) -> None:
        self.hang = False
        self.released.set()
        self.released = anyio.Event()

    async def create_thread(self, thread_id: str, *, created_at: float) -> None:
        await self._gate()

    async def append_turns(
        self,
        thread_id: str,
        turns: Sequence[Turn],
        *,
        owner: str | None = None,
        creation_key: str | None = None,
    ) -> AppendResult:
        await self._gate()
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        return self._put(thread_id, turns, owner, creation_key)

    async def append_batch(self, items: Sequence[Any]) -> list[AppendResult]:
        """One "transaction": one gate, one delay, all items."""
        await self._gate()
        if self.delay_s:
            await anyio.sleep(self.delay_s)
        self.batches += 1
        return [self._put(*item) for item in items]

    def _put(
        self, thread_id: str, turns: Sequence[Turn], owner: str | None, creation_key: str | None
    ) -> AppendResult:
        self.appends += 1
        if creation_key is not None and creation_key in self.by_creation:
            thread_id = self.by_creation[creation_key]
        thread = self.threads.get(thread_id)
        if thread is None:
            first = min((t.created_at or 0.0) for t in turns) if turns else 0.0
            thread = Thread(
                id=thread_id,
                created_at=first,
                updated_at=first,
                expires_at=first + self.ttl_s,
                owner=owner,
            )
            if creation_key is not None:
                self.by_creation[creation_key] = thread_id
        fresh = [t for t in turns if t.idempotency_key not in self.keys]
        self.keys.update(t.idempotency_key for t in fresh if t.idempotency_key)
        thread = thread.with_turns(fresh, ttl_s=self.ttl_s)
        self.threads[thread_id] = thread
        return AppendResult(written=len(fresh), turn_count=len(thread.turns), thread_id=thread_id)

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        t = attrs.evolve(turn, idempotency_key=idempotency_key)
        return (await self.append_turns(turn.thread_id, [t])).written == 1

    async def get_thread(self, thread_id: str) -> Thread | None:
        await self._gate()
        return self.threads.get(thread_id)

    async def delete_expired(self, now: float) -> int:
        await self._gate()
        return 0

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "pool": {"size": 1, "in_use": 0}}

    def contents(self, thread_id: str) -> list[str]:
        thread = self.threads.get(thread_id)
        return [t.content for t in thread.turns] if thread is not None else []
