"""The overload manager: admission on the memory exai accounts for, RSS as a backstop.

In the spirit of Envoy's overload manager, with one lesson learnt: a Python heap rarely gives
memory back, so admission that waits for RSS to fall below a low mark may never resume.

Admission is decided on **accounted** memory (:mod:`exai.server.budget`): every pending
request and unwritten answer is charged to the daemon's :class:`~exai.server.budget.
MemoryBudget`, and a call that does not fit is refused with ``data.reason = "overloaded"``.
Charges are given back as answers are written, so admission resumes by itself. When a memory
limit is known — the cgroup's (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), else
``EXAI_MEMORY_LIMIT_BYTES`` — the first reading sets the budget to what is left of
``high watermark × limit`` after the daemon's resident size at start and the byte budgets of
its caches (never more than ``EXAI_MAX_PENDING_BYTES``, never less than two frames).

RSS (or the cgroup's usage) is the **backstop**, read every ``memory_check_interval_s``:

* at or above ``high watermark × limit`` the caches are shed (stored results down to half
  their budget, services' ``shrink_caches()``) and freed heap is handed back to the system
  (``malloc_trim``, glibc); if requests are pending, new calls and connections are refused
  until they have drained;
* admission resumes when usage falls to ``low watermark × limit`` **or** when nothing is
  pending any more: then what remains is caches and heap slack, not work in flight, and
  refusing would only keep the daemon refusing until a restart.

With or without a limit, memory a burst leaves behind is handed back: at start the daemon
fixes glibc's mmap threshold at 128 KiB (:func:`tune_malloc`: large answers and frames get
their own mappings, unmapped when freed), and when RSS exceeds the start size plus what exai
accounts for by more than 64 MiB it calls ``malloc_trim``.

Reads of ``/proc`` and ``/sys`` and ``malloc_trim`` go through a worker thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import attrs
import trio

from exai.config import Settings
from exai.logs import log_event
from exai.server.budget import MemoryBudget

__all__ = ["MemoryReading", "OverloadManager", "read_memory", "tune_malloc"]

_LIMITER = anyio.CapacityLimiter(1)
#: heap the process may hold beyond its start size and what it accounts for before a trim
TRIM_SLACK_BYTES = 64 * 1024 * 1024
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


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> None:
    """Give freed heap back to the system (glibc only; elsewhere nothing happens)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


#: glibc's ``M_MMAP_THRESHOLD`` option of ``mallopt``
_M_MMAP_THRESHOLD = -3
#: allocations at least this large get their own mapping, returned to the system when freed
MMAP_THRESHOLD_BYTES = 128 * 1024


def tune_malloc() -> bool:
    """Keep glibc from serving large blocks (answers, frames) from the heap.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after
    which large strings come from the heap, whose freed pages stay resident: a burst of large
    answers then leaves RSS high for good. Fixing the threshold keeps every block of 128 KiB or
    more in its own mapping, unmapped when freed. Returns whether it applied (glibc only).
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


class OverloadManager:
    """Sets the daemon's memory budget from its limit, and watches RSS as a backstop.

    Args:
        settings: the watermarks, the check interval, ``memory_limit_bytes`` (when no cgroup
            limit is found), ``max_pending_bytes`` and ``max_frame_bytes`` (the budget's bounds).
        budget: the pending-bytes budget it sizes, and whose charges tell whether work is
            pending.
        reserved_bytes: ``() -> int``, what the daemon's caches may hold at most (left out of
            the budget).
        shrink_caches: ``() -> int``, drop what can be rebuilt; returns entries freed.
        cached_bytes: ``() -> int``, what the caches hold now (the stored results): with the
            pending bytes, the memory exai accounts for.
        reader: ``async () -> MemoryReading``; tests pass a fake.

    :attr:`reason` is why the backstop refuses new work now (``None`` = admitting); the
    daemon's :class:`~exai.server.readiness.Readiness` reads it.
    """

    def __init__(
        self,
        settings: Settings,
        budget: MemoryBudget,
        *,
        reserved_bytes: Callable[[], int],
        shrink_caches: Callable[[], int],
        cached_bytes: Callable[[], int],
        reader: Callable[[], Awaitable[MemoryReading]] | None = None,
    ) -> None:
        s = settings
        self.settings = settings
        self.budget = budget
        self.reserved_bytes = reserved_bytes
        self.shrink_caches = shrink_caches
        self.cached_bytes = cached_bytes
        self.high = s.memory_high_watermark
        self.low = s.memory_low_watermark
        self.interval_s = s.memory_check_interval_s
        self.reader = reader or (lambda: read_memory(s.memory_limit_bytes))
        self.used_bytes = 0
        self.limit_bytes = 0
        #: resident size at the first reading (what the budget is planned around)
        self.baseline_bytes = 0
        self.transitions = 0
        self.sheds = 0
        self.trims = 0
        self._since_trim = 0
        self._planned = False
        #: why the backstop refuses new work now, or None
        self.reason: str | None = None

    def plan(self, reading: MemoryReading) -> None:
        """Fit the daemon's pending-bytes budget into the memory limit (first reading only)."""
        self._planned = True
        self.baseline_bytes = reading.used_bytes
        if reading.limit_bytes <= 0:
            return
        s = self.settings
        room = int(self.high * reading.limit_bytes) - reading.used_bytes - self.reserved_bytes()
        floor = 2 * s.max_frame_bytes
        self.budget.limit_bytes = min(s.max_pending_bytes, max(floor, room))
        log_event(
            "overload.planned",
            limit_bytes=reading.limit_bytes,
            baseline_bytes=reading.used_bytes,
            reserved_bytes=self.reserved_bytes(),
            pending_budget_bytes=self.budget.limit_bytes,
        )

    async def check(self) -> None:
        """Take one reading and apply the backstop."""
        reading = await self.reader()
        if not self._planned:
            self.plan(reading)
        self.used_bytes, self.limit_bytes = reading.used_bytes, reading.limit_bytes
        await self._trim_slack(reading.used_bytes)
        if reading.limit_bytes <= 0:
            return
        fraction = reading.used_bytes / reading.limit_bytes
        pending = self.budget.charged_bytes > 0
        if fraction >= self.high:
            freed = self.shrink_caches()
            self.sheds += 1
            await anyio.to_thread.run_sync(_malloc_trim, limiter=_LIMITER)
            if self.reason is None and pending:
                self.reason = (
                    f"memory at {fraction:.0%} of {reading.limit_bytes} bytes ({reading.source})"
                )
                self.transitions += 1
                log_event(
                    "overload.memory_high",
                    logging.WARNING,
                    used_bytes=reading.used_bytes,
                    limit_bytes=reading.limit_bytes,
                    cache_entries_freed=freed,
                )
                return
        if self.reason is not None and (fraction <= self.low or not pending):
            self.reason = None
            self.transitions += 1
            log_event("overload.memory_ok", used_bytes=reading.used_bytes, pending=pending)

    async def _trim_slack(self, used: int) -> None:
        """After a burst, hand freed heap back: when the process holds far more than its start
        size plus what it accounts for, ``malloc_trim`` (at most every 10 checks)."""
        accounted = self.budget.charged_bytes + self.cached_bytes()
        slack = used - self.baseline_bytes - accounted
        self._since_trim += 1
        if slack > TRIM_SLACK_BYTES and self._since_trim >= 10:
            self._since_trim = 0
            self.trims += 1
            await anyio.to_thread.run_sync(_malloc_trim, limiter=_LIMITER)

    async def run(self) -> None:
        """Check forever (the daemon's nursery owns and cancels this task)."""
        while True:
            await self.check()
            await trio.sleep(self.interval_s)
