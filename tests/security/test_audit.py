"""The audit log: one valid JSON line per call, rotation-friendly, and never a stall."""

from __future__ import annotations

import json
import os
import stat

import anyio
import pytest

from exai.config import Secret
from exai.server.audit import FIELDS, AuditLog
from tests.helpers import make_settings


def lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def call(i: int = 0, **over) -> dict:
    fields = {
        "tool": "chat",
        "outcome": "ok",
        "client": "alice",
        "peer": "127.0.0.1",
        "provider": "kimi",
        "model": "kimi-k2-turbo-preview",
        "key_fp": "1a2b3c4d",
        "duration_s": 0.25,
        "session": "s-1",
        "request_id": i,
    }
    fields.update(over)
    return fields


@pytest.mark.anyio
async def test_each_record_becomes_one_json_line_with_every_field(tmp_path):
    path = tmp_path / "audit" / "audit.log"  # the directory is created on entry
    async with AuditLog(path) as audit:
        for i in range(3):
            audit.record(**call(i))
        with anyio.fail_after(5):
            await audit.flush()
    got = lines(path)
    assert [g["request_id"] for g in got] == [0, 1, 2]
    assert list(got[0])[: len(FIELDS)] == list(FIELDS)
    assert got[0]["client"] == "alice" and got[0]["key_fp"] == "1a2b3c4d"
    assert got[0]["ts"].endswith("Z") and "T" in got[0]["ts"]
    assert audit.statistics().written == 3


@pytest.mark.anyio
async def test_leaving_the_block_writes_what_is_still_queued(tmp_path):
    path = tmp_path / "audit.log"
    async with AuditLog(path) as audit:
        for i in range(500):
            audit.record(**call(i))
    assert len(lines(path)) == 500
    assert audit.statistics().queued == 0


@pytest.mark.anyio
async def test_the_file_is_private_to_its_owner(tmp_path):
    path = tmp_path / "audit.log"
    async with AuditLog(path) as audit:
        audit.record(**call())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.anyio
async def test_a_secret_passed_by_mistake_is_written_masked(tmp_path):
    path = tmp_path / "audit.log"
    async with AuditLog(path) as audit:
        audit.record(**call(client=Secret("tok-audit-secret-0001")), note=Secret("sk-0002-key"))
    text = path.read_text()
    assert "tok-audit-secret-0001" not in text and "sk-0002-key" not in text
    assert lines(path)[0]["client"] == repr(Secret("x"))


@pytest.mark.anyio
async def test_rotation_by_move_sends_later_lines_to_the_new_file(tmp_path):
    path = tmp_path / "audit.log"
    async with AuditLog(path) as audit:
        audit.record(**call(1))
        audit.record(**call(2))
        with anyio.fail_after(5):
            await audit.flush()
        os.rename(path, tmp_path / "audit.log.1")  # what logrotate does before `create`
        audit.record(**call(3))
        with anyio.fail_after(5):
            await audit.flush()
    assert [g["request_id"] for g in lines(tmp_path / "audit.log.1")] == [1, 2]
    assert [g["request_id"] for g in lines(path)] == [3]


@pytest.mark.anyio
async def test_a_full_channel_drops_records_instead_of_blocking(tmp_path, exai_log):
    path = tmp_path / "audit.log"
    stuck_disk = anyio.CapacityLimiter(1)  # held: the writer cannot write until released
    await stuck_disk.acquire()
    async with AuditLog(path, capacity=5, limiter=stuck_disk) as audit:
        # record() is synchronous: 50 calls return without ever waiting for the writer
        for i in range(50):
            audit.record(**call(i))
        stats = audit.statistics()
        assert stats.dropped >= 50 - 5 - 1  # the buffer, plus one handed to the writer
        assert stats.recorded + stats.dropped == 50
        stuck_disk.release()
    assert len(lines(path)) == stats.recorded
    warnings = [r for r in exai_log if getattr(r, "event", "") == "audit.dropped"]
    assert 1 <= len(warnings) < stats.dropped  # rate-limited, not one per drop


@pytest.mark.anyio
async def test_an_unwritable_file_counts_write_errors_and_keeps_running(tmp_path, exai_log):
    path = tmp_path / "audit.log"
    path.mkdir()  # a directory where the file should be: every open fails
    async with AuditLog(path) as audit:
        audit.record(**call(1))
        with anyio.fail_after(5):
            await audit.flush()
        audit.record(**call(2))
        with anyio.fail_after(5):
            await audit.flush()
    assert audit.statistics().write_errors == 2
    assert any(getattr(r, "event", "") == "audit.write_failed" for r in exai_log)


@pytest.mark.anyio
async def test_the_disabled_log_accepts_records_and_writes_nothing(tmp_path):
    settings = make_settings(tmp_path)  # audit_log empty
    async with AuditLog.from_settings(settings) as audit:
        audit.record(**call())
    assert not audit.enabled
    assert audit.statistics().recorded == 0
    assert list(tmp_path.iterdir()) == []


def test_from_settings_uses_the_configured_path(tmp_path):
    settings = make_settings(tmp_path, audit_log=str(tmp_path / "a.log"))
    assert AuditLog.from_settings(settings).path == tmp_path / "a.log"
