"""anyio's clock, cancel scopes and socket waits, without its backend lookup per call under trio.

``exai.providers`` and ``exai.resilience`` are written against anyio (usable under asyncio as
well as trio). Every anyio call first looks its backend up (sniffio, then a dict of backends):
on the benchmark VM ``anyio.current_time()`` took 1.2 µs against trio's 0.4, an
``anyio.CancelScope()`` 6.4 µs against trio's 1.0 — and a ``chat`` call made ≈ 15 such clock
reads and 3 scopes in these layers (issue 18, part 9).

Here the running library is read from sniffio's thread-local, which trio sets for as long as
it runs a task and which sniffio (so anyio) reads first; under trio, trio's own primitives are
used — what anyio's trio backend delegates to, with the same errors — and under anything else
the call goes to anyio as before. So behaviour is anyio's under every backend. Imports
neither trio (until a call made under trio) nor anything else of the daemon: without trio and
sniffio (``exai.resilience`` needs only anyio) every call is anyio's.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import anyio.lowlevel

try:
    from sniffio import thread_local as _library
except ImportError:  # ``pip install exai`` without the daemon extras: no trio, so never trio

    class _NoLibrary:
        name = None

    _library = _NoLibrary()  # type: ignore[assignment]

#: the ``trio`` module, imported at the first call made under trio (``exai.resilience``
#: imports nothing of the daemon: trio is imported here only once it runs)
_trio: Any = None


def _trio_module() -> Any:
    global _trio
    import trio

    _trio = trio
    return trio


__all__ = [
    "cancel_scope",
    "checkpoint_if_cancelled",
    "current_effective_deadline",
    "current_time",
    "move_on_after",
    "wait_readable",
]


def current_time() -> float:
    """:func:`anyio.current_time`: the event loop's clock, in seconds.

    Raises:
        anyio.NoEventLoopError: no event loop runs in this thread (as anyio).
    """
    if _library.name == "trio":
        return (_trio or _trio_module()).current_time()
    return anyio.current_time()


def current_effective_deadline() -> float:
    """:func:`anyio.current_effective_deadline`: the nearest deadline of the enclosing cancel
    scopes, on the loop's clock (``math.inf`` when none; ``-math.inf`` once cancelled)."""
    if _library.name == "trio":
        return (_trio or _trio_module()).current_effective_deadline()
    return anyio.current_effective_deadline()


def cancel_scope(*, deadline: float = math.inf, shield: bool = False) -> Any:
    """A new cancel scope, as :class:`anyio.CancelScope` (``deadline`` on the loop's clock).

    Under trio it is a :class:`trio.CancelScope` (anyio's wraps one and only delegates to it):
    use it as a context manager and through ``deadline``, ``shield``, ``cancel()``,
    ``cancel_called`` and ``cancelled_caught``, which both have.
    """
    if _library.name == "trio":
        return (_trio or _trio_module()).CancelScope(deadline=deadline, shield=shield)
    return anyio.CancelScope(deadline=deadline, shield=shield)


def move_on_after(delay: float | None, shield: bool = False) -> Any:
    """:func:`anyio.move_on_after`: a cancel scope whose deadline is ``delay`` seconds from
    now (none for ``None``)."""
    deadline = current_time() + delay if delay is not None else math.inf
    return cancel_scope(deadline=deadline, shield=shield)


async def checkpoint_if_cancelled() -> None:
    """:func:`anyio.lowlevel.checkpoint_if_cancelled`: raise the cancellation if the enclosing
    scope is cancelled; no scheduling point otherwise."""
    if _library.name == "trio":
        await (_trio or _trio_module()).lowlevel.checkpoint_if_cancelled()
    else:
        await anyio.lowlevel.checkpoint_if_cancelled()


async def wait_readable(obj: Any) -> None:
    """:func:`anyio.wait_readable`: wait until ``obj`` (a socket or a file descriptor) can be
    read. A checkpoint, also when it raises ``ClosedResourceError`` at once.

    Raises:
        anyio.ClosedResourceError: ``obj`` was closed while waited on, or before (a closed
            socket's descriptor is -1: trio registered a wait for it, failed with a
            ``ValueError`` and left that wait behind, so every later wait on a closed socket in
            the run got ``BusyResourceError``; asyncio raised ``ValueError``).
        anyio.BusyResourceError: another task waits to read it.
    """
    if (obj if type(obj) is int else obj.fileno()) < 0:
        # (failing at once, it is still the checkpoint the wait would have been: a loop of such
        # waits can be cancelled and lets the other tasks run)
        if _library.name == "trio":
            await (_trio or _trio_module()).lowlevel.checkpoint()
        else:
            await anyio.lowlevel.checkpoint()
        raise anyio.ClosedResourceError("the socket was closed")
    if _library.name != "trio":
        await anyio.wait_readable(obj)
        return
    trio = _trio or _trio_module()
    try:
        await trio.lowlevel.wait_readable(obj)
    except trio.ClosedResourceError as exc:
        raise anyio.ClosedResourceError().with_traceback(exc.__traceback__) from None
    except trio.BusyResourceError:
        raise anyio.BusyResourceError("reading from") from None
