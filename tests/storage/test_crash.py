"""Must-show 5: ``kill -9`` while turns sit in the spool; the next start replays them. And
``kill -9`` while many calls' turns are being group-committed to SQLite: every turn a call was
told is stored is there, exactly once."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import anyio
import pytest

from exai.storage.service import ConversationService
from tests.storage.conftest import make_settings

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


async def test_spooled_turns_survive_kill_9_and_are_replayed_once(
    tmp_path: Path, stall_detector: object
) -> None:
    settings = make_settings(tmp_path)
    confirmed: list[tuple[str, str]] = []  # (thread id, call key) whose add_turns returned
    async with await anyio.open_process(
        [sys.executable, "-m", "tests.storage.spool_child", settings.state_dir],
        cwd=REPO,
    ) as proc:
        assert proc.stdout is not None
        buffer = b""
        with anyio.fail_after(30):
            while len(confirmed) < 60:
                buffer += await proc.stdout.receive()
                *lines, buffer = buffer.split(b"\n")
                confirmed += [tuple(line.decode().split()) for line in lines]  # type: ignore[misc]
        proc.send_signal(signal.SIGKILL)  # while it keeps writing: maybe mid-record
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    async with ConversationService.open(settings) as svc:
        assert svc.spool.depth >= len(confirmed)
        with anyio.fail_after(10):
            await svc.wait_replayed()
        threads = {}
        for thread_id in {t for t, _ in confirmed}:
            threads[thread_id] = await svc.store.get_thread(thread_id)

    contents = [t.content for thread in threads.values() if thread for t in thread.turns]
    assert len(contents) == len(set(contents)), "a spooled turn was replayed twice"
    for thread_id, key in confirmed:
        thread = threads[thread_id]
        assert thread is not None
        got = [t.content for t in thread.turns]
        assert f"{key}:q" in got and f"{key}:a" in got, f"{key} was confirmed but lost"
    for thread in threads.values():
        assert thread is not None
        assert [t.seq for t in thread.turns] == list(range(1, len(thread.turns) + 1))
        keys = [t.content for t in thread.turns]
        assert keys == sorted(keys, key=lambda c: (c[:-2], c.endswith(":a")))


async def test_a_restart_with_nothing_spooled_replays_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with ConversationService.open(settings) as svc:
        assert svc.spool.depth == 0
    async with ConversationService.open(settings) as svc:
        assert svc.spool.depth == 0
        assert svc.status()["spool"]["replayed"] == 0


async def test_turns_confirmed_by_group_commits_survive_kill_9_exactly_once(
    tmp_path: Path, stall_detector: object
) -> None:
    settings = make_settings(tmp_path)
    confirmed: list[tuple[str, str]] = []  # (thread id, call key) whose add_turns returned
    async with await anyio.open_process(
        [sys.executable, "-m", "tests.storage.group_commit_child", settings.state_dir],
        cwd=REPO,
    ) as proc:
        assert proc.stdout is not None
        buffer = b""
        with anyio.fail_after(60):
            while len(confirmed) < 400:
                buffer += await proc.stdout.receive()
                *lines, buffer = buffer.split(b"\n")
                confirmed += [tuple(line.decode().split()) for line in lines]  # type: ignore[misc]
        proc.send_signal(signal.SIGKILL)  # 32 writers in flight: mid-transaction, mid-fsync
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    async with ConversationService.open(settings) as svc:
        assert svc.spool.depth == 0  # the store was up: nothing went to the spool
        threads = {t: await svc.store.get_thread(t) for t in {t for t, _ in confirmed}}
    contents = [t.content for thread in threads.values() if thread for t in thread.turns]
    assert len(contents) == len(set(contents)), "a turn is stored twice"
    for thread_id, key in confirmed:
        thread = threads[thread_id]
        assert thread is not None
        got = {t.content for t in thread.turns}
        assert f"{key}:q" in got and f"{key}:a" in got, f"{key} was confirmed but lost"
    for thread in threads.values():
        assert thread is not None
        assert [t.seq for t in thread.turns] == list(range(1, len(thread.turns) + 1))
        # a call's two turns are adjacent: written in one transaction, never split by another
        for q, a in zip(thread.turns[::2], thread.turns[1::2], strict=True):
            assert q.content.endswith(":q") and a.content == q.content[:-2] + ":a"
