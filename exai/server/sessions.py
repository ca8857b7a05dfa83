"""The open sessions of one daemon, whatever their door: each is kept here while it runs.

:meth:`SessionTable.serve` is the listener's callback for an upgraded WebSocket: it makes the
:class:`~exai.server.session.Session` (with the settings in force at that moment) and runs it.
The other doors (an HTTP connection, an old op-protocol session) put themselves in the table
with :meth:`SessionTable.open` for as long as they run. The reloader closes the sessions whose
token was removed (:meth:`SessionTable.revoke`); the daemon's drain hands each over
(:meth:`Door.hand_over`) and closes the rest (:meth:`SessionTable.close_all`). The daemon's
:class:`~exai.server.calls.Changes` is notified whenever one ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Protocol

import trio
from trio_websocket import WebSocketConnection

from exai.config import Settings
from exai.server.auth import Identity, TokenTable
from exai.server.calls import Changes
from exai.server.core import SessionShared
from exai.server.outbox import ProgressStream
from exai.server.session import Session

__all__ = ["Door", "SessionTable"]


class Door(Protocol):
    """What the table, the reloader and the drain need of a running session."""

    @property
    def identity(self) -> Identity | None:
        """Who it authenticated as (``None``: nobody yet, e.g. an idle HTTP connection)."""
        ...

    @property
    def closing_reason(self) -> tuple[int, str] | None: ...

    async def close(self, code: int, reason: str) -> None:
        """Close now (after flushing what is queued, within a bound)."""
        ...

    async def hand_over(self) -> None:
        """Draining: close once every call admitted on it has been answered."""
        ...


class SessionTable:
    """The set of running sessions.

    Args:
        shared: what every session shares.
        settings: ``() -> Settings``, the settings in force (a reload changes tokens and
            providers; a session keeps the ones it was admitted with).
        changes: notified when a session ends.
    """

    def __init__(
        self, shared: SessionShared, settings: Callable[[], Settings], changes: Changes
    ) -> None:
        self.shared = shared
        self.settings = settings
        self.changes = changes
        self.running: set[Door] = set()

    def __len__(self) -> int:
        return len(self.running)

    def __iter__(self) -> Iterator[Door]:
        return iter(list(self.running))

    def __bool__(self) -> bool:
        return bool(self.running)

    @asynccontextmanager
    async def open(self, door: Door) -> AsyncIterator[None]:
        """Keep ``door`` in the table while the block runs."""
        self.running.add(door)
        try:
            yield
        finally:
            self.running.discard(door)
            self.changes.notify()

    async def serve(
        self, conn: WebSocketConnection, ip: str, identity: Identity, stream: ProgressStream
    ) -> None:
        """Run one admitted WebSocket connection's session until it ends."""
        session = Session(self.shared, self.settings(), conn, ip, identity, stream)
        async with self.open(session):
            await session.run()

    def revoke(
        self, tokens: TokenTable, nursery: trio.Nursery | None, code: int, reason: str
    ) -> int:
        """Close (in ``nursery``, once the daemon runs) every session whose token is not in
        ``tokens``; returns how many there are."""
        if not tokens.enabled:
            return 0
        revoked = 0
        for session in list(self.running):
            identity = session.identity
            if identity is not None and identity.digest not in tokens.digests:
                revoked += 1
                if nursery is not None:
                    nursery.start_soon(session.close, code, reason)
        return revoked

    def close_all(self, nursery: trio.Nursery, code: int, reason: str) -> None:
        """Close (in ``nursery``) every session not already closing."""
        for session in list(self.running):
            if session.closing_reason is None:
                nursery.start_soon(session.close, code, reason)
