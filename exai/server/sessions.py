"""The open sessions of one daemon: each runs here from its upgrade to its close.

:meth:`SessionTable.serve` is the listener's ``serve_session`` callback: it makes the
:class:`~exai.server.session.Session` (with the settings in force at that moment), keeps it in
the table while it runs, and notifies the daemon's :class:`~exai.server.calls.Changes` when it
ends. The reloader closes the sessions whose token was removed (:meth:`SessionTable.revoke`);
the daemon's drain closes the rest (:meth:`SessionTable.close_all`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio
from trio_websocket import WebSocketConnection

from exai.config import Settings
from exai.server.auth import Identity, TokenTable
from exai.server.calls import Changes
from exai.server.outbox import ProgressStream
from exai.server.session import Session, SessionShared

__all__ = ["SessionTable"]


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
        self.running: set[Session] = set()

    def __len__(self) -> int:
        return len(self.running)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.running))

    def __bool__(self) -> bool:
        return bool(self.running)

    async def serve(
        self, conn: WebSocketConnection, ip: str, identity: Identity, stream: ProgressStream
    ) -> None:
        """Run one admitted connection's session until it ends."""
        session = Session(self.shared, self.settings(), conn, ip, identity, stream)
        self.running.add(session)
        try:
            await session.run()
        finally:
            self.running.discard(session)
            self.changes.notify()

    def revoke(
        self, tokens: TokenTable, nursery: trio.Nursery | None, code: int, reason: str
    ) -> int:
        """Close (in ``nursery``, once the daemon runs) every session whose token is not in
        ``tokens``; returns how many there are."""
        if not tokens.enabled:
            return 0
        valid = {i.digest for i in tokens.identities}
        revoked = 0
        for session in list(self.running):
            if session.identity.digest not in valid:
                revoked += 1
                if nursery is not None:
                    nursery.start_soon(session.close, code, reason)
        return revoked

    def close_all(self, nursery: trio.Nursery, code: int, reason: str) -> None:
        """Close (in ``nursery``) every session not already closing."""
        for session in list(self.running):
            if session.closing_reason is None:
                nursery.start_soon(session.close, code, reason)
