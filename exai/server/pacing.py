"""A time budget per trio scheduler round for calls' heavy steps: a storm taken in bites.

Trio runs every task that is runnable when a scheduler round begins, one step each, before it
looks at the clock or the sockets again (``trio._core._run``: the batch of ``runq``). A task
whose step is long delays every other one by that much — which is what a loop stall is — and
so does a round of many short steps. When a thousand calls arrive at once, their responders
each run their first step in the same round: the call's checks, its execution, its provider
request and the upstream connection, ≈ 0.4–1.3 ms each on this project's 2-core machines; and
when their answers come back together, each call takes its answer in, in one round again
(issue 18: rounds of 30–75 ms in ``benchmarks run slow_upstream --full``, while every other
task — a ping, a handshake, a heartbeat, a timeout — waited for the round to end).

:class:`RoundPacer` gives those steps a budget: once a round has run for ``budget_s``, no more
calls begin in it and no more answers are taken in (:meth:`RoundPacer.turn`, awaited by
:class:`~exai.server.core.SessionCore` once a call holds its session slot, and again once it
holds the others if it had to wait for them, and by the provider's pool before each read of
an answer); they wait, first come first served, and ``per_round`` of them go on in each round
after. The total work is the same and
nothing caps the calls per second: a round only ends sooner, and the loop comes back to its
clock, its sockets and its other tasks between rounds. Steady load whose rounds stay short (64
concurrent calls make rounds of a few milliseconds) is never paced, so it pays nothing but the
clock read of each turn.

How: a trio instrument with one hook, ``after_io_wait`` — called once per round, as it
begins — notes the time (installed at the first turn). A turn in a round younger than the
budget, with nobody of its lane waiting, goes on at once (no yield); the others wait in their
lane's FIFO. A system task of the pacer's own (the *pump*), there only while turns wait, lets
``per_round`` of them go per round (they run in the round after).

Two lanes: calls' starts (:meth:`RoundPacer.turn`) and reads of answers
(:attr:`RoundPacer.reads`). While both have turns waiting, each gets half of a round's
``per_round`` (the odd one alternates): an answer read — one per running call at most, so a
few — never waits behind a storm of new calls' starts (thousands from many connections: in one
FIFO each read of every running call waited for all of them, and a streamed answer of many
reads for them as many times), and a stream of reads never keeps the starts waiting either.

Idea: a budget of work per scheduler tick, as Tokio's cooperative scheduling gives each task a
budget of operations per poll (``tokio::task::coop``); here the unit is the trio round, which
trio itself cannot cut, and the work budgeted is a call's start or the reading of its answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

__all__ = ["ROUND_BUDGET_S", "STEPS_PER_PACED_ROUND", "RoundPacer"]

#: seconds of a scheduler round after which its calls' heavy steps wait for later rounds
ROUND_BUDGET_S = 0.010
#: waiting steps let go per round (≈ 0.4–1.3 ms each: rounds of ≈ 6–20 ms while paced)
STEPS_PER_PACED_ROUND = 16

_INF = float("inf")


class RoundPacer:
    """Turns pass at once until the scheduler round they are taken in has run for
    ``budget_s``; after that they wait, first come first served in their lane, and
    ``per_round`` of them pass in each later round — half from each lane while both wait.

    Calls' starts take :meth:`try_turn` / :meth:`turn`; reads of answers take
    :attr:`reads`' (its own FIFO: a read never waits behind the starts waiting, beyond its
    lane's share of a round).

    Args:
        budget_s: seconds of a round during which turns pass at once (``0``: every turn
            waits a round; ``inf``: none ever waits).
        per_round: waiting turns let go per round, ≥ 1.
        clock: seconds, monotonic (``time.perf_counter``; a test's own). Real time, not the
            run's clock: a round's length is what the loop's other tasks wait, whatever clock
            the run keeps (a ``MockClock`` stands still within a round).

    Raises:
        ValueError: ``budget_s`` < 0 or ``per_round`` < 1.
    """

    __slots__ = (
        "_began",
        "_budget_s",
        "_clock",
        "_flip",
        "_per_round",
        "_pumping",
        "_run",
        "_starts",
        "_timing",
        "reads",
        "waited",
    )

    def __init__(
        self,
        budget_s: float = ROUND_BUDGET_S,
        per_round: int = STEPS_PER_PACED_ROUND,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not budget_s >= 0:
            raise ValueError(f"budget_s must be 0 or more, not {budget_s}")
        if per_round < 1:
            raise ValueError(f"per_round must be at least 1, not {per_round}")
        self._budget_s = budget_s
        self._per_round = per_round
        self._clock = clock
        #: when this round began (``clock``); ``-inf`` until the rounds are timed, so the
        #: first turn finds the budget spent and installs the timing
        self._began = float("-inf")
        self._starts = _Lane(self)
        #: the lane of reads of answers (a :class:`~exai.providers.transport.Pacer`)
        self.reads = _Lane(self)
        #: which lane has the odd turn of a round both wait in (alternates)
        self._flip = 0
        self._pumping = False
        #: the trio run whose rounds are timed (``None`` until the first turn) and the
        #: instrument timing them
        self._run: trio.lowlevel.TrioToken | None = None
        self._timing: _RoundStart | None = None
        #: turns that had to wait for a later round (a counter, both lanes)
        self.waited = 0

    @property
    def waiting(self) -> int:
        """Turns waiting for a later round now (both lanes)."""
        return len(self._starts) + len(self.reads)

    def try_turn(self) -> bool:
        """Whether a call's start passes now — this round is younger than the budget and no
        start waits — without yielding; ``False``: :meth:`turn` waits for one."""
        return self._starts.try_turn()

    async def turn(self) -> None:
        """Take a call's start's turn: at once as :meth:`try_turn` says (without yielding), or
        wait, first come first served, for a later round that lets this caller go.

        Raises:
            trio.Cancelled: cancelled while waiting (no turn taken).
        """
        await self._starts.turn()

    def close(self) -> None:
        """Stop timing the rounds of the trio run this is called in: its instrument leaves the
        run (called for every round, it kept the pacer alive as long as the run). Turns still
        waiting are let go as before; a later turn times the rounds again. For an owner whose
        run goes on after it (a daemon stopped inside a longer trio run). Idempotent."""
        try:
            run: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:  # (outside a run: a run that ended took its instruments along)
            run = None
        if self._timing is not None and run is self._run:
            trio.lowlevel.remove_instrument(self._timing)
        self._timing = None
        self._run = None
        self._began = float("-inf")

    def _young(self) -> bool:
        # (an infinite budget: the rounds are never timed, not even by the first turn)
        return self._budget_s == _INF or self._clock() - self._began < self._budget_s

    async def _wait(self, lot: trio.lowlevel.ParkingLot) -> None:
        """Wait in ``lot`` (a lane's) for the pump to let this caller go."""
        if self._run is not trio.lowlevel.current_trio_token():
            # the first turn in this trio run: from now on each round is timed (this turn
            # waits one round; a pacer carried over from another run finds its timing stale)
            self._timing = _RoundStart(self)
            trio.lowlevel.add_instrument(self._timing)
            self._run = trio.lowlevel.current_trio_token()
        self.waited += 1
        if not self._pumping:
            self._pumping = True
            try:
                trio.lowlevel.spawn_system_task(self._pump, name="exai.round_pacer")
            except BaseException:
                self._pumping = False
                raise
        await lot.park()

    def _round_began(self) -> None:
        self._began = self._clock()

    async def _pump(self) -> None:
        """One step per scheduler round while turns wait: let the next ``per_round`` go (they
        run in the next round), half from each lane while both wait; gone once nobody waits
        (a waiter cancelled meanwhile has left its lane)."""
        reads, starts = self.reads._lot, self._starts._lot
        try:
            while reads or starts:
                await trio.lowlevel.cancel_shielded_checkpoint()
                n = self._per_round
                share = (n + self._flip) // 2  # the reads' share while both lanes wait
                self._flip ^= 1
                let = min(len(reads), max(share, n - len(starts)))
                reads.unpark(count=let)
                starts.unpark(count=n - let)
        finally:
            self._pumping = False


class _Lane:
    """One FIFO of a :class:`RoundPacer`'s turns (a :class:`~exai.providers.transport.Pacer`):
    ``try_turn()`` passes while the round is within its budget and nobody of this lane waits;
    ``await turn()`` waits, first come first served, otherwise.

    Raises (``turn``):
        trio.Cancelled: cancelled while waiting (no turn taken).
    """

    __slots__ = ("_lot", "_pacer")

    def __init__(self, pacer: RoundPacer) -> None:
        self._pacer = pacer
        self._lot = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        return len(self._lot)

    def try_turn(self) -> bool:
        return not self._lot and self._pacer._young()

    async def turn(self) -> None:
        if self.try_turn():
            return
        await self._pacer._wait(self._lot)


class _RoundStart(trio.abc.Instrument):
    """Tells its pacer when each scheduler round begins (trio calls ``after_io_wait`` once per
    round, before the round's tasks run, and only the hooks an instrument defines)."""

    __slots__ = ("_pacer",)

    def __init__(self, pacer: RoundPacer) -> None:
        self._pacer = pacer

    def after_io_wait(self, timeout: float) -> None:
        self._pacer._round_began()
