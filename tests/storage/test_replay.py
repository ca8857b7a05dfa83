"""Retry and replay loops of the conversation service, on trio's MockClock (virtual time).

Issue 11, findings 6 and 9: a retry loop that never waits (Redis dead, its breaker open, after a
Postgres blip: the loop spun at 97 % CPU and froze the daemon), and a spool that replays slowly
(the store back, its breaker closed, hundreds of records still waiting; counters moving only at
the end of a pass; a graceful end leaving the spool unflushed).

The store is in memory and the spool does its file work inline, so nothing runs in a thread
and virtual time only moves when every task waits: "no virtual time passed" means "it did not
wait for a timer".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio
import trio.lowlevel
import trio.testing

from exai.config import Settings
from exai.errors import StoreUnavailableError
from exai.resilience import CircuitBreaker
from exai.storage.model import Turn
from exai.storage.redis_cache import GuardedRedis, ThreadCache
from exai.storage.service import ConversationService
from exai.storage.spool import Spool
from tests.storage.conftest import make_settings
from tests.storage.memstore import MemoryStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inline spool below writes on the loop: without fsync that takes microseconds, so
    the stall check still watches the service itself."""
    monkeypatch.setattr("os.fsync", lambda fd: None)


class InlineSpool(Spool):
    """The real spool file, written inline on the loop (no worker thread), so a MockClock
    does not jump while a file operation runs."""

    async def _io(self, fn: Callable[..., Any], *args: Any, dirty: str | None = None) -> Any:
        await anyio.lowlevel.checkpoint()
        return fn(*args)


class Spin(BaseException):
    """Raised when a breaker is asked far more often than any waiting loop would ask it."""


class CountingBreaker(CircuitBreaker):
    """A breaker that counts admissions asked of it and stops a loop that asks without end
    (a loop that never awaits cannot be cancelled, so the test must break it from inside)."""

    limit = 5000

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, **kw)
        self.asked = 0

    async def __aenter__(self) -> CircuitBreaker:
        self.asked += 1
        if self.asked > self.limit:
            raise Spin(f"breaker {self.name!r} asked {self.asked} times")
        return await super().__aenter__()


def breaker(name: str, cls: type[CircuitBreaker] = CircuitBreaker) -> Any:
    return cls(
        name,
        minimum_calls=2,
        window_size=4,
        open_duration_s=1.0,
        max_open_duration_s=30.0,
        slow_call_duration_s=10.0,
    )


class DeadRedis:
    """A Redis that is never there."""

    def __init__(self) -> None:
        self.calls = 0

    async def _fail(self, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        raise StoreUnavailableError("redis is dead")

    run_script = mget = get = set = _fail

    def status(self) -> dict[str, Any]:
        return {"in_use": 0, "max": 1}


def user(content: str) -> Turn:
    return Turn(role="user", content=content, tool="chat")


@asynccontextmanager
async def service(
    tmp_path: Path,
    store: MemoryStore,
    *,
    settings: Settings | None = None,
    cache: ThreadCache | None = None,
    store_breaker: CircuitBreaker | None = None,
) -> AsyncIterator[ConversationService]:
    settings = settings or make_settings(tmp_path, store_timeout_s=1.0, conversation_max_turns=1000)
    async with (
        InlineSpool(tmp_path / "t.spool", max_bytes=1 << 24) as spool,
        ConversationService.open(
            settings,
            store=store,  # type: ignore[arg-type]
            spool=spool,
            cache=cache,
            breaker=store_breaker or breaker("store:memory"),
        ) as svc,
    ):
        yield svc


async def test_a_dead_redis_costs_cache_misses_and_never_a_retry_loop_that_does_not_wait(
    tmp_path: Path,
) -> None:
    """Redis dead and its breaker open, then a store blip fills the spool: the old replay
    loop called ``flush_pending()`` (which swallows the open breaker and returns) again and
    again without awaiting anything; here every pass that delivers nothing waits, at least
    the Redis breaker's retry time."""
    store = MemoryStore()
    redis = DeadRedis()
    redis_breaker = breaker("redis", CountingBreaker)
    cache = ThreadCache(GuardedRedis(redis, redis_breaker, call_timeout_s=1.0), prefix="t:")  # type: ignore[arg-type]
    async with service(tmp_path, store, cache=cache) as svc:
        threads = [await svc.start_or_continue(None, "chat") for _ in range(4)]
        for i in range(3):  # every write's invalidation fails: Redis's breaker opens
            for n, t in enumerate(threads):
                threads[n] = await svc.add_turns(t, [user(f"{n}.{i}")], f"c{n}.{i}")
        assert redis_breaker.state == "open"
        store.down = True  # the Postgres blip: writes go to the spool, the replay wakes up
        for n, t in enumerate(threads):
            threads[n] = await svc.add_turns(t, [user(f"{n}.blip")], f"c{n}.blip")
        assert svc.spool.depth == 4
        store.down = False
        await trio.sleep(600)  # ten virtual minutes with Redis dead
        stats = svc.invalidation_stats
        pending = cache.guard.pending
    assert svc.spool.depth == 0, "the spool must replay although Redis is dead"
    assert all(store.contents(t.id)[-1].endswith(".blip") for t in threads)
    assert pending > 0  # Redis is still dead: its invalidations wait
    # at least the breaker's retry time between passes (1 s doubling to 30 s): ~25 in 600 s
    assert stats.passes <= 60, stats
    assert stats.empty_passes == stats.waits
    assert redis_breaker.asked < 200


async def test_a_replay_pass_that_applies_nothing_always_waits(tmp_path: Path) -> None:
    store = MemoryStore()
    store_breaker = breaker("store:memory", CountingBreaker)
    async with service(tmp_path, store, store_breaker=store_breaker) as svc:
        thread = await svc.start_or_continue(None, "chat")
        store.down = True
        for i in range(5):
            thread = await svc.add_turns(thread, [user(f"q{i}")], f"c{i}")
        await trio.sleep(300)
        stats = svc.replay_stats
        store.down = False
        with anyio.fail_after(120):
            await svc.wait_replayed()
    assert stats.passes <= 40, stats
    assert stats.empty_passes == stats.waits
    assert store.contents(thread.id) == [f"q{i}" for i in range(5)]


async def test_the_replay_starts_when_the_store_answers_again_not_when_its_backoff_ends(
    tmp_path: Path,
) -> None:
    """Ten virtual seconds of outage push the replay's backoff to seconds; then the store is
    back and a client read closes the breaker: the spool drains at that instant."""
    store = MemoryStore()
    async with service(tmp_path, store) as svc:
        stored = await svc.start_or_continue(None, "chat")
        stored = await svc.add_turns(stored, [user("kept")], "c-kept")
        spooled = await svc.start_or_continue(None, "chat")
        store.down = True
        for i in range(200):
            spooled = await svc.add_turns(spooled, [user(f"s{i}")], f"s{i}")
            await trio.sleep(0.05)
        assert svc.spool.depth == 200
        store.down = False
        await trio.sleep(svc.breaker.statistics().retry_after_s)  # the breaker may probe now
        assert svc.spool.depth == 200, "the replay must still be backing off here"
        back = trio.current_time()
        await svc.start_or_continue(stored.id, "chat")  # the probe: the breaker closes
        while svc.spool.depth:
            await trio.lowlevel.checkpoint()
        drained_after_s = trio.current_time() - back
    assert svc.breaker.state == "closed"
    assert drained_after_s == 0.0
    assert store.contents(spooled.id) == [f"s{i}" for i in range(200)]


async def test_replay_counters_move_as_records_are_committed_not_at_the_end_of_a_pass(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    async with service(tmp_path, store) as svc:
        thread = await svc.start_or_continue(None, "chat")
        store.down = True
        for i in range(300):
            thread = await svc.add_turns(thread, [user(f"q{i}")], f"c{i}")
        store.delay_s = 0.5  # each store transaction takes half a virtual second
        store.down = False
        seen = []
        while svc.spool.depth:
            spool = svc.status()["spool"]
            assert spool["depth"] == 300 - spool["replayed"]
            seen.append(spool["replayed"])
            await trio.sleep(0.1)
        passes = svc.replay_stats.passes
    progress = sorted(set(seen))
    # several intermediate values within one pass: the counter moved with each commit
    assert len([v for v in progress if 0 < v < 300]) >= 3, progress
    assert store.contents(thread.id) == [f"q{i}" for i in range(300)]
    assert store.batches <= 10  # a transaction per batch of records, not one per record
    assert passes >= 1


async def test_a_new_turn_of_a_spooled_thread_is_not_stuck_behind_the_backlog(
    tmp_path: Path,
) -> None:
    store = MemoryStore()
    settings = make_settings(tmp_path, store_timeout_s=10.0, conversation_max_turns=1000)
    async with service(tmp_path, store, settings=settings) as svc:
        mine = await svc.start_or_continue(None, "chat")
        others = [await svc.start_or_continue(None, "chat") for _ in range(20)]
        store.down = True
        mine = await svc.add_turns(mine, [user("spooled")], "m0")
        for n, t in enumerate(others):  # a backlog behind my spooled turn
            for i in range(20):
                t = await svc.add_turns(t, [user(f"o{n}.{i}")], f"o{n}.{i}")
        store.delay_s = 3.0  # seven batches: about 20 virtual seconds of replay
        store.down = False
        while svc.breaker.state != "closed":  # the replay's probe got through
            await trio.sleep(0.1)
        start = trio.current_time()
        mine = await svc.add_turns(mine, [user("new")], "m1")
        took = trio.current_time() - start
        in_store = store.contents(mine.id)
        backlog = svc.spool.depth
    assert in_store == ["spooled", "new"]  # in order, and in the store already
    assert backlog > 0  # while other threads' records still wait
    assert took <= 2 * store.delay_s + 0.5  # its own record and its write, not the backlog


async def test_a_graceful_end_flushes_the_spool_into_a_store_that_is_back(tmp_path: Path) -> None:
    store = MemoryStore()
    async with service(tmp_path, store) as svc:
        thread = await svc.start_or_continue(None, "chat")
        store.down = True
        for i in range(10):
            thread = await svc.add_turns(thread, [user(f"q{i}")], f"c{i}")
        store.down = False  # back just before the end; the replay is still backing off
    assert store.contents(thread.id) == [f"q{i}" for i in range(10)]
    assert (tmp_path / "t.spool").stat().st_size == 0


async def test_a_graceful_end_is_bounded_when_the_store_stays_down(tmp_path: Path) -> None:
    store = MemoryStore()
    settings = make_settings(tmp_path, store_timeout_s=1.0, spool_flush_timeout_s=5.0)
    start = trio.current_time()
    async with service(tmp_path, store, settings=settings) as svc:
        thread = await svc.start_or_continue(None, "chat")
        store.down = True
        for i in range(3):
            thread = await svc.add_turns(thread, [user(f"q{i}")], f"c{i}")
        ended = trio.current_time()
    assert trio.current_time() - ended <= 5.0 + 1e-6
    assert trio.current_time() - start < 60
    async with InlineSpool(tmp_path / "t.spool", max_bytes=1 << 24) as spool:
        assert spool.depth == 3  # kept for the next start
