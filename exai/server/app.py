"""The daemon's run: listeners, admin, background work, and graceful shutdown.

Start it with ``await nursery.start(serve, settings)``; ``task_status.started`` hands back the
:class:`~exai.server.services.Daemon` (its parts, as :func:`~exai.server.services.compose`
wired them) once both listeners accept connections. ``daemon.request_shutdown()`` (what
SIGINT/SIGTERM do in ``exai serve``) stops accepting, lets in-flight calls finish within
``drain_timeout_s``, cancels the rest, and returns.

What runs, and who owns it (outermost first)::

    stall probe (exai.server.stalls.LoopProbe: a system task and a watchdog thread)
      audit log (closes after the calls drained, so their lines are written)
        call runner's nursery: every keyed execution (an unkeyed one runs in its responder)
          connection nursery: the admin listener, the memory backstop, the secret watcher,
                              each connection (see exai.server.listener)
            accept nursery: one accept loop per listening socket
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import trio

from exai.config import Settings
from exai.logs import log_event, say
from exai.server.admin import serve_admin
from exai.server.auth import check_bind
from exai.server.listener import load_ssl_context
from exai.server.mcp_sessions import STORED_KEY_FILE, stored_key
from exai.server.overload import tune_malloc
from exai.server.services import Daemon, compose, paced
from exai.server.stalls import loop_probe
from exai.tools import default_registry
from exai.tools.base import ToolRegistry

__all__ = ["BindError", "Daemon", "serve"]

#: start-up work done in a worker thread (reading the TLS files and the kept session-signing
#: key, checking the tools' schemas)
_TLS_LIMITER = trio.CapacityLimiter(1)


def _url(scheme: str, listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


async def serve(
    settings: Settings,
    registry: ToolRegistry | None = None,
    services: dict[str, Any] | None = None,
    *,
    announce: bool = True,
    reload: Callable[[], Settings] | None = None,
    reload_environ: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until :meth:`Daemon.request_shutdown`.

    Args:
        settings: the settings (``Settings.from_env()`` in ``exai serve``).
        registry: the tools; default :func:`exai.tools.default_registry`.
        services: shared services passed to tools (providers, conversations, …).
        announce: print the two ``exai: …`` lines to stderr when ready.
        reload: builds fresh settings for secret rotation (SIGHUP, changed secret files);
            ``None`` disables rotation.
        reload_environ: where the names of the watched secret files come from.

    Raises:
        ConfigError: an unsafe bind, unreadable TLS files.
        OSError: the port is taken.
    """
    if registry is None:
        # checking the tools' schemas against the metaschema takes a tenth of a second the
        # first time: not on the event loop
        registry = await trio.to_thread.run_sync(default_registry, limiter=_TLS_LIMITER)
    kept_key = None
    if not settings.session_signing_key:
        # the session-signing key kept in the state directory (made at first start: mkdir,
        # write, fsync, link) is blocking file I/O: not on the loop
        kept_key = await trio.to_thread.run_sync(
            stored_key, settings.state_path, limiter=_TLS_LIMITER
        )
    daemon = compose(
        settings,
        registry,
        services,
        reload=reload,
        reload_environ=reload_environ,
        kept_signing_key=kept_key,
    )
    check_bind(settings, daemon.tokens)
    # reading the certificate and key files is blocking file I/O: not on the loop
    ssl_ctx = await trio.to_thread.run_sync(load_ssl_context, settings, limiter=_TLS_LIMITER)
    daemon.started_at = trio.current_time()
    tune_malloc()

    with (
        loop_probe(settings.stall_threshold_s, daemon.on_stall) as detector,
        paced(daemon.pacer, daemon.services),
    ):
        daemon.stall_detector = detector
        await _run(daemon, settings, ssl_ctx, announce, task_status)
    log_event("daemon.stopped")


class BindError(OSError):
    """A listener could not bind its address (most often: the port is taken).

    Attributes:
        what: ``"MCP"`` or ``"admin"``.
        variable: the setting that names the port (``EXAI_PORT``, ``EXAI_ADMIN_PORT``).
        host: the address it tried.
        port: the port it tried.
    """

    def __init__(self, what: str, variable: str, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.what, self.variable, self.host, self.port = what, variable, host, port


async def _run(
    daemon: Daemon,
    settings: Settings,
    ssl_ctx: ssl.SSLContext | None,
    announce: bool,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    # the audit log closes after the calls drained, so their lines are written; so do the
    # cross-daemon claims and limits (the last calls store their results and free their slots)
    async with (
        daemon.audit,
        daemon.shared_calls or contextlib.nullcontext(),
        daemon.shared_limits or contextlib.nullcontext(),
        daemon.runner,
        trio.open_nursery() as conn_nursery,
    ):
        try:
            listeners: list[Any] = list(
                await trio.open_tcp_listeners(settings.port, host=settings.host, backlog=4096)
            )
        except OSError as exc:
            raise BindError("MCP", "EXAI_PORT", settings.host, settings.port, exc) from exc
        daemon.url = _url("wss" if ssl_ctx else "ws", listeners[0]) + "/mcp"
        if ssl_ctx is not None:
            listeners = [trio.SSLListener(lst, ssl_ctx, https_compatible=True) for lst in listeners]
        try:
            admin_url = await conn_nursery.start(
                lambda task_status: serve_admin(
                    settings.admin_host,
                    settings.admin_port,
                    readiness=daemon.readiness.readiness,
                    metrics=daemon.metrics.render,
                    refused=daemon.stats.refuse_admin_connection,
                    task_status=task_status,
                )
            )
        except OSError as exc:
            for lst in listeners:
                await lst.aclose()
            raise BindError(
                "admin", "EXAI_ADMIN_PORT", settings.admin_host, settings.admin_port, exc
            ) from exc
        daemon.admin_url = admin_url
        daemon.conn_nursery = conn_nursery
        conn_nursery.start_soon(daemon.memory.run)
        if daemon.reloader is not None:
            await conn_nursery.start(daemon.reloader.watch)
        async with trio.open_nursery() as accept_nursery:
            for lst in listeners:
                accept_nursery.start_soon(daemon.listener.accept_loop, lst, conn_nursery)
            daemon.readiness.ready = True
            if announce:
                _announce(daemon)
            log_event("daemon.ready", url=daemon.url, admin=admin_url)
            if daemon.signing_key_source == "state directory":
                log_event(
                    "config.session_key_stored",
                    note="EXAI_SESSION_SIGNING_KEY is not set: Streamable HTTP session ids are "
                    "signed with the key kept in the state directory (session-signing.key), so "
                    "they outlive a restart; daemons behind one balancer must share one key "
                    "(docs/deploy.md)",
                )
            elif daemon.signing_key_source == "per run":
                log_event(
                    "config.session_key_generated",
                    note="EXAI_SESSION_SIGNING_KEY is not set and the state directory cannot "
                    "keep a key: Streamable HTTP session ids are signed with a key made for "
                    "this run and end with it; daemons behind one balancer must share one key "
                    "(docs/deploy.md)",
                    file=str(settings.state_path / STORED_KEY_FILE),
                )
            task_status.started(daemon)
            await daemon.wait_for_shutdown()
            accept_nursery.cancel_scope.cancel()
        await _drain(daemon, settings, listeners, conn_nursery)


async def _drain(
    daemon: Daemon, settings: Settings, listeners: list[Any], conn_nursery: trio.Nursery
) -> None:
    """Stop accepting, hand every session over as soon as its calls are answered (the balancer
    sends its client elsewhere), let running calls finish within ``drain_timeout_s``, cancel
    the rest, then end the connection nursery (see docs/deploy.md, "Rolling restart")."""
    daemon.readiness.draining = True
    daemon.changes.notify()
    for lst in listeners:
        with trio.move_on_after(1.0):
            await lst.aclose()
    calls, sessions, changes = daemon.calls, daemon.sessions, daemon.changes
    log_event("daemon.draining", running=len(calls.running))
    for session in sessions:
        conn_nursery.start_soon(session.hand_over)
    bound = trio.current_time() + settings.drain_timeout_s
    with trio.move_on_at(bound):
        await changes.wait_for(lambda: not calls.running)
    for ex in list(calls.running.values()):
        ex.cancel()  # past the drain bound (the calls nursery also encloses sessions)
    # each session's hand-over closes it once every answer it owes is queued, and the close
    # writes them: a large answer to a client that reads it slowly but steadily may take a
    # while (each write under the send deadline) — within the drain bound, but at least 2 s
    # as before; a session still open then is one whose client does not read (or too slowly)
    with trio.move_on_at(max(bound, trio.current_time() + 2.0)):
        await changes.wait_for(lambda: not sessions)
    sessions.close_all(conn_nursery, 1001, "exai is shutting down")
    with trio.move_on_after(2.0):
        await changes.wait_for(lambda: not sessions)
    conn_nursery.cancel_scope.cancel()


def _announce(daemon: Daemon) -> None:
    # in the stream's format (plain on a terminal, JSON records otherwise: exai.logs.say)
    say(f"exai: listening on {daemon.url}", "daemon.listening", url=daemon.url)
    say(f"exai: admin on {daemon.admin_url}", "daemon.admin_listening", url=daemon.admin_url)
