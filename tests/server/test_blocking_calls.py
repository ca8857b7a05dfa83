"""Issue 11.7 at unit level: logging never writes on the caller's thread, drops are counted,
queued lines are flushed; ``platform.platform()`` runs once, in a worker thread."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from exai import logs
from exai.config import Secret
from exai.tools import core


class BlockedStream(io.StringIO):
    """A stderr whose writes block until released (a full pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writer_threads: set[str] = set()

    def write(self, s: str) -> int:
        self.writer_threads.add(threading.current_thread().name)
        self.release.wait(10)
        return super().write(s)


@pytest.fixture
def blocked_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockedStream]:
    stream = BlockedStream()
    monkeypatch.setattr(logs, "QUEUE_MAX", 50)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield stream
    stream.release.set()
    logs.flush_logging()
    logs.logger.handlers[:] = []
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logging_never_waits_for_stderr_and_counts_what_it_drops(
    blocked_stderr: BlockedStream,
) -> None:
    logs.configure_logging("info", "json", stream=blocked_stderr)
    before = logs.dropped_log_records()

    for i in range(200):  # would block on the first line if written here
        logs.log_event("test.event", n=i)

    assert logs.dropped_log_records() - before >= 200 - 50 - 1
    blocked_stderr.release.set()
    logs.flush_logging()
    lines = [json.loads(x) for x in blocked_stderr.getvalue().splitlines()]
    assert lines[0]["event"] == "test.event" and lines[0]["n"] == 0
    assert threading.current_thread().name not in blocked_stderr.writer_threads


def test_the_log_record_is_made_by_the_writer_thread_not_the_caller(
    blocked_stderr: BlockedStream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: building a LogRecord (caller lookup, handler locks) cost ≈ 15 µs per line on
    the loop; the caller now only queues a tuple, and the lines come out the same."""
    made_on: list[str] = []
    make = logging.Logger.makeRecord

    def spy(self: logging.Logger, *args: Any, **kwargs: Any) -> logging.LogRecord:
        made_on.append(threading.current_thread().name)
        return make(self, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "makeRecord", spy)
    logs.configure_logging("info", "json", stream=blocked_stderr)
    logs.log_event("test.fast", logging.WARNING, n=1, secret=Secret("s3cr3t"))
    blocked_stderr.release.set()
    logs.flush_logging()

    line = json.loads(blocked_stderr.getvalue().splitlines()[0])
    assert line["event"] == "test.fast" and line["level"] == "warning" and line["n"] == 1
    assert "s3cr3t" not in blocked_stderr.getvalue()
    assert abs(line["ts"] - time.time()) < 60
    assert made_on and threading.current_thread().name not in made_on


def test_long_fields_are_clipped_so_the_queue_is_bounded_in_bytes(
    blocked_stderr: BlockedStream,
) -> None:
    logs.configure_logging("info", "json", stream=blocked_stderr)
    logs.log_event("test.long", text="x" * 100_000)
    blocked_stderr.release.set()
    logs.flush_logging()

    line = json.loads(blocked_stderr.getvalue().splitlines()[0])
    assert len(line["text"]) == logs.FIELD_MAX_CHARS


@pytest.mark.anyio
async def test_the_version_tool_computes_the_platform_once_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def platform() -> str:
        calls.append(threading.current_thread().name)
        return "TestOS-1.0"

    monkeypatch.setattr(core.platform, "platform", platform)
    monkeypatch.setattr(core, "_platform", None)
    loop_thread = threading.current_thread().name

    ctx: Any = SimpleNamespace(services={})
    first = await core.VERSION.handler({}, ctx)
    second = await core.VERSION.handler({}, ctx)

    assert first.structured is not None and first.structured["platform"] == "TestOS-1.0"
    assert second.structured == first.structured
    assert len(calls) == 1 and calls[0] != loop_thread
