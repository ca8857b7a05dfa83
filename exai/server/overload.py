"""The overload manager: memory watermarks that stop admitting work before the process dies.

In the spirit of Envoy's overload manager. A task owned by the daemon reads the memory in use
every ``memory_check_interval_s``:

* the limit is the cgroup's (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) when there is
  one, else ``EXAI_MEMORY_LIMIT_BYTES``; with neither, the manager does nothing;
* at or above the high watermark (``EXAI_MEMORY_HIGH_WATERMARK`` × limit) it shrinks caches
  first, then sets the daemon overloaded: new connections get HTTP 503 + Retry-After and new
  calls ``data.reason = "overloaded"``; nothing in flight is touched;
* at or below the low watermark it resumes.

Reads of ``/proc`` and ``/sys`` go through a worker thread, like every file read in exai.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs
import trio

from exai.logs import log_event

if TYPE_CHECKING:
    from exai.server.app import Daemon

__all__ = ["MemoryReading", "OverloadManager", "read_memory"]

_LIMITER = anyio.CapacityLimiter(1)
_NO_LIMIT = 1 << 60


@attrs.frozen
class MemoryReading:
    used_bytes: int
    limit_bytes: int  # 0 = no limit known
    source: str


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _NO_LIMIT
    try:
        return int(text)
    except ValueError:
        return None


def _rss_bytes() -> int:
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _read_memory_sync(fallback_limit: int) -> MemoryReading:
    v2 = Path("/sys/fs/cgroup")
    limit = _read_int(v2 / "memory.max")
    if limit is not None and limit < _NO_LIMIT:
        used = _read_int(v2 / "memory.current") or _rss_bytes()
        return MemoryReading(used, limit, "cgroup v2")
    v1 = v2 / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < (1 << 50):
        used = _read_int(v1 / "memory.usage_in_bytes") or _rss_bytes()
        return MemoryReading(used, limit, "cgroup v1")
    return MemoryReading(_rss_bytes(), fallback_limit, "rss")


async def read_memory(fallback_limit: int) -> MemoryReading:
    """The process's memory use and limit (cgroup when limited, else RSS vs the setting)."""
    return await anyio.to_thread.run_sync(_read_memory_sync, fallback_limit, limiter=_LIMITER)


class OverloadManager:
    """Watches memory and suspends admission between the watermarks.

    Args:
        daemon: whose ``overloaded_reason`` it sets and clears.
        reader: ``async () -> MemoryReading``; tests pass a fake.
    """

    def __init__(
        self, daemon: Daemon, reader: Callable[[], Awaitable[MemoryReading]] | None = None
    ) -> None:
        s = daemon.settings
        self.daemon = daemon
        self.high = s.memory_high_watermark
        self.low = s.memory_low_watermark
        self.interval_s = s.memory_check_interval_s
        self.reader = reader or (lambda: read_memory(s.memory_limit_bytes))
        self.used_bytes = 0
        self.limit_bytes = 0
        self.transitions = 0

    async def check(self) -> None:
        """Take one reading and apply the watermarks."""
        reading = await self.reader()
        self.used_bytes, self.limit_bytes = reading.used_bytes, reading.limit_bytes
        if reading.limit_bytes <= 0:
            return
        fraction = reading.used_bytes / reading.limit_bytes
        daemon = self.daemon
        if daemon.overloaded_reason is None and fraction >= self.high:
            freed = daemon.shrink_caches()
            log_event(
                "overload.memory_high",
                logging.WARNING,
                used_bytes=reading.used_bytes,
                limit_bytes=reading.limit_bytes,
                cache_entries_freed=freed,
            )
            daemon.overloaded_reason = (
                f"memory at {fraction:.0%} of {reading.limit_bytes} bytes ({reading.source})"
            )
            self.transitions += 1
        elif daemon.overloaded_reason is not None and fraction <= self.low:
            daemon.overloaded_reason = None
            self.transitions += 1
            log_event("overload.memory_ok", used_bytes=reading.used_bytes)

    async def run(self) -> None:
        """Check forever (the daemon's nursery owns and cancels this task)."""
        while True:
            await self.check()
            await trio.sleep(self.interval_s)
