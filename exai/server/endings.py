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


class Endings:
    """The turns of one daemon's ending connections.

    Args:
        at_once: how many connections may be torn down at once.
    """

    def __init__(self, at_once: int = AT_ONCE) -> None:
        self._turns = trio.Semaphore(at_once)
        #: connections that had to wait for a turn (since start)
        self.waited = 0

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
        same task step, as it would without turns), else wait in line. Once only: a turn
        already taken or given back is not taken again.

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
                await turns.acquire()
            except BaseException:
                self._state = 0
                raise
        self._state = 2

    def give_back(self) -> None:
        """The connection is torn down: let the next one in line have the turn."""
        if self._state == 2:
            self._endings._turns.release()
        self._state = 3
