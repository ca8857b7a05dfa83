"""A hung disk (issue 11, finding 8): a write stuck in the kernel must not hold a call past its
deadline, nor the shutdown; a store write that runs out of time is "store unavailable" and goes
to the spool; what an abandoned write leaves behind is made harmless.

A hung disk is a worker thread blocked in a system call: here the sync functions that do the
file work (``Spool._write_sync``, ``SQLiteStore._append_sync``) block on a ``threading.Event``
until the test releases it, exactly where ``fsync`` would block. Outcomes only, no durations:
the test releases the disk from a timer long after the bound, and checks that the caller had
its answer *before* that (an ordering, not a time).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from exai.errors import StorageUnavailableError
from exai.storage.model import Turn
from exai.storage.service import ConversationService
from exai.storage.spool import Spool
from exai.storage.sqlite import SQLiteStore
from tests.storage.conftest import make_settings

pytestmark = pytest.mark.anyio

#: the disk comes back this long after it hung (far beyond every bound in these tests)
RELEASE_AFTER_S = 8.0


class HungDisk:
    """Makes chosen sync file functions block until released (by the test or a timer)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.gate = threading.Event()
        self.released_at_all = threading.Event()
        self.entered = threading.Event()
        self.timer = threading.Timer(RELEASE_AFTER_S, self.release)
        self.timer.daemon = True

    def hang(self, cls: type, name: str) -> None:
        original = getattr(cls, name)
        gate, entered = self.gate, self.entered

        def hung(*args: Any, **kw: Any) -> Any:
            if not gate.is_set():
                entered.set()
                gate.wait(60)
            return original(*args, **kw)

        self.monkeypatch.setattr(cls, name, hung)
        if not self.timer.is_alive():
            self.timer.start()

    def release(self) -> None:
        self.released_at_all.set()
        self.gate.set()

    def released(self) -> bool:
        return self.released_at_all.is_set()


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[HungDisk]:
    d = HungDisk(monkeypatch)
    yield d
    d.timer.cancel()
    d.release()


def _turns(key: str) -> list[Turn]:
    return [
        Turn(role="user", content=f"{key}:q", created_at=1.0, idempotency_key=f"{key}#0"),
        Turn(role="assistant", content=f"{key}:a", created_at=1.0, idempotency_key=f"{key}#1"),
    ]


async def test_a_spool_write_on_a_hung_disk_fails_within_its_bound_and_keeps_nothing(
    tmp_path: Path, disk: HungDisk
) -> None:
    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20, io_timeout_s=0.5) as spool:
        disk.hang(Spool, "_write_sync")
        with pytest.raises(StorageUnavailableError) as info:
            await spool.append("t1", _turns("lost"), base=0)
        answered_before_the_disk_came_back = not disk.released()
        disk.release()  # the abandoned write reaches the file now
        assert await spool.append("t1", _turns("kept"), base=0)
        assert [r.turns[0].content for r in spool.records()] == ["kept:q"]
    assert answered_before_the_disk_came_back
    assert "/" not in info.value.message  # no server path in what a client may see
    async with Spool(path, max_bytes=1 << 20) as spool:
        # the caller was told "not written": its late bytes were cut from the file
        assert [r.turns[0].content for r in spool.records()] == ["kept:q"]


async def test_a_sqlite_write_on_a_hung_disk_is_abandoned_at_its_deadline_and_spooled(
    tmp_path: Path, disk: HungDisk
) -> None:
    settings = make_settings(tmp_path, store_timeout_s=0.5)
    async with (
        SQLiteStore.from_url(settings.effective_storage_url, settings) as store,
        ConversationService.open(settings, store=store) as svc,
    ):
        thread = await svc.start_or_continue(None, "chat")
        disk.hang(SQLiteStore, "_append_sync")
        with anyio.fail_after(30):  # (a hang guard only)
            after = await svc.add_turns(
                thread,
                [Turn(role="user", content="q"), Turn(role="assistant", content="a")],
                "c1",
            )
        answered_before_the_disk_came_back = not disk.released()
        assert svc.spool.depth == 1  # "store unavailable": the turns went to the spool
        assert svc.status()["primary"]["abandoned_calls"] >= 1
        disk.release()  # the abandoned write may now commit after all
        with anyio.fail_after(60):
            await svc.wait_replayed()
        stored = await store.get_thread(after.id)
    assert answered_before_the_disk_came_back
    assert stored is not None
    # committed late *and* replayed: still once each (idempotency keys)
    assert [t.content for t in stored.turns] == ["q", "a"]


async def test_the_shutdown_is_bounded_when_the_disk_hangs(tmp_path: Path, disk: HungDisk) -> None:
    settings = make_settings(tmp_path, store_timeout_s=0.5, spool_flush_timeout_s=1.0)
    async with (
        SQLiteStore.from_url(settings.effective_storage_url, settings) as store,
        ConversationService.open(settings, store=store) as svc,
    ):
        thread = await svc.start_or_continue(None, "chat")
        disk.hang(SQLiteStore, "_append_sync")
        await svc.add_turns(thread, [Turn(role="user", content="q")], "c1")
        assert svc.spool.depth == 1
        disk.hang(Spool, "_write_sync")
        with pytest.raises(StorageUnavailableError):  # the spool's disk hangs too
            await svc.add_turns(thread, [Turn(role="user", content="q2")], "c2")
    closed_before_the_disk_came_back = not disk.released()  # service, spool and store closed
    assert closed_before_the_disk_came_back
