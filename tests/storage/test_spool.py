"""The spool: durable, bounded, torn-tail safe, replayed idempotently, owned by one process."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from exai.errors import StorageUnavailableError, StoreUnavailableError
from exai.storage.model import Turn
from exai.storage.spool import Spool, SpoolRecord, decode_line, encode_record, open_spool

pytestmark = pytest.mark.anyio


def _turns(thread: str, key: str, n: int = 1) -> list[Turn]:
    return [
        Turn(
            role="user",
            content=f"{key}-{i}",
            created_at=1.0,
            thread_id=thread,
            idempotency_key=f"{key}#{i}",
        )
        for i in range(n)
    ]


async def test_appended_records_are_there_after_reopening(
    tmp_path: Path, stall_detector: object
) -> None:
    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20) as spool:
        assert await spool.append("t1", _turns("t1", "a", 2), base=0)
        assert await spool.append("t2", _turns("t2", "b"), base=3)
    async with Spool(path, max_bytes=1 << 20) as spool:
        records = spool.records()
    assert [(r.thread_id, r.base, len(r.turns)) for r in records] == [("t1", 0, 2), ("t2", 3, 1)]
    assert records[0].turns[1].content == "a-1"


async def test_a_full_spool_refuses_with_storage_unavailable_and_writes_nothing(
    tmp_path: Path,
) -> None:
    line = encode_record("t1", 0, _turns("t1", "a"))
    async with Spool(tmp_path / "s.spool", max_bytes=len(line) + 10) as spool:
        await spool.append("t1", _turns("t1", "a"), base=0)
        with pytest.raises(StorageUnavailableError) as info:
            await spool.append("t1", _turns("t1", "b"), base=1)
        assert spool.depth == 1
        assert spool.size_bytes == (await anyio.Path(tmp_path / "s.spool").stat()).st_size
    assert info.value.to_error_data()["reason"] == "storage_unavailable"


async def test_a_turn_already_pending_is_not_spooled_twice(tmp_path: Path) -> None:
    async with Spool(tmp_path / "s.spool", max_bytes=1 << 20) as spool:
        assert await spool.append("t1", _turns("t1", "a"), base=0)
        assert not await spool.append("t1", _turns("t1", "a"), base=0)
        assert spool.depth == 1


async def test_a_torn_last_record_is_dropped_and_never_merges_with_the_next(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20) as spool:
        await spool.append("t1", _turns("t1", "a"), base=0)
    whole = encode_record("t1", 1, _turns("t1", "b"))
    # a crash in the middle of a write
    async with await anyio.open_file(path, "ab") as fh:
        await fh.write(whole[: len(whole) // 2])
    async with Spool(path, max_bytes=1 << 20) as spool:
        assert [r.turns[0].content for r in spool.records()] == ["a-0"]
        assert spool.status()["torn_records_dropped"] == 1
        await spool.append("t1", _turns("t1", "c"), base=1)
    async with Spool(path, max_bytes=1 << 20) as spool:
        assert [r.turns[0].content for r in spool.records()] == ["a-0", "c-0"]


def test_a_record_with_a_bad_checksum_is_rejected() -> None:
    line = bytearray(encode_record("t1", 0, _turns("t1", "a")))
    assert decode_line(bytes(line)) is not None
    line[20] ^= 0x01
    assert decode_line(bytes(line)) is None


async def test_replay_applies_records_in_order_and_empties_the_file(tmp_path: Path) -> None:
    applied: list[str] = []

    async def apply(record: SpoolRecord) -> None:
        applied.append(record.turns[0].content)

    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20) as spool:
        for k in ("a", "b", "c"):
            await spool.append("t1", _turns("t1", k), base=0)
        assert await spool.replay(apply) == 3
        assert spool.depth == 0
    assert applied == ["a-0", "b-0", "c-0"]
    assert (await anyio.Path(path).stat()).st_size == 0


async def test_a_failed_replay_keeps_the_unapplied_records(tmp_path: Path) -> None:
    async def apply(record: SpoolRecord) -> None:
        if record.turns[0].content == "b-0":
            raise StoreUnavailableError("down")

    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20) as spool:
        for k in ("a", "b", "c"):
            await spool.append("t1", _turns("t1", k), base=0)
        with pytest.raises(StoreUnavailableError):
            await spool.replay(apply)
        assert [r.turns[0].content for r in spool.records()] == ["b-0", "c-0"]
    async with Spool(path, max_bytes=1 << 20) as spool:
        assert [r.turns[0].content for r in spool.records()] == ["b-0", "c-0"]


async def test_records_appended_during_a_replay_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20) as spool:
        await spool.append("t1", _turns("t1", "a"), base=0)

        async def apply(record: SpoolRecord) -> None:
            await spool.append("t2", _turns("t2", "late"), base=0)

        assert await spool.replay(apply) == 1
        assert [r.turns[0].content for r in spool.records()] == ["late-0"]
    async with Spool(path, max_bytes=1 << 20) as spool:
        assert [r.turns[0].content for r in spool.records()] == ["late-0"]


async def test_a_second_owner_of_the_same_spool_file_is_refused(tmp_path: Path) -> None:
    async with Spool(tmp_path / "s.spool", max_bytes=1 << 20):
        with pytest.raises(BlockingIOError):
            async with Spool(tmp_path / "s.spool", max_bytes=1 << 20):
                pass


async def test_open_spool_takes_a_free_file_and_adopts_orphans(tmp_path: Path) -> None:
    async with Spool(tmp_path / "turns-x.3.spool", max_bytes=1 << 20) as orphan:
        await orphan.append("t9", _turns("t9", "o"), base=0)
    async with open_spool(tmp_path, "turns-x", max_bytes=1 << 20) as first:
        assert first.path.name == "turns-x.spool"
        assert [r.thread_id for r in first.records()] == ["t9"]
        assert not await anyio.Path(tmp_path / "turns-x.3.spool").exists()
        async with open_spool(tmp_path, "turns-x", max_bytes=1 << 20) as second:
            assert second.path.name == "turns-x.1.spool"
            assert second.depth == 0


async def test_concurrent_appends_are_committed_together_and_all_land(tmp_path: Path) -> None:
    path = tmp_path / "s.spool"
    async with Spool(path, max_bytes=1 << 20) as spool:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(
                    lambda i=i: spool.append(f"t{i % 5}", _turns(f"t{i % 5}", f"k{i}"), base=0)
                )
        assert spool.depth == 50
    async with Spool(path, max_bytes=1 << 20) as spool:
        keys = sorted(r.turns[0].idempotency_key or "" for r in spool.records())
        assert keys == sorted(f"k{i}#0" for i in range(50))
        assert len(spool.pending("t3")) == 10


async def test_a_full_spool_counts_queued_appends_against_the_bound(tmp_path: Path) -> None:
    one = len(encode_record("t1", 0, _turns("t1", "k00")))
    outcomes: list[str] = []
    async with Spool(tmp_path / "s.spool", max_bytes=one * 10) as spool:

        async def write(i: int) -> None:
            try:
                await spool.append("t1", _turns("t1", f"k{i:02d}"), base=0)
                outcomes.append("ok")
            except StorageUnavailableError:
                outcomes.append("full")

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(write, i)
        assert spool.size_bytes <= spool.max_bytes
    assert outcomes.count("ok") == 10 and outcomes.count("full") == 20
