"""Whether the daemon admits new work, and whether a balancer should send it connections.

One :class:`Readiness` per daemon. Its writers: the daemon's run (``ready`` once listening,
``draining`` on shutdown) and an operator or test (:attr:`Readiness.overloaded_reason` set by
hand). What it reads: the memory backstop's reason (a callable), the pending-bytes budget, the
connection count, and each shared service's ``not_ready_reason()``. Its readers: the listener
(503 before the upgrade), sessions (refusing new calls), ``/readyz``, ``/metrics`` and
``status``. Nothing here waits or starts work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from exai.server.admission import Admission
from exai.server.budget import MemoryBudget

__all__ = ["Readiness"]


class Readiness:
    """The daemon's admission state (see the module docstring).

    Args:
        admission: the connection counts (``/readyz`` is not ready while every slot is taken).
        budget: the pending-bytes budget (admission stops while it is full).
        memory_reason: why the memory backstop refuses new work now, or ``None``.
        checks: more reasons not to be ready (a shared service that cannot serve), each
            ``() -> str | None``.
    """

    def __init__(
        self,
        admission: Admission,
        budget: MemoryBudget,
        *,
        memory_reason: Callable[[], str | None] = lambda: None,
        checks: Iterable[Callable[[], str | None]] = (),
    ) -> None:
        self._admission = admission
        self._budget = budget
        self._memory_reason = memory_reason
        self._checks = list(checks)
        #: listening (set once the listeners accept connections)
        self.ready = False
        #: shutting down: no new connection, no new call
        self.draining = False
        self._overloaded_reason: str | None = None

    @property
    def overloaded_reason(self) -> str | None:
        """Why new calls and connections are refused now (``None`` = admitting): set by hand,
        the memory backstop, or the pending-bytes budget being full (until it drains to 80 %)."""
        if self._overloaded_reason is not None:
            return self._overloaded_reason
        memory = self._memory_reason()
        if memory is not None:
            return memory
        if self._budget.full:
            return (
                f"pending requests and unwritten answers fill the memory budget "
                f"({self._budget.charged_bytes} bytes; EXAI_MAX_PENDING_BYTES and its reserve)"
            )
        return None

    @overloaded_reason.setter
    def overloaded_reason(self, reason: str | None) -> None:
        self._overloaded_reason = reason

    def readiness(self) -> tuple[bool, str | None]:
        """Whether a balancer should send new connections here, and if not why: starting,
        draining, overloaded, every connection slot taken (``max_connections``), or a shared
        service (the conversation store) that says it cannot serve."""
        if not self.ready:
            return False, "starting"
        if self.draining:
            return False, "draining"
        overloaded = self.overloaded_reason
        if overloaded is not None:
            return False, overloaded
        if self._admission.open >= self._admission.max_connections:
            return False, "max_connections"
        for check in self._checks:
            reason = check()
            if reason:
                return False, str(reason)
        return True, None
