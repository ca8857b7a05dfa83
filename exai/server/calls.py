"""Executions of ``tools/call`` and the exactly-once registry.

An :class:`Execution` is one run of a tool. It lives in the daemon's calls nursery, not in the
session that started it, so that a bridge which lost its connection can reconnect and *join*
the execution instead of running the tool again. Sessions attach to an execution as watchers
(to receive its progress and its result) and detach when they close.

Resource handling:
    An execution holds one slot of its session's limiter and one of the global limiter from
    before it starts until it ends (released in ``finally``). When its last watcher detaches,
    an execution started without an idempotency key is cancelled at once; one started with a
    key (a bridge that will re-send) is given ``orphan_grace_s`` to be adopted, then cancelled.

The :class:`CallRegistry` maps a key — the client's ``_meta["exai/idempotencyKey"]`` or, when
absent, ``session id + request id`` — to the running execution or to its finished response,
kept for ``ttl_s`` and at most ``max_entries``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
import trio

__all__ = ["CallRegistry", "Execution", "Watcher"]

_ids = itertools.count(1)


@attrs.define(eq=False)
class Watcher:
    """A session waiting for an execution: where to send progress (``None`` = no progress)."""

    send_progress: Callable[[dict[str, Any]], None]
    progress_token: str | int | None


@attrs.define(eq=False)
class Execution:
    key: str
    tool: str
    client_key: bool
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: the wait for a shared result and slots before the run: shielded from the responder
    #: that started it (other requests may have joined), cancelled only by :meth:`cancel`
    wait_scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    done: trio.Event = attrs.field(factory=trio.Event)
    adopted: trio.Event = attrs.field(factory=trio.Event)
    orphaned: trio.Event = attrs.field(factory=trio.Event)
    watchers: list[Watcher] = attrs.field(factory=list)
    payload: dict[str, Any] | None = None  # {"result": …} or {"error": …}
    cancelled: bool = False
    started_at: float = 0.0
    progress_value: float = 0.0
    number: int = attrs.field(factory=lambda: next(_ids))

    def attach(self, watcher: Watcher) -> None:
        self.watchers.append(watcher)
        self.orphaned = trio.Event()
        self.adopted.set()

    def detach(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)
        if not self.watchers and not self.done.is_set():
            if self.client_key:
                # give a reconnecting bridge time to re-send and adopt this execution
                self.adopted = trio.Event()
                self.orphaned.set()
            else:
                self.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        self.wait_scope.cancel()
        self.scope.cancel()

    def progress(
        self,
        message: str | None,
        *,
        make: Callable[..., dict[str, Any]],
        value: float | None = None,
        total: float | None = None,
    ) -> None:
        """Send a progress notification to every watcher that asked for progress.

        The MCP spec wants the value to strictly increase. A tool's own ``value`` (and
        ``total``) is passed on when it is above the last one sent; otherwise — a heartbeat,
        or a tool going backwards — the last value plus a thousandth is sent, without a total.
        """
        if value is not None and value > self.progress_value:
            self.progress_value = float(value)
        else:
            self.progress_value = round(self.progress_value + 0.001, 6)
            total = None
        for w in list(self.watchers):
            if w.progress_token is not None:
                w.send_progress(make(w.progress_token, self.progress_value, total, message))


class CallRegistry:
    """Running executions and finished responses by key (bounded, with a TTL)."""

    def __init__(self, *, ttl_s: float, max_entries: int, orphan_grace_s: float) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.orphan_grace_s = orphan_grace_s
        self.running: dict[str, Execution] = {}
        self._finished: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def finished(self, key: str) -> dict[str, Any] | None:
        item = self._finished.get(key)
        if item is None:
            return None
        expires_at, payload = item
        if expires_at <= trio.current_time():
            del self._finished[key]
            return None
        return payload

    def store(self, key: str, payload: dict[str, Any]) -> None:
        now = trio.current_time()
        self._finished[key] = (now + self.ttl_s, payload)
        self._finished.move_to_end(key)
        while self._finished:
            oldest_key, (exp, _) = next(iter(self._finished.items()))
            if len(self._finished) > self.max_entries or exp <= now:
                del self._finished[oldest_key]
            else:
                break

    def shrink(self) -> int:
        """Drop expired results (memory pressure). Live ones are kept: they are what makes a
        retried call exactly-once, not a cache; ``max_entries`` bounds them."""
        now = trio.current_time()
        expired = [k for k, (exp, _) in self._finished.items() if exp <= now]
        for k in expired:
            del self._finished[k]
        return len(expired)

    def __len__(self) -> int:
        return len(self._finished)

    async def orphan_watch(self, ex: Execution) -> None:
        """Cancel ``ex`` when it has had no watcher for ``orphan_grace_s``."""
        while True:
            await ex.orphaned.wait()
            with trio.move_on_after(self.orphan_grace_s):
                await ex.adopted.wait()
            if not ex.watchers:
                ex.cancel()
                return
