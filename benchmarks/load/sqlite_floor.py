"""The floor's durable write: one SQLite commit of a chat call's two turns, as exai stores them.

Bare :mod:`sqlite3` with the daemon's settings (WAL, ``synchronous=FULL``, autocommit off via an
explicit ``BEGIN IMMEDIATE``) and the daemon's tables (``threads``, ``turns``; the schema of
``exai/storage/sqlite.py`` version 1). One call = what exai's ``append_turns`` does for a new
chat: insert the thread, read its counters, insert the user and the assistant turn (each with its
unique idempotency key), update the counters, ``COMMIT`` — the fsync that makes both turns
durable. No exai code runs here, so the figure stays the floor while exai's store changes.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS threads (
    id          TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    turn_count  INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS threads_expires_at ON threads (expires_at);
CREATE TABLE IF NOT EXISTS turns (
    thread_id        TEXT NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    role             TEXT NOT NULL,
    content          TEXT NOT NULL,
    tool             TEXT NOT NULL DEFAULT '',
    provider         TEXT NOT NULL DEFAULT '',
    model            TEXT NOT NULL DEFAULT '',
    files            TEXT NOT NULL DEFAULT '[]',
    created_at       REAL NOT NULL,
    idempotency_key  TEXT NOT NULL UNIQUE,
    PRIMARY KEY (thread_id, seq)
);
"""

TTL_S = 3 * 3600.0


def open_db(path: str | Path) -> sqlite3.Connection:
    """A connection configured as exai's store configures its own."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=0)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(SCHEMA)
    return conn


def commit_two_turns(conn: sqlite3.Connection, prompt: str, answer: str) -> None:
    """One transaction: a new thread with a user and an assistant turn, committed (fsync)."""
    thread_id = uuid.uuid4().hex
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO threads (id, created_at, updated_at, expires_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (thread_id, now, now, now + TTL_S),
        )
        count, size = conn.execute(
            "SELECT turn_count, bytes FROM threads WHERE id = ?", (thread_id,)
        ).fetchone()
        for role, content, provider, model in (
            ("user", prompt, "", ""),
            ("assistant", answer, "mock", "mock-fast"),
        ):
            count += 1
            size += len(content.encode())
            conn.execute(
                "INSERT INTO turns (thread_id, seq, role, content, tool, provider, model, files, "
                "created_at, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idempotency_key) DO NOTHING",
                (
                    thread_id,
                    count,
                    role,
                    content,
                    "chat",
                    provider,
                    model,
                    "[]",
                    now,
                    f"chat:{thread_id}:{role}",
                ),
            )
        conn.execute(
            "UPDATE threads SET turn_count = ?, bytes = ?, updated_at = MAX(updated_at, ?), "
            "expires_at = MAX(expires_at, ?) WHERE id = ?",
            (count, size, now, now + TTL_S, thread_id),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
