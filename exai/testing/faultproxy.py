"""A TCP proxy that can cut, blackhole and restore the connections it forwards.

Put it between a client and a real server (Redis, Postgres, the daemon's WebSocket) and break
the network on cue::

    async with FaultProxy("127.0.0.1", 6379) as proxy:
        client = connect(proxy.host, proxy.port)   # instead of 127.0.0.1:6379
        proxy.cut()                                # live connections die, new ones are reset
        proxy.cut(mode="blackhole")                # new connections are accepted and then ignored
        proxy.restore()                            # forward again

Modes:

``"pass"``
    Each accepted connection is connected to the target and two pumps copy bytes both ways,
    64 KiB at a time (a pump reads the next chunk only after the previous one was written, so
    nothing buffers without bound). ``latency_s`` delays each forwarded chunk. A half-close
    (EOF) on one side is forwarded as a half-close to the other.
``"refuse"`` (``cut()``)
    Every live connection is aborted: both sockets are closed with ``SO_LINGER 0``, so the peers
    see a reset rather than a clean EOF. New connections are accepted and reset at once.
``"blackhole"`` (``cut(mode="blackhole")``)
    Live connections are aborted as above. New connections are accepted and held: the proxy
    neither reads from them nor connects to the target, so the client hangs as it would behind
    a dropped network path. When :meth:`FaultProxy.restore` is called the held connections are
    connected to the target and forwarded, like packets that get through once a partition heals
    (whatever the client wrote meanwhile waits in the kernel's buffers).

Resource handling:
    The proxy owns a task group for the span of its ``async with``; every connection is one task
    in it, with its own cancel scope that :meth:`FaultProxy.cut` cancels. Leaving the block
    closes the listener and aborts every connection; no task outlives it.

Error handling:
    A connection that fails (the target refuses, a peer resets) is closed on both sides and
    counted in ``upstream_failures`` or simply ends; it never disturbs the other connections or
    the ``async with`` block.

Command line (for benchmarks)::

    python -m exai.testing.faultproxy TARGET_HOST TARGET_PORT [--port N] [--host H]

prints ``faultproxy: listening on HOST:PORT`` on stderr and forwards until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Literal

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["FaultProxy", "Mode", "main"]

Mode = Literal["pass", "refuse", "blackhole"]

CHUNK_BYTES = 64 * 1024
LISTEN_BACKLOG = 4096


def abort_stream(stream: anyio.abc.ByteStream) -> None:
    """Arrange for the next close of ``stream`` to send a TCP reset instead of a FIN."""
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _abort(*streams: anyio.abc.ByteStream | None) -> None:
    # Shielded: a closing connection is usually inside a cancelled scope, and an unshielded
    # await would let that cancellation skip closing the remaining streams.
    with anyio.CancelScope(shield=True):
        for stream in streams:
            if stream is not None:
                abort_stream(stream)
                with contextlib.suppress(OSError, anyio.BrokenResourceError):
                    await stream.aclose()


class FaultProxy:
    """Forward TCP connections to ``target_host:target_port`` and break them on demand.

    Args:
        target_host: Where connections are forwarded to.
        target_port: The target's port.
        listen_host: Address the proxy listens on (loopback by default).
        listen_port: Port to listen on; 0 picks a free one (read it from :attr:`port`).

    Attributes:
        latency_s: Extra delay added before each forwarded chunk, in seconds (default 0).
        accepted: Connections accepted since start, whatever the mode.
        upstream_failures: Accepted connections whose connect to the target failed.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.latency_s = 0.0
        self.accepted = 0
        self.upstream_failures = 0
        self._mode: Mode = "pass"
        self._restored = anyio.Event()
        self._restored.set()
        self._scopes: set[anyio.CancelScope] = set()
        self._active = 0
        self._held = 0
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._port = 0

    # -- public state --------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address clients connect to instead of the target."""
        return self.listen_host

    @property
    def port(self) -> int:
        """The port clients connect to (known once the ``async with`` block is entered)."""
        return self._port

    @property
    def mode(self) -> Mode:
        """``"pass"``, ``"refuse"`` or ``"blackhole"``."""
        return self._mode

    @property
    def active(self) -> int:
        """Connections being forwarded right now (held blackholed ones are not counted)."""
        return self._active

    @property
    def held(self) -> int:
        """Connections accepted in blackhole mode and waiting for :meth:`restore`."""
        return self._held

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.listen_host}:{self._port} -> {self.target_host}:"
            f"{self.target_port} mode={self._mode} active={self._active} held={self._held} "
            f"accepted={self.accepted}>"
        )

    # -- control -------------------------------------------------------------------------

    def cut(self, mode: Literal["refuse", "blackhole"] = "refuse") -> None:
        """Break the network: abort every live connection and treat new ones per ``mode``.

        Args:
            mode: ``"refuse"`` resets new connections at once; ``"blackhole"`` accepts them
                and forwards nothing until :meth:`restore`.

        Raises:
            ValueError: ``mode`` is neither ``"refuse"`` nor ``"blackhole"``.
        """
        if mode not in ("refuse", "blackhole"):
            raise ValueError(f"cut mode must be 'refuse' or 'blackhole', not {mode!r}")
        if self._mode == "pass":
            self._restored = anyio.Event()
        self._mode = mode
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        """Forward again: new connections, and any held by a blackhole, reach the target."""
        self._mode = "pass"
        self._restored.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        listener = await anyio.create_tcp_listener(
            local_host=self.listen_host, local_port=self.listen_port, backlog=LISTEN_BACKLOG
        )
        self._listener = listener
        self._port = listener.extra(SocketAttribute.local_port)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(listener.serve, self._handle, tg)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None and self._listener is not None
        self._tg.cancel_scope.cancel()
        try:
            # The body's own exception (if any) propagates by itself; the task group only
            # has to wind down its children.
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()
            self._restored.set()

    # -- per connection ------------------------------------------------------------------

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.accepted += 1
        upstream: anyio.abc.SocketStream | None = None
        with anyio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                if self._mode == "refuse":
                    return
                if self._mode == "blackhole":
                    self._held += 1
                    try:
                        await self._restored.wait()
                    finally:
                        self._held -= 1
                try:
                    upstream = await anyio.connect_tcp(self.target_host, self.target_port)
                except OSError:
                    self.upstream_failures += 1
                    return
                self._active += 1
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._pump, client, upstream, scope)
                        tg.start_soon(self._pump, upstream, client, scope)
                finally:
                    self._active -= 1
            finally:
                self._scopes.discard(scope)
                await _abort(upstream, client)

    async def _pump(
        self,
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        conn_scope: anyio.CancelScope,
    ) -> None:
        try:
            while True:
                try:
                    chunk = await src.receive(CHUNK_BYTES)
                except anyio.EndOfStream:
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await dst.send_eof()
                    return
                if self.latency_s > 0:
                    await anyio.sleep(self.latency_s)
                await dst.send(chunk)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            # One side broke: the connection as a whole is gone.
            conn_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fault proxy in pass mode until killed (``python -m exai.testing.faultproxy``)."""
    parser = argparse.ArgumentParser(
        prog="python -m exai.testing.faultproxy",
        description="Forward TCP connections to TARGET_HOST:TARGET_PORT (a benchmark helper).",
    )
    parser.add_argument("target_host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: a free one)")
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay per chunk")
    args = parser.parse_args(argv)

    async def run() -> None:
        async with FaultProxy(
            args.target_host, args.target_port, listen_host=args.host, listen_port=args.port
        ) as proxy:
            proxy.latency_s = args.latency_s
            print(
                f"faultproxy: listening on {proxy.host}:{proxy.port}", file=sys.stderr, flush=True
            )
            await anyio.sleep_forever()

    try:
        anyio.run(run, backend="trio")
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
