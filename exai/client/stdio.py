"""The bridge as a process: stdio that carries nothing but JSON-RPC, and no orphans.

:func:`run` is ``exai bridge``. It keeps a private handle on the client's stdout and points
fd 1 (and ``sys.stdout``) at stderr, so a stray ``print`` can never corrupt the protocol stream;
reads and writes stdin/stdout as trio streams when they are pipes or sockets, and through a
worker thread when they are a terminal or a file (where non-blocking mode would leak into other
processes); and ends when stdin closes (once the requests read are answered), on
SIGTERM/SIGINT/SIGHUP, or when its parent dies (a :data:`PARENT_POLL_S` ``getppid()`` poll).
``PR_SET_PDEATHSIG`` is not used: Linux sends it when the parent *thread* ends, and a client
that starts the bridge from a worker thread (trio's ``open_process`` does, and its threads end
after 10 s idle) would have killed its bridge 10 s later. The relay itself is
:class:`exai.client.bridge.Bridge`. It is quiet on stderr when
all goes well: routine events log at debug level; warnings and errors (the daemon unreachable,
a refused token) are written there.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import trio

from exai.client.bridge import FLUSH_S, GOODBYE_S, Bridge
from exai.client.ws import WebSocketError, check_url
from exai.config import Settings, redact_url
from exai.errors import ConfigError
from exai.logs import configure_logging, log_event

__all__ = ["PARENT_POLL_S", "run"]


#: How often the parent process is checked.
PARENT_POLL_S = 0.5
#: Bytes read from a terminal or file at a time.
READ_CHUNK = 65536
#: Once stopped (signal, parent gone), the bridge ends within this, goodbye or not.
STOP_S = GOODBYE_S + FLUSH_S + 1.0


class _ThreadFd:
    """Blocking fd I/O in a worker thread, for a stdin/stdout that is not a pipe or socket
    (a terminal or a file), where non-blocking mode would leak into other processes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._limiter = anyio.CapacityLimiter(1)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await anyio.to_thread.run_sync(
            os.read,
            self._fd,
            max_bytes or READ_CHUNK,
            limiter=self._limiter,
            abandon_on_cancel=True,
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(bytes(data))
        while view:
            n = await anyio.to_thread.run_sync(os.write, self._fd, view, limiter=self._limiter)
            view = view[n:]


def _open_fd(fd: int) -> Any:
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return trio.lowlevel.FdStream(fd)
    return _ThreadFd(fd)


async def _watch_parent(original_ppid: int, stop: Callable[[], None]) -> None:
    while True:
        if os.getppid() != original_ppid:
            log_event(
                "bridge.parent_gone", logging.DEBUG, message="the parent process is gone; exiting"
            )
            stop()
            return
        await anyio.sleep(PARENT_POLL_S)


async def _watch_signals(stop: _Stop, scope: anyio.CancelScope) -> None:
    """The first signal stops the bridge (it still cancels the daemon's waiting calls); a
    second one ends it at once."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            log_event("bridge.signal", logging.DEBUG, message=f"received {name}; exiting")
            if stop.called:
                scope.cancel()
                return
            stop()


class _Stop:
    """Stop the bridge once (:meth:`Bridge.stop`), and end it within :data:`STOP_S`."""

    def __init__(self, bridge: Bridge, tg: anyio.abc.TaskGroup) -> None:
        self.bridge = bridge
        self.tg = tg
        self.called = False

    def __call__(self) -> None:
        if not self.called:
            self.called = True
            self.bridge.stop()
            self.tg.start_soon(_hard_stop, self.tg.cancel_scope)


async def _hard_stop(scope: anyio.CancelScope) -> None:
    """Bound on a stopping bridge: whatever it still waits for, it ends after this."""
    await anyio.sleep(STOP_S)
    scope.cancel()


def run(url: str | None = None) -> int:
    """``exai bridge``: run the stdio bridge until stdin closes or the parent dies.

    Args:
        url: the daemon's URL (default ``EXAI_URL``, else derived from ``EXAI_HOST`` and
            ``EXAI_PORT``: :attr:`~exai.config.Settings.effective_url`).

    Exit status: 0 on a normal end (EOF, parent gone, SIGTERM), 2 on a configuration error.
    """
    # Only JSON-RPC may reach the client's stdout: keep a private handle on it, and point
    # fd 1 (and sys.stdout) at stderr so that any stray print goes there instead.
    out_fd = os.dup(1)
    in_fd = os.dup(0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        settings = Settings.from_env(client=True)
    except ConfigError as exc:
        print(f"exai bridge: {exc}", file=sys.stderr)
        return 2
    try:
        # a malformed URL (http://…, no host, a bad port) can never work: the bridge retried it
        # for ever (or crashed with a traceback on a bad port); it is a configuration error
        check_url(url or settings.effective_url)
    except WebSocketError as exc:
        print(f"exai bridge: {exc}", file=sys.stderr)
        return 2
    try:
        configure_logging(settings.log_level, settings.log_format)
    except ValueError:
        configure_logging("info", settings.log_format)

    original_ppid = os.getppid()

    async def bridge_stdio() -> None:
        stdin, stdout = _open_fd(in_fd), _open_fd(out_fd)
        bridge = Bridge(settings, url=url)
        # debug: an MCP client shows the bridge's stderr to its user, and a start that works
        # has nothing to tell (warnings and errors still go there)
        log_event(
            "bridge.started",
            logging.DEBUG,
            message=f"bridging stdio to {redact_url(bridge.url)}",
        )
        async with anyio.create_task_group() as tg:
            stop = _Stop(bridge, tg)
            tg.start_soon(_watch_parent, original_ppid, stop)
            tg.start_soon(_watch_signals, stop, tg.cancel_scope)
            await bridge.run(stdin, stdout)
            tg.cancel_scope.cancel()

    try:
        anyio.run(bridge_stdio, backend="trio")
    except KeyboardInterrupt:
        pass
    return 0
