"""The in-process thread cache has a byte budget (issue 11, finding 2, storage part): it held
1,024 threads of up to 2 MB each (2 GB) whatever their size."""

from __future__ import annotations

from pathlib import Path

import pytest

from exai.storage.model import Thread, Turn
from exai.storage.recent import RecentThreads
from exai.storage.service import ConversationService
from tests.storage.conftest import make_settings

pytestmark = pytest.mark.anyio


async def test_the_thread_cache_keeps_recent_threads_within_its_byte_budget(
    tmp_path: Path,
) -> None:
    budget = 1_000_000
    settings = make_settings(tmp_path, thread_cache_max_bytes=budget)
    async with ConversationService.open(settings) as svc:
        ids = []
        for i in range(12):
            thread = await svc.start_or_continue(None, "chat")
            thread = await svc.add_turns(
                thread, [Turn(role="user", content=f"{i}:" + "x" * 300_000)], f"c{i}"
            )
            ids.append(thread.id)
        for thread_id in ids:  # every read puts the thread in the cache
            await svc.start_or_continue(thread_id, "chat")
        status = svc.status()["thread_cache"]
        kept = [i for i in ids if svc.recent.get(i) is not None]
    assert status["bytes"] <= budget
    assert status["max_bytes"] == budget
    assert 1 <= len(kept) <= 3
    assert kept == ids[-len(kept) :]  # the most recently used stay, oldest out first
    assert status["evictions"] >= 9


def test_a_thread_larger_than_the_whole_budget_is_not_cached() -> None:
    cache = RecentThreads(max_entries=10, max_bytes=10_000)
    big = Thread(id="big", created_at=0, updated_at=0, expires_at=1).with_turns(
        [Turn(role="user", content="y" * 20_000, idempotency_key="k#0")], ttl_s=1
    )
    cache.put(big)
    assert cache.get("big") is None and cache.bytes == 0


def test_the_thread_cache_is_bounded_in_count_too() -> None:
    cache = RecentThreads(max_entries=3, max_bytes=1 << 30)
    for i in range(10):
        cache.put(Thread(id=f"t{i}", created_at=0, updated_at=0, expires_at=1))
    assert len(cache) == 3 and cache.get("t9") is not None and cache.get("t0") is None
