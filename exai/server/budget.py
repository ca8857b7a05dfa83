"""Byte and count budgets for requests admitted but not yet answered.

Every ``tools/call`` is *admitted* before any task is started for it: its session's
:class:`Ledger` and the daemon's :class:`MemoryBudget` must both have room for it. From then
until its answer has been written to the socket it is *pending* — running, waiting in its
session's FIFO for a slot, or waiting to be written — and its bytes are charged:

* when admitted: :attr:`exai.server.protocol.Request.cost_bytes` (the frame and its decoded
  form, an upper bound);
* when its answer is known: the answer's size, until it has been written;
* the encoded text of every message queued for a session's writer (see
  :mod:`exai.server.outbox`).

A request that does not fit is refused at once with ``data.reason = "overloaded"``; nothing
waits for room. As answers are written and connections close, charges are given back, so
admission resumes on its own: no state has to "release". See ``docs/security.md`` for how these
budgets add up to the daemon's memory ceiling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from exai.config import Settings

__all__ = ["InboundMeter", "Ledger", "MemoryBudget", "memory_ceiling"]


class MemoryBudget:
    """The daemon-wide count of bytes charged by every session, and its limits.

    The budget has two pools, so clients that stop reading or ask for huge answers cannot starve
    the ones that read theirs. Heavy sessions (and frames being received) may charge up to
    ``limit_bytes``; **light** sessions — those holding less than :data:`LIGHT_SESSION_BYTES` —
    may charge while the total is under ``limit_bytes`` and, past it, from a reserve of a
    quarter of it kept for them alone. A session moves between the pools as it crosses the
    threshold. When the reserve itself is exhausted the budget is
    *full*: every call and every new connection is refused until the reserve has drained to
    ``resume_fraction`` of itself.

    Args:
        limit_bytes: what heavy sessions may charge in all (``EXAI_MAX_PENDING_BYTES``, lowered
            by the overload manager when a memory limit is known).
        resume_fraction: hysteresis of the *full* state.
    """

    #: the reserve of light sessions, as a share of the limit (on top of it)
    RESERVE_FRACTION = 0.25

    def __init__(self, limit_bytes: int, resume_fraction: float = 0.8) -> None:
        self.limit_bytes = limit_bytes
        self.resume_fraction = resume_fraction
        self.charged_bytes = 0
        #: the part of ``charged_bytes`` held by light sessions
        self.light_bytes = 0
        self.peak_bytes = 0
        #: True from the moment the reserve could not take a light session's request until it
        #: drains: the daemon then refuses new calls and connections
        self.full = False
        self._changed = trio.Event()

    @property
    def reserve_bytes(self) -> int:
        return int(self.limit_bytes * self.RESERVE_FRACTION)

    @property
    def heavy_bytes(self) -> int:
        return self.charged_bytes - self.light_bytes

    def fits(self, nbytes: int, *, light: bool = False) -> bool:
        """Whether ``nbytes`` more may be charged now by a light or a heavy session."""
        if light:
            total = self.charged_bytes + nbytes <= self.limit_bytes
            if total or self.light_bytes + nbytes <= self.reserve_bytes:
                return True
            self.full = True
            return False
        return self.heavy_bytes + nbytes <= self.limit_bytes

    def charge(self, nbytes: int, *, light: bool = False) -> None:
        self.charged_bytes += nbytes
        if light:
            self.light_bytes += nbytes
        if self.charged_bytes > self.peak_bytes:
            self.peak_bytes = self.charged_bytes

    def refund(self, nbytes: int, *, light: bool = False) -> None:
        self.charged_bytes -= nbytes
        if light:
            self.light_bytes -= nbytes
        if self.full and self.light_bytes <= self.resume_fraction * self.reserve_bytes:
            self.full = False
        self._wake()

    def move(self, nbytes: int, *, to_light: bool) -> None:
        """A session holding ``nbytes`` crossed the light threshold."""
        self.light_bytes += nbytes if to_light else -nbytes
        self._wake()

    def _wake(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = trio.Event()

    _waiting = 0

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checked whenever a charge is given back (the caller
        bounds the wait)."""
        while not predicate():
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1

    def snapshot(self) -> dict[str, int | bool]:
        return {
            "charged_bytes": self.charged_bytes,
            "light_bytes": self.light_bytes,
            "limit_bytes": self.limit_bytes,
            "reserve_bytes": self.reserve_bytes,
            "peak_bytes": self.peak_bytes,
            "full": self.full,
        }


#: a session holding less than this (requests and unread answers) is *light*: it may use the
#: reserve of the daemon's budget
LIGHT_SESSION_BYTES = 1024 * 1024


@attrs.define
class Ledger:
    """One session's pending requests: how many and how many bytes, charged to the daemon too.

    Args:
        max_count: requests admitted and not yet answered (``EXAI_SESSION_MAX_PENDING``).
        max_bytes: bytes they may hold (``EXAI_SESSION_MAX_PENDING_BYTES``).
        budget: the daemon's budget, charged and refunded with this ledger.
    """

    max_count: int
    max_bytes: int
    budget: MemoryBudget
    count: int = 0
    nbytes: int = 0

    def refusal(self, cost: int) -> str | None:
        """Why a request costing ``cost`` bytes cannot be admitted, or ``None`` if it can."""
        if self.count >= self.max_count:
            return (
                f"this connection has {self.count} requests admitted and not yet answered "
                f"(EXAI_SESSION_MAX_PENDING={self.max_count}); read your answers or wait "
                "for some to finish"
            )
        if self.nbytes and self.nbytes + cost > self.max_bytes:
            return (
                f"this connection's requests and unread answers hold {self.nbytes} bytes "
                f"(EXAI_SESSION_MAX_PENDING_BYTES={self.max_bytes}); read your answers or "
                "wait for some to finish"
            )
        if not self.budget.fits(cost, light=self.nbytes + cost < LIGHT_SESSION_BYTES):
            return (
                "the daemon holds as many pending requests and answers as its memory budget "
                "allows (EXAI_MAX_PENDING_BYTES); retry shortly"
            )
        return None

    @property
    def light(self) -> bool:
        """Whether this session holds little: its charges then go to the daemon's reserve."""
        return self.nbytes < LIGHT_SESSION_BYTES

    def admit(self, cost: int) -> None:
        """Count one request of ``cost`` bytes (after :meth:`refusal` said it fits)."""
        self.count += 1
        self.add(cost)

    def add(self, nbytes: int) -> None:
        """Charge ``nbytes`` more (negative to refund part) to this session and the daemon."""
        was_light = self.light
        if nbytes >= 0:
            self.budget.charge(nbytes, light=was_light)
        else:
            self.budget.refund(-nbytes, light=was_light)
        self.nbytes += nbytes
        if self.light != was_light:
            self.budget.move(self.nbytes, to_light=self.light)

    def done(self, nbytes: int) -> None:
        """One request answered: forget it and refund the ``nbytes`` still charged for it."""
        self.count -= 1
        self.add(-nbytes)

    def release_all(self) -> None:
        """The session is gone: refund whatever is still charged (idempotent)."""
        if self.nbytes:
            self.budget.refund(self.nbytes, light=self.light)
        self.nbytes = 0
        self.count = 0


class InboundMeter:
    """One connection's frames being received, charged to the daemon's budget as they arrive.

    A frame arrives in parts; each part is taken from the budget before it is kept
    (:meth:`take`), and the whole frame is given back once the session has handled it
    (:meth:`release`). A part that does not fit means the daemon holds as many client bytes
    as it may: the connection is closed with 1013 (try again later) rather than let frames
    of 1,024 connections pile up unaccounted. The first :data:`SMALL_FRAME_BYTES` a
    connection holds always fit (charged all the same), so small messages — a cancellation,
    ``initialize``, a ping — still get through to be answered, or refused, one by one.
    """

    #: what a connection may hold in frames being received even when the budget is full
    SMALL_FRAME_BYTES = 64 * 1024

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, nbytes: int) -> bool:
        small = self.held + nbytes <= self.SMALL_FRAME_BYTES
        if not small and not self.budget.fits(nbytes):
            return False
        self.budget.charge(nbytes)
        self.held += nbytes
        return True

    def release(self, nbytes: int) -> None:
        nbytes = min(nbytes, self.held)
        self.held -= nbytes
        self.budget.refund(nbytes)

    def release_all(self) -> None:
        self.release(self.held)


#: resident size of one idle session, as measured (benchmarks/README.md, *connections*: 29.2 KB
#: per session at 10,000), rounded up
SESSION_FIXED_BYTES = 32 * 1024
#: an upper bound of one log record waiting for the writer thread (fields are clipped)
LOG_RECORD_MAX_BYTES = 8 * 1024
#: an upper bound of one audit record waiting for its writer (ids are at most 256 bytes)
AUDIT_RECORD_MAX_BYTES = 1024
#: copies of one answer a running call may hold at once before it is charged (the provider's
#: text, the tool's text with its footer, the stored result being compacted)
ANSWER_COPIES = 3


def memory_ceiling(
    settings: Settings,
    *,
    baseline_bytes: int,
    answer_bytes: int | None = None,
    caches: dict[str, int] | None = None,
) -> dict[str, int]:
    """The most memory the daemon can hold with ``settings``, whatever clients send, by term.

    Args:
        baseline_bytes: the resident size of the idle daemon (measured; ~60 MB here).
        answer_bytes: the largest answer a call can build; default ``EXAI_MAX_ANSWER_BYTES``
            (the provider layer stops reading there).
        caches: byte budgets of other caches (the conversation thread cache, …), by name.

    Returns:
        ``{term: bytes}`` with a ``"total"``. See ``docs/security.md`` for each term.
    """
    from exai.logs import QUEUE_MAX
    from exai.server.audit import DEFAULT_CAPACITY
    from exai.server.protocol import ELEMENT_COST_BYTES
    from exai.storage.redis_cache import MAX_PENDING_INVALIDATION_BYTES

    s = settings
    answer = s.max_answer_bytes if answer_bytes is None else answer_bytes
    provider_calls = sum(p.max_concurrency for p in s.providers)
    terms = {
        "baseline (idle daemon)": baseline_bytes,
        "connections (fixed state + small frames always let in)": s.max_connections
        * (SESSION_FIXED_BYTES + InboundMeter.SMALL_FRAME_BYTES),
        "pending budget (frames received, requests, unwritten answers; with the reserve of "
        "light sessions)": int(s.max_pending_bytes * (1 + MemoryBudget.RESERVE_FRACTION)),
        "wire copies of the messages being written (each also in the budget)": (
            s.max_pending_bytes
        ),
        "provider answers being read (body up to 6 bytes per answer byte)": provider_calls
        * (6 * answer + 64 * 1024),
        "answers being built by running calls (text, result, payload)": s.max_inflight
        * ANSWER_COPIES
        * answer,
        "one frame being decoded": s.max_frame_bytes + ELEMENT_COST_BYTES * s.max_json_elements,
        "result store": s.result_cache_max_bytes,
        "thread cache and Redis invalidations waiting": s.thread_cache_max_bytes
        + MAX_PENDING_INVALIDATION_BYTES,
        "log queue": QUEUE_MAX * LOG_RECORD_MAX_BYTES,
        "audit queue": DEFAULT_CAPACITY * AUDIT_RECORD_MAX_BYTES,
    }
    terms.update(caches or {})
    terms["total"] = sum(terms.values())
    return terms
