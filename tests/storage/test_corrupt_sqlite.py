"""A corrupt SQLite file is never served as healthy (issue 12, finding 5).

Bit-flipped pages used to start fine, ``/readyz`` said ready, and every call paid for an answer
and then failed with "database disk image is malformed" (with the state path in the message).
Now: a quick integrity check at start refuses the file, naming it and how to recover; damage met
at run time makes the store unavailable (breaker, ``/readyz`` 503, turns to the spool) and the
answer is still returned; no client-visible message holds a server path.

Against a real ``exai serve`` process with the mock provider.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.testing import MockUpstream
from tests.adversarial.harness import live_daemon
from tests.helpers import REPO, Rpc, subprocess_env, ws

pytestmark = pytest.mark.anyio


def _make_store(db: Path, threads: int = 40) -> list[str]:
    """A healthy v2 store with some threads (several pages), checkpointed and closed."""
    import uuid

    from exai.storage.sqlite import _MIGRATIONS, SCHEMA_VERSION

    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    for v in range(1, SCHEMA_VERSION + 1):
        for stmt in _MIGRATIONS[v].split(";"):
            if stmt.strip():
                conn.execute(stmt)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    ids = []
    for i in range(threads):
        cid = str(uuid.uuid4())
        ids.append(cid)
        conn.execute(
            "INSERT INTO threads (id, created_at, updated_at, expires_at, turn_count, bytes) "
            "VALUES (?, 1e9, 1e9, 9e12, 1, 2000)",
            (cid,),
        )
        conn.execute(
            "INSERT INTO turns VALUES (?, 1, 'user', ?, 'chat', '', '', '[]', 1e9, ?)",
            (cid, f"{i}:" + "z" * 2000, f"old{i}#0"),
        )
    conn.commit()
    conn.close()
    return ids


def _flip_pages(db: Path) -> None:
    """Overwrite every page but the first (the header and the schema) with garbage."""
    page = 4096
    size = db.stat().st_size
    assert size > 4 * page
    with db.open("r+b") as fh:
        for offset in range(page, size, page):
            fh.seek(offset)
            fh.write(os.urandom(page))
        fh.flush()
        os.fsync(fh.fileno())


def _env(tmp_path: Path, mock: MockUpstream) -> dict[str, str]:
    return subprocess_env(tmp_path, **_settings(mock))


def _settings(mock: MockUpstream) -> dict[str, str]:
    return dict(
        EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
        EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        EXAI_FAST_MODELS="mock-fast",
        EXAI_QUALITY_MODELS="mock-fast",
        EXAI_STORE_TIMEOUT_S="1",
    )


async def test_a_corrupt_sqlite_file_is_refused_at_start_naming_it_and_how_to_recover(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state" / "exai.sqlite3"
    await trio.to_thread.run_sync(_make_store, db)
    await trio.to_thread.run_sync(_flip_pages, db)
    async with MockUpstream(models=("mock-fast",)) as mock:
        env = _env(tmp_path, mock)
        done = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "exai.cli", "serve"],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
    assert done.returncode != 0
    assert "listening on" not in done.stderr
    assert str(db) in done.stderr
    assert "recover" in done.stderr and ".recover" in done.stderr


async def _call(url: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    async with ws(url) as conn:
        with trio.fail_after(30):
            return await Rpc(conn).call(name, args)


async def test_a_store_damaged_at_run_time_is_unavailable_and_the_answer_still_returned(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state" / "exai.sqlite3"
    old = await trio.to_thread.run_sync(_make_store, db)
    async with (
        MockUpstream(models=("mock-fast",)) as mock,
        live_daemon(tmp_path, plugin=False, **_settings(mock)) as daemon,
    ):
        assert await daemon.ready()
        await trio.to_thread.run_sync(_flip_pages, db)
        replies = [
            await _call(
                daemon.url, "chat", {"prompt": f"after the damage {i}", "model": "mock-fast"}
            )
            for i in range(6)
        ]
        continued = await _call(
            daemon.url, "chat", {"prompt": "go on", "model": "mock-fast", "continuation_id": old[0]}
        )
        ready = await daemon.get("/readyz")
        status = await daemon.status()
    for reply in replies:  # every call was answered, its turns kept in the spool
        assert reply["result"]["isError"] is False, reply
        assert reply["result"]["structuredContent"]["content"]
    conv = status["conversations"]
    assert conv["primary"]["corrupt"] is True
    assert conv["spool"]["depth"] >= 6
    assert conv["primary"]["breaker"]["state"] != "closed"
    assert ready.status_code == 503
    assert "corrupt" in ready.json()["reason"]
    # the continuation cannot be read: an explicit, retryable refusal without a server path
    error = continued["error"]
    assert error["data"]["reason"] in ("store_unavailable", "circuit_open")
    visible = json.dumps([replies, continued, ready.json(), status])
    assert str(tmp_path) not in visible  # no server path (not even in status)
