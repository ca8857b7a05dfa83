"""The daemon's garbage-collector policy: no full collection in the middle of a storm.

CPython's cycle collector runs on whichever thread allocates — here the event loop's — and a
*full* (generation 2) collection walks every tracked object the process holds. With thousands
of calls or sessions alive that is hundreds of thousands of objects and 100–1,000 ms during
which nothing else runs (issue 8's connection storm: 983 ms). The default policy starts one
whenever enough objects have survived two younger collections, which is exactly what a storm
does. So the daemon (``exai serve``, :func:`apply`; an embedding process keeps its own
policy):

* freezes what start-up loaded (``gc.freeze()``): the modules, settings and tools live as
  long as the process and are never walked again;
* raises the youngest generation's threshold from 700 to :data:`YOUNG_THRESHOLD`
  allocations: fewer, still short young collections (each walks at most that many objects,
  about a millisecond), and most short-lived objects are freed by reference counting before
  any collection sees them;
* collects the middle generation after every other young collection
  (:data:`MIDDLE_THRESHOLD` 1, CPython's default 10): in a storm nearly everything young
  survives (2,000 calls alive for 2 s), and with the default the middle generation gathered ten
  young collections' survivors and walked them all at once — collections of 80–420 ms in
  *slow_upstream* on the loaded VM (``gc.slow_collection`` lines). Collected every other time
  it holds at most two young generations' worth, and the survivors move on to the oldest
  generation, which only the idle collector walks;
* never starts a full collection on its own (the oldest threshold is set out of reach), and
  runs one from :func:`collect_when_idle` instead: when no call ran, started or ended for a
  whole check interval — the walk then delays no one's answer — or, so that garbage cycles
  cannot pile up under a load that never pauses, after :data:`FORCE_AFTER_S` with older
  generations having been collected at least :data:`FORCE_MIN_OLD_COLLECTIONS` times since.

Every collection is timed (:class:`GcTimes`, a ``gc.callbacks`` hook): one over
:data:`SLOW_COLLECTION_S` is logged as ``gc.slow_collection`` (generation; duration, wall time,
so a descheduled collection counts; ``cpu_s``, the collecting thread's CPU time, what the
collection itself cost; objects collected) next to the stall probe's
``loop.stall``, which cannot name a collection (the watchdog cannot sample the loop thread
while the collector holds the GIL; it then names the code that ran next, often this hook).

What it does not fix: a full collection costs what the live objects cost to walk — with
10,000 sessions held, about a second on the benchmark VM — so the idle one (and the forced
one, at most every :data:`FORCE_AFTER_S`) is still that long; it only no longer falls in
the middle of a burst of calls (``benchmarks/README.md``, *connections*).

The figures before and after are in ``benchmarks/README.md`` (*slow_upstream*, *peer*).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import trio

from exai.logs import log_event

__all__ = ["FORCE_AFTER_S", "YOUNG_THRESHOLD", "GcTimes", "apply", "collect_when_idle", "times"]

#: allocations (minus deallocations) of container objects between two young collections
YOUNG_THRESHOLD = 10_000
#: young collections between two collections of the middle generation (CPython's default)
MIDDLE_THRESHOLD = 1
#: a collection longer than this is logged (``gc.slow_collection``, beside ``loop.stall``)
SLOW_COLLECTION_S = 0.05
#: a full collection never starts by itself
_NEVER = 1 << 30
#: how often the idle collector looks
CHECK_INTERVAL_S = 1.0
#: under a load that never pauses, a full collection is forced this long after the last one
FORCE_AFTER_S = 300.0
#: ... if the middle generation was collected at least this many times since
FORCE_MIN_OLD_COLLECTIONS = 10


class GcTimes:
    """How long the collector's collections take, per generation (a ``gc.callbacks`` hook).

    ``slow`` keeps (at most 100 of) the collections over ``slow_s`` of wall time as
    ``(generation, duration_s, cpu_s, objects collected)`` for :func:`collect_when_idle` to log
    (logging inside the collector's callback could start another collection). ``cpu_s`` is the
    CPU time of the thread that collected (a collection runs on one thread, holding the GIL).
    """

    def __init__(
        self,
        slow_s: float = SLOW_COLLECTION_S,
        *,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.slow_s = slow_s
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self.slow: list[tuple[int, float, float, int]] = []
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._started = 0.0
        self._cpu_started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._clock()
            self._cpu_started = self._cpu_clock()
            return
        took = self._clock() - self._started
        gen = info.get("generation", 0)
        self.count[gen] += 1
        self.total_s[gen] += took
        if took > self.max_s[gen]:
            self.max_s[gen] = took
        if took > self.slow_s and len(self.slow) < 100:
            cpu = self._cpu_clock() - self._cpu_started
            self.slow.append((gen, took, cpu, info.get("collected", 0)))


#: the daemon's collection timer (installed by :func:`apply`)
times = GcTimes()


def apply() -> None:
    """Freeze what is loaded now and set the thresholds (call once, after start-up)."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, _NEVER)
    if times not in gc.callbacks:
        gc.callbacks.append(times)


async def collect_when_idle(
    activity: Callable[[], tuple[int, int]],
    *,
    check_interval_s: float = CHECK_INTERVAL_S,
    force_after_s: float = FORCE_AFTER_S,
    collect: Callable[[int], int] = gc.collect,
    pending: Callable[[], int] = lambda: gc.get_count()[2],
) -> None:
    """Run full collections when the daemon is idle (see the module docstring); forever.

    Args:
        activity: ``(calls running now, calls ended so far)``; idle means none running and
            none ended since the last check (so a stream of short calls is not idle).
        collect: ``gc.collect`` (injected by tests).
        pending: middle-generation collections since the last full one (``gc.get_count()[2]``).
    """
    last_full = trio.current_time()
    seen = activity()
    while True:
        await trio.sleep(check_interval_s)
        slow, times.slow = times.slow, []
        for gen, took, cpu, found in slow:
            log_event(
                "gc.slow_collection",
                logging.WARNING,
                generation=gen,
                duration_s=round(took, 4),
                cpu_s=round(cpu, 4),
                collected=found,
            )
        before, seen = seen, activity()
        idle = seen[0] == 0 and seen == before
        waiting = pending()
        if waiting <= 0:
            continue
        overdue = trio.current_time() - last_full >= force_after_s
        if idle or (overdue and waiting >= FORCE_MIN_OLD_COLLECTIONS):
            started = time.perf_counter()  # (the collection's own cost, for the log)
            found = collect(2)
            last_full = trio.current_time()
            if not idle:
                log_event(
                    "gc.forced_full_collection",
                    logging.INFO,
                    duration_s=round(time.perf_counter() - started, 4),
                    unreachable=found,
                )
