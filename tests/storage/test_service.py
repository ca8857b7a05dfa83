"""ConversationService on the default SQLite store: threads, limits, history, durability."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from exai.config import Settings
from exai.errors import (
    CircuitOpenError,
    ConversationNotFound,
    InvalidParams,
    StorageUnavailableError,
    StoreUnavailableError,
)
from exai.resilience import CircuitBreaker
from exai.storage.base import AppendResult
from exai.storage.model import Thread, Turn
from exai.storage.service import ConversationService
from exai.storage.sqlite import SQLiteStore, sqlite_path
from tests.storage.conftest import make_settings

pytestmark = pytest.mark.anyio


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakyStore:
    """A real store with a switch: ``down`` makes every call fail as unreachable,
    ``hang`` makes every call wait forever (until the caller's bound)."""

    def __init__(self, inner: SQLiteStore) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.down = False
        self.hang = False
        self.appends = 0
        self.reads = 0

    async def _gate(self) -> None:
        if self.hang:
            await anyio.sleep_forever()
        if self.down:
            raise StoreUnavailableError("the test cut the store")

    async def __aenter__(self) -> FlakyStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def create_thread(self, thread_id: str, *, created_at: float) -> None:
        await self._gate()
        await self.inner.create_thread(thread_id, created_at=created_at)

    async def append_turns(self, thread_id: str, turns: Sequence[Turn], **kw: Any) -> AppendResult:
        await self._gate()
        self.appends += 1
        return await self.inner.append_turns(thread_id, turns, **kw)

    async def append_batch(self, items: Sequence[Any]) -> list[AppendResult]:
        await self._gate()
        self.appends += 1
        return await self.inner.append_batch(items)

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        await self._gate()
        return await self.inner.append_turn(turn, idempotency_key)

    async def get_thread(self, thread_id: str) -> Thread | None:
        await self._gate()
        self.reads += 1
        return await self.inner.get_thread(thread_id)

    async def delete_expired(self, now: float) -> int:
        await self._gate()
        return await self.inner.delete_expired(now)

    def status(self) -> dict[str, Any]:
        return self.inner.status()


def quick_breaker() -> CircuitBreaker:
    return CircuitBreaker(
        "store:test",
        minimum_calls=2,
        window_size=4,
        open_duration_s=0.05,
        max_open_duration_s=0.2,
        slow_call_duration_s=10.0,
    )


@asynccontextmanager
async def flaky_service(
    settings: Settings, clock: Clock | None = None
) -> AsyncIterator[tuple[ConversationService, FlakyStore]]:
    async with SQLiteStore.from_url(settings.effective_storage_url, settings) as inner:
        flaky = FlakyStore(inner)
        async with ConversationService.open(
            settings,
            store=flaky,
            breaker=quick_breaker(),
            clock=clock or Clock(),
            replay_min_delay_s=0.01,
        ) as svc:
            yield svc, flaky


def left_down(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings of a test that ends with the store still down and turns in the spool: the
    graceful exit's flush (``spool_flush_timeout_s``, 5 s by default) could only wait for a
    store that does not come back; the flush itself is tested in
    tests/adversarial/test_store_outages.py."""
    return make_settings(tmp_path, spool_flush_timeout_s=0, **overrides)


def user(content: str, tool: str = "chat") -> Turn:
    return Turn(role="user", content=content, tool=tool)


def assistant(content: str, tool: str = "chat") -> Turn:
    return Turn(role="assistant", content=content, tool=tool, provider="kimi", model="k2")


async def test_a_new_threads_first_call_reads_nothing_and_hands_off_one_write(
    tmp_path: Path,
) -> None:
    # what a chat call without continuation_id costs the store: no read, one trip to its thread
    async with flaky_service(make_settings(tmp_path)) as (svc, store):
        jobs = store.inner._thread.jobs
        thread = await svc.start_or_continue(None, "chat", call_key="c1", owner="me")
        after = await svc.add_turns(thread, [user("q"), assistant("a")], "c1", owner="me")
        assert store.reads == 0 and store.appends == 1
        assert store.inner._thread.jobs - jobs == 1
        assert [t.content for t in after.turns] == ["q", "a"]


async def test_a_thread_is_continued_by_another_tool(
    tmp_path: Path, stall_detector: object
) -> None:
    async with ConversationService.open(make_settings(tmp_path)) as svc:
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("q1"), assistant("a1")], "call-1")
        again = await svc.start_or_continue(thread.id, "codereview")
        await svc.add_turns(
            again, [user("q2", "codereview"), assistant("a2", "codereview")], "call-2"
        )
        final = await svc.start_or_continue(thread.id, "thinkdeep")
    assert [(t.seq, t.tool, t.content) for t in final.turns] == [
        (1, "chat", "q1"),
        (2, "chat", "a1"),
        (3, "codereview", "q2"),
        (4, "codereview", "a2"),
    ]
    assert final.turns[1].provider == "kimi"


async def test_a_thread_survives_a_restart_on_the_default_sqlite_store(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert settings.effective_storage_url.startswith("sqlite:///")
    async with ConversationService.open(settings) as svc:
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("before"), assistant("restart")], "call-1")
    assert sqlite_path(settings.effective_storage_url).is_file()
    async with ConversationService.open(settings) as svc:
        thread = await svc.start_or_continue(thread.id, "analyze")
        thread = await svc.add_turns(thread, [user("after")], "call-2")
    assert [t.content for t in thread.turns] == ["before", "restart", "after"]


async def test_an_unknown_continuation_says_to_start_a_new_thread(tmp_path: Path) -> None:
    async with ConversationService.open(make_settings(tmp_path)) as svc:
        with pytest.raises(ConversationNotFound) as info:
            await svc.start_or_continue("0b5a5c4e-0000-4000-8000-000000000000", "chat")
    assert "start a new thread (omit continuation_id)" in str(info.value)
    assert info.value.to_error_data()["reason"] == "continuation_not_found"


async def test_a_malformed_continuation_is_not_found(tmp_path: Path) -> None:
    async with ConversationService.open(make_settings(tmp_path)) as svc:
        with pytest.raises(ConversationNotFound):
            await svc.start_or_continue("x}{; DROP TABLE", "chat")


async def test_an_expired_thread_is_not_found(tmp_path: Path) -> None:
    clock = Clock()
    settings = make_settings(tmp_path, conversation_ttl_s=60.0)
    async with ConversationService.open(settings, clock=clock) as svc:
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("q")], "call-1")
        clock.now += 59.0
        await svc.start_or_continue(thread.id, "chat")
        clock.now += 1.0
        with pytest.raises(ConversationNotFound) as info:
            await svc.start_or_continue(thread.id, "chat")
    assert "expired" in str(info.value)


async def test_each_turn_refreshes_the_ttl(tmp_path: Path) -> None:
    clock = Clock()
    settings = make_settings(tmp_path, conversation_ttl_s=60.0)
    async with ConversationService.open(settings, clock=clock) as svc:
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("q")], "call-1")
        clock.now += 50.0
        await svc.add_turns(thread.id, [user("q2")], "call-2")
        clock.now += 50.0
        thread = await svc.start_or_continue(thread.id, "chat")
    assert len(thread.turns) == 2


async def test_turns_remaining_counts_down_and_a_full_thread_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, conversation_max_turns=4)
    async with ConversationService.open(settings) as svc:
        thread = await svc.start_or_continue(None, "chat")
        assert svc.turns_remaining(thread) == 4
        thread = await svc.add_turns(thread, [user("1"), assistant("2")], "c1")
        assert svc.turns_remaining(thread) == 2
        with pytest.raises(InvalidParams) as too_many:
            await svc.add_turns(thread, [user("3"), assistant("4"), user("5")], "c2")
        thread = await svc.add_turns(thread, [user("3"), assistant("4")], "c3")
        assert svc.turns_remaining(thread) == 0
        with pytest.raises(InvalidParams) as full:
            await svc.start_or_continue(thread.id, "chat")
    assert too_many.value.to_error_data()["field"] == "continuation_id"
    assert "start a new thread" in str(full.value)


async def test_the_byte_limit_refuses_a_turn_that_would_exceed_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, conversation_max_bytes=10)
    async with ConversationService.open(settings) as svc:
        thread = await svc.start_or_continue(None, "chat")
        thread = await svc.add_turns(thread, [user("12345")], "c1")
        with pytest.raises(InvalidParams):
            await svc.add_turns(thread, [user("123456")], "c2")
        thread = await svc.add_turns(thread, [user("12345")], "c3")
    assert thread.size_bytes == 10


async def test_repeating_a_call_with_the_same_key_writes_nothing_twice(tmp_path: Path) -> None:
    async with ConversationService.open(make_settings(tmp_path)) as svc:
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("q"), assistant("a")], "call-1")
        await svc.add_turns(thread, [user("q"), assistant("a")], "call-1")
        stored = await svc.store.get_thread(thread.id)
    assert stored is not None and [t.content for t in stored.turns] == ["q", "a"]


async def test_turns_go_to_the_spool_while_the_store_is_down_and_are_replayed_once(
    tmp_path: Path, stall_detector: object
) -> None:
    async with flaky_service(make_settings(tmp_path)) as (svc, store):
        thread = await svc.start_or_continue(None, "chat")
        thread = await svc.add_turns(thread, [user("q1"), assistant("a1")], "c1")
        store.down = True
        thread = await svc.add_turns(thread, [user("q2"), assistant("a2")], "c2")
        assert svc.spool.depth == 1
        # a continuation right after the outage sees its spooled turns
        seen = await svc.get_thread(thread.id)
        assert seen is not None and [t.content for t in seen.turns] == ["q1", "a1", "q2", "a2"]
        store.down = False
        with anyio.fail_after(5):
            await svc.wait_replayed()
        stored = await store.inner.get_thread(thread.id)
    assert stored is not None
    assert [(t.seq, t.content) for t in stored.turns] == [
        (1, "q1"),
        (2, "a1"),
        (3, "q2"),
        (4, "a2"),
    ]


async def test_a_thread_started_during_an_outage_is_readable_from_the_spool(
    tmp_path: Path,
) -> None:
    async with flaky_service(left_down(tmp_path)) as (svc, store):
        store.down = True
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("q"), assistant("a")], "c1")
        again = await svc.start_or_continue(thread.id, "chat")
    assert [t.content for t in again.turns] == ["q", "a"]


async def test_reading_an_unknown_thread_while_the_store_is_down_fails_explicitly(
    tmp_path: Path,
) -> None:
    async with flaky_service(make_settings(tmp_path)) as (svc, store):
        store.down = True
        with pytest.raises((StoreUnavailableError, CircuitOpenError)) as info:
            await svc.start_or_continue("0b5a5c4e-0000-4000-8000-000000000000", "chat")
    assert info.value.retryable


async def test_new_turns_of_a_thread_with_spooled_turns_queue_behind_them(tmp_path: Path) -> None:
    async with flaky_service(make_settings(tmp_path, store_timeout_s=0.2)) as (svc, store):
        thread = await svc.start_or_continue(None, "chat")
        store.down = True
        thread = await svc.add_turns(thread, [user("1")], "c1")
        store.hang = True  # keep the replay from running while we write the next turn
        store.down = False
        appends = store.appends
        thread = await svc.add_turns(thread, [user("2")], "c2")
        assert store.appends == appends  # not written around the spooled turn
        assert svc.spool.depth == 2
        store.hang = False
        with anyio.fail_after(5):
            await svc.wait_replayed()
        stored = await store.inner.get_thread(thread.id)
    assert stored is not None and [t.content for t in stored.turns] == ["1", "2"]


async def test_a_full_spool_fails_the_call_with_storage_unavailable(tmp_path: Path) -> None:
    settings = left_down(tmp_path, spool_max_bytes=600)
    async with flaky_service(settings) as (svc, store):
        store.down = True
        thread = await svc.start_or_continue(None, "chat")
        thread = await svc.add_turns(thread, [user("x" * 100)], "c1")
        with pytest.raises(StorageUnavailableError) as info:
            await svc.add_turns(thread, [user("y" * 400)], "c2")
        assert svc.spool.depth == 1
    assert info.value.to_error_data()["reason"] == "storage_unavailable"


async def test_a_hanging_store_is_bounded_by_store_timeout_and_the_turn_is_spooled(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, store_timeout_s=0.1)
    async with flaky_service(settings) as (svc, store):
        # the subject is the store's bound; the spool's disk (bounded by the same setting) gets
        # a busy machine's time: a write and an fsync took over 0.1 s in a whole-suite run at
        # load 14 ("the spool's disk did not answer within 0.1s")
        svc.spool.io_timeout_s = 30.0
        thread = await svc.start_or_continue(None, "chat")
        store.hang = True
        with anyio.fail_after(30):  # a hang guard: the store's own bound is 0.1 s
            await svc.add_turns(thread, [user("q")], "c1")
        assert svc.spool.depth == 1
        store.hang = False


async def test_the_store_call_leaves_part_of_the_callers_deadline_for_the_spool(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, store_timeout_s=30.0)
    async with flaky_service(settings) as (svc, store):
        thread = await svc.start_or_continue(None, "chat")
        store.hang = True
        # the caller's deadline: the store gets 80 % of it (1.6 s), the spool the rest (0.4 s,
        # a write and an fsync even on a busy machine); a store call that took it all fails
        with anyio.fail_after(2.0):
            await svc.add_turns(thread, [user("q")], "c1")
        assert svc.spool.depth == 1
        store.hang = False


async def test_an_open_breaker_sends_turns_straight_to_the_spool(tmp_path: Path) -> None:
    async with flaky_service(left_down(tmp_path)) as (svc, store):
        store.down = True
        thread = await svc.start_or_continue(None, "chat")
        for i in range(3):
            await svc.add_turns(thread, [user(f"{i}")], f"c{i}")
        assert svc.breaker.state == "open"
        calls = store.appends
        await svc.add_turns(
            Thread(id="other", created_at=0, updated_at=0, expires_at=9e9), [user("x")], "c9"
        )
        assert store.appends == calls


async def test_status_shows_the_breaker_the_pool_and_the_spool(tmp_path: Path) -> None:
    async with flaky_service(left_down(tmp_path)) as (svc, store):
        store.down = True
        thread = await svc.start_or_continue(None, "chat")
        await svc.add_turns(thread, [user("q")], "c1")
        status = svc.status()
    assert status["primary"]["kind"] == "sqlite"
    assert status["primary"]["breaker"]["state"] in ("closed", "open", "half_open")
    assert status["primary"]["pool"]["size"] == 1
    assert status["spool"]["depth"] == 1 and status["spool"]["bytes"] > 0
    assert status["redis"] is None


async def test_an_error_in_the_body_leaves_the_service_unwrapped(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        async with ConversationService.open(make_settings(tmp_path)):
            raise KeyError("mine")


def test_settings_default_to_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert sqlite_path(settings.effective_storage_url).parent == settings.state_path
    assert attrs.evolve(settings).effective_storage_url == settings.effective_storage_url


@pytest.mark.parametrize("name", ["a#b", "q?x=1", "s%41t", "my dir", "été"])
def test_the_default_store_is_in_the_state_directory_whatever_its_name(
    tmp_path: Path, name: str
) -> None:
    """The default URL was "sqlite:///" + the path as it is, which the store reads as a URL
    (its path unquoted, up to a "?" or "#"): EXAI_STATE_DIR=/x/a#b put the store in the file
    /x/a, outside the state directory (and not in a directory made 0700), /x/s%41t in /x/sAt."""
    settings = make_settings(tmp_path / name)
    assert sqlite_path(settings.effective_storage_url) == settings.state_path / "exai.sqlite3"


# ConversationService._primary bounds a store call with exai.resilience.loop's scope (trio's own
# under trio, anyio's otherwise, c5e401e): a library user's asyncio gets the same bounds.
@pytest.mark.parametrize("anyio_backend", ["trio", "asyncio"])
async def test_a_hanging_store_is_bounded_under_either_backend(
    tmp_path: Path, anyio_backend: str
) -> None:
    settings = make_settings(tmp_path, store_timeout_s=0.1)
    async with flaky_service(settings) as (svc, store):
        # the subject is the store's bound; the spool's disk (bounded by the same setting) gets
        # a busy machine's time: a write and an fsync took over 0.1 s in a whole-suite run at
        # load 14 ("the spool's disk did not answer within 0.1s")
        svc.spool.io_timeout_s = 30.0
        thread = await svc.start_or_continue(None, "chat")
        store.hang = True
        with anyio.fail_after(30):  # a hang guard: the store's own bound is 0.1 s
            await svc.add_turns(thread, [user("q")], "c1")
        assert svc.spool.depth == 1
        store.hang = False


@pytest.mark.parametrize("anyio_backend", ["trio", "asyncio"])
async def test_a_caller_cancelled_during_a_store_call_is_cancelled_not_spooled(
    tmp_path: Path, anyio_backend: str
) -> None:
    # the caller's own cancellation is not the store's bound (cancelled_caught is the inner
    # scope's): it propagates, and nothing is spooled as if the store had failed
    settings = make_settings(tmp_path, store_timeout_s=30.0)
    async with flaky_service(settings) as (svc, store):
        thread = await svc.start_or_continue(None, "chat")
        store.hang = True
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:

                async def stop() -> None:
                    await anyio.sleep(0.05)
                    outer.cancel()

                tg.start_soon(stop)
                await svc.add_turns(thread, [user("q")], "c1")
        assert outer.cancelled_caught
        assert svc.spool.depth == 0
        store.hang = False
