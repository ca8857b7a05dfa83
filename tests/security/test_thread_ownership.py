"""Threads belong to the identity that created them (issue 12, finding 4).

A new thread's id was a uuid5 of a constant and ``s:<session>:<request id>``, both of which
appear in the audit log and in task names, and any identity that knew an id could continue the
thread. Now: ids are random, another identity gets exactly the answer an unknown id gets, a
setting opts in to sharing, and idempotent creation is keyed in the store (schema version 2 of
SQLite and PostgreSQL, applied by ``exai migrate``).

Against a real ``exai serve`` process with two client tokens and the mock provider.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.storage.model import Thread, Turn
from exai.storage.service import ConversationService, creation_key
from exai.testing import MockUpstream
from tests.helpers import REPO, Rpc, async_daemon_process, subprocess_env, ws
from tests.storage.conftest import make_settings

pytestmark = pytest.mark.anyio

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}


@asynccontextmanager
async def daemon(tmp_path: Path, **env: str) -> AsyncIterator[tuple[str, MockUpstream]]:
    async with MockUpstream(models=("mock-fast",)) as mock:
        full = subprocess_env(
            tmp_path,
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
            EXAI_FAST_MODELS="mock-fast",
            EXAI_QUALITY_MODELS="mock-fast",
            EXAI_TOKENS=",".join(f"{n}:{t}" for n, t in TOKENS.items()),
            **env,
        )
        async with async_daemon_process(tmp_path, env=full) as (_proc, url):
            yield url, mock


async def chat(url: str, who: str, prompt: str, cid: str | None = None, **kw: Any) -> Any:
    args: dict[str, Any] = {"prompt": prompt, "model": "mock-fast"}
    if cid is not None:
        args["continuation_id"] = cid
    async with ws(url, token=TOKENS[who]) as conn:
        with trio.fail_after(30):
            return await Rpc(conn).call("chat", args, **kw)


def error_of(reply: dict[str, Any], cid: str) -> tuple[int, str, dict[str, Any]]:
    """(code, message with the id blanked out, data without the id)."""
    err = reply["error"]
    data = {k: v for k, v in (err.get("data") or {}).items() if k != "continuation_id"}
    return err["code"], err["message"].replace(cid, "<id>"), data


async def test_another_identity_gets_the_answer_an_unknown_id_gets(tmp_path: Path) -> None:
    async with daemon(tmp_path) as (url, mock):
        first = await chat(url, "alice", "the secret word is HERON")
        cid = first["result"]["structuredContent"]["continuation_id"]
        sent_before = len(mock.chat_requests)
        bob = await chat(url, "bob", "what was the word?", cid)
        unknown_id = str(uuid.uuid4())
        unknown = await chat(url, "bob", "what was the word?", unknown_id)
        alice = await chat(url, "alice", "what was the word?", cid)
        sent_to_upstream = mock.chat_requests[sent_before:]
    assert "error" in bob, bob
    assert error_of(bob, cid) == error_of(unknown, unknown_id)  # no oracle
    assert bob["error"]["data"]["reason"] == "continuation_not_found"
    assert "HERON" not in json.dumps(bob)
    # bob's refusal cost nothing upstream; alice's continuation carried the earlier turn
    assert len(sent_to_upstream) == 1
    assert any("HERON" in m["content"] for m in sent_to_upstream[0].json["messages"])
    assert alice["result"]["structuredContent"]["continuation_id"] == cid


async def test_continuation_ids_are_random_not_derived_from_the_request(tmp_path: Path) -> None:
    async with daemon(tmp_path) as (url, _mock):
        ids = []
        for _ in range(3):  # same token, same request id (1) on a fresh connection each time
            reply = await chat(url, "alice", "hello", id=1)
            ids.append(reply["result"]["structuredContent"]["continuation_id"])
    assert len(set(ids)) == 3
    for cid in ids:
        assert uuid.UUID(cid).version == 4  # 122 random bits, not a uuid5 of anything logged


async def test_a_setting_shares_threads_across_identities(tmp_path: Path) -> None:
    async with daemon(tmp_path, EXAI_CONVERSATION_SHARED_ACROSS_IDENTITIES="1") as (url, mock):
        first = await chat(url, "alice", "the secret word is HERON")
        cid = first["result"]["structuredContent"]["continuation_id"]
        bob = await chat(url, "bob", "what was the word?", cid)
        sent = mock.chat_requests[-1].json["messages"]
    assert bob["result"]["structuredContent"]["continuation_id"] == cid
    assert any("HERON" in m["content"] for m in sent)


async def test_a_re_run_under_the_same_key_joins_the_thread_its_first_run_created(
    tmp_path: Path,
) -> None:
    """Idempotent creation is keyed by the call's key in the store: two writes under one
    creation key land in one thread, whatever id each writer picked."""
    settings = make_settings(tmp_path)
    async with ConversationService.open(settings) as svc:
        key = creation_key("alice", "k:alice:bridge-1")
        firsts = []
        for _run in range(2):  # the same call run twice, each with its own random id
            thread = Thread(
                id=str(uuid.uuid4()),
                created_at=1.0,
                updated_at=1.0,
                expires_at=9e9,
                owner="alice",
                creation_key=key,
            )
            after = await svc.add_turns(
                thread, [Turn(role="user", content="q"), Turn(role="assistant", content="a")],
                "chat:k:alice:bridge-1", owner="alice",
            )  # fmt: skip
            firsts.append(after.id)
        stored = await svc.store.get_thread(firsts[0])
    assert firsts[0] == firsts[1]
    assert stored is not None and [t.content for t in stored.turns] == ["q", "a"]
    assert stored.owner == "alice"


def _v1_database(path: Path) -> str:
    """A SQLite file as the previous exai wrote it (schema version 1) with one thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    from exai.storage.sqlite import _MIGRATIONS

    for stmt in _MIGRATIONS[1].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    cid = str(uuid.uuid4())
    conn.execute("INSERT INTO threads VALUES (?, 1e9, 1e9, 9e12, 1, 1)", (cid,))
    conn.execute(
        "INSERT INTO turns VALUES (?, 1, 'user', 'old', 'chat', '', '', '[]', 1e9, 'old#0')",
        (cid,),
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    return cid


def _version_and_owner(db: Path, thread_id: str) -> tuple[int, str | None]:
    conn = sqlite3.connect(db)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        row = conn.execute("SELECT owner FROM threads WHERE id = ?", (thread_id,)).fetchone()
        return int(version), row[0]
    finally:
        conn.close()


async def test_exai_migrate_upgrades_a_sqlite_file_and_old_threads_belong_to_nobody(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state" / "exai.sqlite3"
    old = await trio.to_thread.run_sync(_v1_database, db)
    env = subprocess_env(tmp_path)
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "exai.cli", "migrate"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["applied"] == [2]
    version, owner = await trio.to_thread.run_sync(_version_and_owner, db, old)
    assert version == 2 and owner is None
    async with daemon(tmp_path) as (url, _mock):
        reply = await chat(url, "alice", "continue", old)
    assert reply["error"]["data"]["reason"] == "continuation_not_found"
