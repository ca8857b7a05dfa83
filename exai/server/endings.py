"""Connections that end at once are torn down a few at a time (issue 18).

trio runs every ready task in one scheduler batch before it looks at its timers. When thousands
of peers go at once (a client process exits, a balancer drops its connections), every one of
their readers wakes on end-of-stream in the same batch, and each session's teardown — the
reader's abort, the writer's cancellation, the calls detached, the connection closed, the
session's objects freed — follows in lockstep, batch after batch of thousands of steps: the
loop's timers and the live sessions waited 760–1,400 ms in *connections* (10,000 sessions
closed at once).

So a connection whose peer has gone takes a *turn* (:class:`EndingTurn`) before its teardown
starts, and gives it back once the connection is torn down; at most :data:`AT_ONCE` hold one.
The others wait in line (trio's parking lot, first come first served) and are let in one per
turn given back, so the teardowns spread over many short batches, between which the timers and
the live sessions run. A connection ending alone finds a free turn: it waits for nothing.

Where a turn is taken: by :class:`~exai.server.outbox.ProgressStream` when a read finds the
peer's end of stream or a reset (before the reader hears of it), and by the WebSocket session's
reader when the connection closed without one (a close handshake); once per connection. The
listener gives it back in its ``finally``, after the stream is closed. A turn is only taken
once the connection was admitted to a door, so a handshake's deadline never runs while it waits.

A turn is held until the connection is torn down, and a teardown can wait on its peer (a writer
blocked on a peer that stopped reading waits out ``send_timeout_s``, renewed by every chunk a
trickling peer lets through): 32 hostile connections that half-close and then read a trickle
held every turn for as long as they liked, and every other connection whose peer left — its
session, admission slots and running calls — waited behind them (found by an attack on this
module: departed sessions kept for 90 s and more, new clients refused with 503 once the
connection cap filled, new calls refused as overloaded). So nobody waits in line longer than
:data:`MAX_WAIT_S`: past it a connection is torn down without a turn. Holding turns can delay
other peers' teardowns by that much and no more; a storm of honest closings (10,000 in 2–3 s)
stays inside it.

What it does not bound: the reads that find the end of stream themselves — one short task step
each, all in the batch in which the poller reports them — and teardowns the daemon starts (a
drain, a revoked token), which are not a storm of peers.
"""

from __future__ import annotations

import trio

__all__ = ["AT_ONCE", "EndingTurn", "Endings"]

#: connections torn down at once. A WebSocket session's teardown is about ten task steps (its
#: reader, the connection's, the writer's) spread over about seven batches, so a batch runs a few
#: dozen steps of it (a few milliseconds). In *connections* (one run each, load 3–5), 10,000
#: sessions were torn down in 3.0 s at 32, 4.3 s at 16 and 3.3 s at 64, with no loop stall over
#: 50 ms at any of them and the live sessions' p99 no better at 64.
AT_ONCE = 32

#: the longest a connection waits in line for a turn (seconds); then it is torn down without one
MAX_WAIT_S = 5.0


class Endings:
    """The turns of one daemon's ending connections.

    Args:
        at_once: how many connections may be torn down at once.
        max_wait_s: the longest a connection waits in line before it is torn down without a
            turn (see the module docstring).
    """

    def __init__(self, at_once: int = AT_ONCE, max_wait_s: float = MAX_WAIT_S) -> None:
        self._turns = trio.Semaphore(at_once)
        self.max_wait_s = max_wait_s
        #: connections that had to wait for a turn (since start)
        self.waited = 0
        #: connections torn down without a turn after waiting ``max_wait_s`` (since start)
        self.gave_up = 0

    def __repr__(self) -> str:
        return f"<Endings free={self.free} waited={self.waited}>"

    @property
    def free(self) -> int:
        """Turns nobody holds now."""
        return self._turns.value

    def turn(self) -> EndingTurn:
        """A turn for one connection, not taken yet."""
        return EndingTurn(self)


class EndingTurn:
    """One connection's turn to be torn down: :meth:`take` once its peer has gone (again: no-op),
    :meth:`give_back` once it is torn down (without a turn held: no-op)."""

    __slots__ = ("_endings", "_state")

    def __init__(self, endings: Endings) -> None:
        self._endings = endings
        self._state = 0  # 0 not taken, 1 waiting, 2 held, 3 given back

    @property
    def held(self) -> bool:
        return self._state == 2

    @property
    def taken(self) -> bool:
        """Taken, or being waited for (the session's reader need not take it again)."""
        return self._state in (1, 2)

    async def take(self) -> None:
        """Take a turn: at once when one is free (no checkpoint: the teardown goes on in the
        same task step, as it would without turns), else wait in line — at most the line's
        ``max_wait_s``, after which the connection goes on without a turn (it holds none then).
        Once only: a turn already taken, given back or given up on is not taken again.

        Raises:
            trio.Cancelled: the connection's scope was cancelled while it waited; no turn is
                held then.
        """
        if self._state != 0:
            return
        turns = self._endings._turns
        try:
            turns.acquire_nowait()
        except trio.WouldBlock:
            self._endings.waited += 1
            self._state = 1
            try:
                with trio.move_on_after(self._endings.max_wait_s):
                    await turns.acquire()
                    self._state = 2
                    return
            except BaseException:
                self._state = 0
                raise
            self._endings.gave_up += 1
            self._state = 3  # (torn down without a turn: nothing to give back)
            return
        self._state = 2

    def give_back(self) -> None:
        """The connection is torn down: let the next one in line have the turn."""
        if self._state == 2:
            self._endings._turns.release()
        self._state = 3
