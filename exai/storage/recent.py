"""The last store view of recently used threads, kept in memory and read only while the store
cannot be (:class:`RecentThreads`); bounded in count and bytes, oldest out first."""

from __future__ import annotations

from collections import OrderedDict

from exai.storage.model import Thread

__all__ = ["RecentThreads"]

#: what one thread in the in-process cache costs beyond its content (objects, keys)
_THREAD_OVERHEAD_BYTES = 1024
_TURN_OVERHEAD_BYTES = 400


class RecentThreads:
    """The last store view of recently used threads, bounded in count and bytes (oldest out
    first). Read only while the store cannot be; the store and the spool keep everything.

    Args:
        max_entries: threads kept at most.
        max_bytes: bytes kept at most (content plus a per-thread and per-turn overhead); a
            thread larger than the whole budget is not kept.
    """

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._threads: OrderedDict[str, tuple[Thread, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    @staticmethod
    def cost(thread: Thread) -> int:
        return thread.size_bytes + _THREAD_OVERHEAD_BYTES + _TURN_OVERHEAD_BYTES * len(thread.turns)

    def get(self, thread_id: str) -> Thread | None:
        item = self._threads.get(thread_id)
        return item[0] if item is not None else None

    def put(self, thread: Thread) -> None:
        self.forget(thread.id)
        size = self.cost(thread)
        if size > self.max_bytes or self.max_entries <= 0:
            return
        self._threads[thread.id] = (thread, size)
        self.bytes += size
        while len(self._threads) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, old) = self._threads.popitem(last=False)
            self.bytes -= old
            self.evictions += 1

    def forget(self, thread_id: str) -> None:
        item = self._threads.pop(thread_id, None)
        if item is not None:
            self.bytes -= item[1]

    def clear(self) -> int:
        n = len(self._threads)
        self._threads.clear()
        self.bytes = 0
        return n

    def __len__(self) -> int:
        return len(self._threads)

    def status(self) -> dict[str, int]:
        return {
            "threads": len(self._threads),
            "bytes": self.bytes,
            "max_threads": self.max_entries,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
        }
