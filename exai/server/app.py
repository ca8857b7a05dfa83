"""The daemon: listener, admission, handshake, sessions, executions and graceful shutdown.

Start it with ``await nursery.start(serve, settings)``; ``task_status.started`` hands back the
:class:`Daemon` once both listeners accept connections. ``daemon.request_shutdown()`` (what
SIGINT/SIGTERM do in ``exai serve``) stops accepting, lets in-flight calls finish within
``drain_timeout_s``, cancels the rest, and returns.

Data path of a connection (see docs/architecture in the design)::

    accept (bounded handshakes) → HTTP request read within handshake_timeout_s
      → per-IP cap → global cap → bearer token → path /mcp → upgrade → Session
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from exai import __version__, errors
from exai.config import Settings, is_loopback
from exai.logs import dropped_log_records, log_event
from exai.resilience import TokenBucket
from exai.server import protocol as p
from exai.server.admin import serve_admin
from exai.server.admission import Admission
from exai.server.audit import AuditLog
from exai.server.auth import TokenTable, parse_tokens
from exai.server.budget import MemoryBudget
from exai.server.calls import CallRegistry, Execution
from exai.server.metrics import DaemonMetrics
from exai.server.outbox import ProgressStream
from exai.server.overload import OverloadManager, tune_malloc
from exai.server.reload import Reloader
from exai.server.session import Session, unwrap_exception
from exai.server.stalls import StallDetector, stall_detector
from exai.server.wsconn import accept_request, http_version
from exai.tools import default_registry
from exai.tools.base import ToolContext, ToolRegistry

__all__ = ["Daemon", "DaemonStats", "serve"]

#: how long an execution started by a bridge (idempotency key) waits to be re-adopted
ORPHAN_GRACE_S = 30.0
_TLS_LIMITER = trio.CapacityLimiter(1)


class DaemonStats:
    """Counters for ``status`` and, later, metrics."""

    def __init__(self) -> None:
        self.rejections: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()  # by outcome
        self.by_tool: Counter[tuple[str, str]] = Counter()  # (tool, outcome)
        #: progress notifications dropped because a slow client's send queue was full
        self.progress_dropped = 0


class Daemon:
    """State shared by every session. Built by :func:`serve`."""

    def __init__(
        self,
        settings: Settings,
        registry: ToolRegistry,
        services: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.services: dict[str, Any] = dict(services or {})
        self.services.setdefault("daemon", self)
        self.version = __version__
        #: a random id of this daemon run (session ids and call keys are built on it)
        self.instance_id = secrets.token_hex(6)
        self.instructions = (
            "exai serves AI tools (chat, thinkdeep, codereview, consensus, …) through Kimi, GLM "
            "and OpenAI-compatible providers. Use continuation_id to continue a conversation."
        )
        self.tokens = TokenTable(parse_tokens(settings.tokens))
        self.admission = Admission(settings.max_connections, settings.max_connections_per_ip)
        self.inflight = trio.CapacityLimiter(settings.max_inflight)
        #: what connections' second and later concurrent calls share: three quarters of the
        #: daemon's slots, so a quarter stays for connections running one call each
        self.shared_inflight = trio.CapacityLimiter(max(1, settings.max_inflight * 3 // 4))
        self.calls = CallRegistry(
            ttl_s=settings.idempotency_ttl_s,
            max_entries=settings.idempotency_max_entries,
            max_bytes=settings.result_cache_max_bytes,
            orphan_grace_s=ORPHAN_GRACE_S,
        )
        #: bytes charged by every session's pending requests and unwritten answers
        self.budget = MemoryBudget(settings.max_pending_bytes)
        self.sessions: set[Session] = set()
        self.stats = DaemonStats()
        self.started_at = 0.0
        self.draining = False
        self.ready = False
        self._overloaded_reason: str | None = None
        self.calls_nursery: trio.Nursery | None = None
        self.conn_nursery: trio.Nursery | None = None
        self.reloader: Reloader | None = None
        self.stall_detector: StallDetector | None = None
        self.memory: OverloadManager | None = None
        self.metrics = DaemonMetrics(self)
        self.audit: AuditLog = AuditLog.disabled()
        self.identity_buckets: dict[str, TokenBucket] = {}
        self.identity_limiters: dict[str, trio.CapacityLimiter] = {}
        self.url = ""
        self.admin_url = ""
        self._shutdown = trio.Event()
        self._changed = trio.Event()
        self._handshakes = trio.Semaphore(max(64, min(1024, settings.max_connections)))

    # ------------------------------------------------------------------ public
    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._shutdown.set()

    def status(self) -> dict[str, Any]:
        """What the ``status`` tool and ``exai status`` report. Never contains a secret."""
        s = self.settings
        return {
            "version": self.version,
            "uptime_s": round(trio.current_time() - self.started_at, 3),
            "ready": self.readiness()[0],
            "draining": self.draining,
            "overloaded": self.overloaded_reason,
            "auth": "tokens" if self.tokens.enabled else "none (loopback only)",
            "connections": self.admission.snapshot(),
            "sessions": len(self.sessions),
            "inflight": {
                "calls": int(self.inflight.borrowed_tokens),
                "max_inflight": s.max_inflight,
                "session_max_inflight": s.session_max_inflight,
                "running_executions": len(self.calls.running),
            },
            "limits": {
                "max_frame_bytes": s.max_frame_bytes,
                "session_rate_per_s": s.session_rate_per_s,
                "session_burst": s.session_burst,
                "call_timeout_s": s.call_timeout_s,
                "slot_wait_s": s.slot_wait_s,
            },
            "rejections": dict(self.stats.rejections),
            "calls": dict(self.stats.calls),
            "stored_results": len(self.calls),
            "stored_results_bytes": self.calls.nbytes,
            "pending": {
                **self.budget.snapshot(),
                "session_max_pending": s.session_max_pending,
                "session_max_pending_bytes": s.session_max_pending_bytes,
                "session_queue_max": s.session_queue_max,
            },
            "log_dropped": dropped_log_records(),
            "progress_dropped": self.stats.progress_dropped,
            "max_loop_stall_s": (
                round(self.stall_detector.max_stall_s, 4) if self.stall_detector else None
            ),
            "loop_stalls": self.stall_detector.stall_count if self.stall_detector else None,
            "memory": (
                {
                    "used_bytes": self.memory.used_bytes,
                    "limit_bytes": self.memory.limit_bytes,
                    "baseline_bytes": self.memory.baseline_bytes,
                    "reserved_bytes": self.reserved_bytes(),
                    "sheds": self.memory.sheds,
                    "trims": self.memory.trims,
                }
                if self.memory
                else None
            ),
        }

    def readiness(self) -> tuple[bool, str | None]:
        """Whether a balancer should send new connections here, and if not why: draining,
        overloaded, every connection slot taken (``max_connections``), or a shared service (the
        conversation store) that says it cannot serve (``not_ready_reason() -> str | None``)."""
        if not self.ready:
            return False, "starting"
        if self.draining:
            return False, "draining"
        if self.overloaded_reason is not None:
            return False, self.overloaded_reason
        if self.admission.open >= self.admission.max_connections:
            return False, "max_connections"
        for service in self.services.values():
            check = getattr(service, "not_ready_reason", None)
            if check is not None and service is not self:
                reason = check()
                if reason:
                    return False, str(reason)
        return True, None

    @property
    def overloaded_reason(self) -> str | None:
        """Why new calls and connections are refused now (``None`` = admitting): the memory
        backstop, or the pending-bytes budget being full (until it drains to 80 %)."""
        if self._overloaded_reason is not None:
            return self._overloaded_reason
        if self.memory is not None and self.memory.reason is not None:
            return self.memory.reason
        if self.budget.full:
            return (
                f"pending requests and unwritten answers fill the memory budget "
                f"({self.budget.charged_bytes} bytes; EXAI_MAX_PENDING_BYTES and its reserve)"
            )
        return None

    @overloaded_reason.setter
    def overloaded_reason(self, reason: str | None) -> None:
        self._overloaded_reason = reason

    def reserved_bytes(self) -> int:
        """The byte budgets of the daemon's caches (what they may hold at most): the stored
        results, the conversation thread cache, and every service with a
        ``memory_budget_bytes()``."""
        total = self.calls.max_bytes + self.settings.thread_cache_max_bytes
        for service in self.services.values():
            budget = getattr(service, "memory_budget_bytes", None)
            if budget is not None and service is not self:
                total += int(budget() or 0)
        return total

    def shrink_caches(self) -> int:
        """Drop what can be rebuilt (stored results down to half their budget, service
        caches). Returns entries freed."""
        freed = self.calls.shrink(0.5)
        for service in self.services.values():
            shrink = getattr(service, "shrink_caches", None)
            if shrink is not None and service is not self:
                freed += int(shrink() or 0)
        return freed

    def identity_bucket(self, name: str) -> TokenBucket | None:
        """The message bucket shared by every connection of one client identity."""
        s = self.settings
        if s.identity_rate_per_s <= 0:
            return None
        bucket = self.identity_buckets.get(name)
        if bucket is None:
            bucket = TokenBucket(s.identity_rate_per_s, s.identity_burst)
            self.identity_buckets[name] = bucket
        return bucket

    def identity_limiter(self, name: str) -> trio.CapacityLimiter | None:
        """The in-flight limiter shared by every connection of one client identity."""
        if self.settings.identity_max_inflight <= 0:
            return None
        lim = self.identity_limiters.get(name)
        if lim is None:
            lim = trio.CapacityLimiter(self.settings.identity_max_inflight)
            self.identity_limiters[name] = lim
        return lim

    def on_stall(self, duration_s: float, task_name: str) -> None:
        self.metrics.loop_stall.observe(duration_s)
        log_event("loop.stall", logging.WARNING, duration_s=round(duration_s, 4), task=task_name)

    async def shared_result(self, client_key: str) -> dict[str, Any] | None:
        """A result stored by another daemon for ``client_key`` (Redis), if configured."""
        store = self.services.get("idempotency")
        if store is None:
            return None
        try:
            with trio.move_on_after(self.settings.store_timeout_s):
                result: dict[str, Any] | None = await store.get(client_key)
                return result
        except errors.ExaiError:
            return None
        return None

    def notify(self) -> None:
        """Wake :meth:`wait_for` waiters: executions, sessions or responders changed."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (re-checked on every :meth:`notify`)."""
        while not predicate():
            await self._changed.wait()

    # ------------------------------------------------------------------ calls
    async def run_execution(
        self,
        ex: Execution,
        args: dict[str, Any],
        ctx: ToolContext,
        limiters: list[trio.CapacityLimiter],
    ) -> None:
        """Run one tool call under its deadline; store its response; release its slots."""
        spec = self.registry.get(ex.tool)
        assert spec is not None
        timeout = spec.timeout_s if spec.timeout_s is not None else self.settings.call_timeout_s
        ex.started_at = trio.current_time()
        if ex.deadline == float("inf"):
            ex.deadline = ex.started_at + timeout
        outcome = "ok"

        async def progress(
            progress: float | None = None, total: float | None = None, message: str | None = None
        ) -> None:
            ex.progress(message, make=p.progress_notification, value=progress, total=total)

        ctx.progress = progress
        try:
            with ex.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, ex)
                    if ex.client_key:
                        nursery.start_soon(self.calls.orphan_watch, ex)
                    try:
                        # the deadline was fixed at admission: waiting for a slot counted
                        with trio.fail_at(ex.deadline):
                            result = await spec.handler(args, ctx)
                        ex.payload = {"result": result.to_mcp()}
                    except trio.TooSlowError:
                        outcome = "timeout"
                        exc = errors.DeadlineExceeded(
                            f"tool {ex.tool!r} did not finish within its deadline of {timeout:g}s"
                        )
                        ex.payload = {"error": p.error_from_exception(None, exc)["error"]}
                    except Exception as raw:
                        exc2 = unwrap_exception(raw)
                        if isinstance(exc2, errors.ExaiError):
                            outcome = exc2.reason
                            err = p.error_from_exception(None, exc2)["error"]
                        else:
                            outcome = "internal_error"
                            log_event(
                                "call.crashed",
                                logging.ERROR,
                                tool=ex.tool,
                                exc_type=type(exc2).__name__,
                            )
                            err = p.error(
                                None,
                                -32603,
                                f"internal error in tool {ex.tool!r} ({type(exc2).__name__})",
                                {"reason": "internal_error"},
                            )["error"]
                        ex.payload = {"error": err}
                    nursery.cancel_scope.cancel()
            if ex.scope.cancelled_caught:
                outcome = "cancelled"
                ex.payload = None
        finally:
            self.calls.running.pop(ex.key, None)
            if ex.payload is not None:
                ex.payload_bytes = self.calls.store(ex.key, ex.digest, ex.payload)
                await self._share_result(ex)
            for limiter in limiters:
                limiter.release_on_behalf_of(ex)
            self.stats.calls[outcome] += 1
            self.stats.by_tool[(ex.tool, outcome)] += 1
            self.metrics.call_duration.labels(ex.tool, outcome).observe(
                trio.current_time() - ex.started_at
            )
            ex.done.set()
            self.notify()
            duration_s = trio.current_time() - ex.started_at
            self.audit.record(
                tool=ex.tool,
                outcome=outcome,
                client=ctx.client,
                peer=ctx.peer,
                provider=ctx.annotations.get("provider"),
                model=ctx.annotations.get("model"),
                key_fp=ctx.annotations.get("key_fingerprint"),
                duration_s=duration_s,
                session=ctx.session_id,
                request_id=ctx.request_id,
            )
            log_event(
                "call.finished",
                tool=ex.tool,
                client=ctx.client,
                outcome=outcome,
                duration_s=round(trio.current_time() - ex.started_at, 4),
                provider=ctx.annotations.get("provider"),
                model=ctx.annotations.get("model"),
            )

    async def _share_result(self, ex: Execution) -> None:
        store = self.services.get("idempotency")
        if store is None or not ex.client_key or ex.payload is None:
            return
        with trio.move_on_after(self.settings.store_timeout_s) as scope:
            scope.shield = True  # finishing bookkeeping even while being cancelled
            try:
                await store.put(ex.shared_key, ex.payload, self.settings.idempotency_ttl_s)
            except errors.ExaiError:
                pass

    async def _heartbeat(self, ex: Execution) -> None:
        interval = self.settings.heartbeat_interval_s
        if interval <= 0:
            return
        while True:
            await trio.sleep(interval)
            elapsed = trio.current_time() - ex.started_at
            ex.progress(f"{ex.tool}: still working ({elapsed:.0f}s)", make=p.progress_notification)

    # ------------------------------------------------------------------ connections
    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            await self._handshakes.acquire()
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._handshakes.release()
                return
            except OSError as exc:
                self._handshakes.release()
                log_event("listener.accept_error", logging.WARNING, error=exc.strerror)
                await trio.sleep(0.05)  # EMFILE and friends: back off instead of spinning
                continue
            except BaseException:
                self._handshakes.release()
                raise
            nursery.start_soon(self._handle_stream, stream)

    async def _handle_stream(self, raw_stream: trio.abc.Stream) -> None:
        ip = _peer_ip(raw_stream)
        # the writer's deadline follows the bytes actually written (see exai.server.outbox)
        stream = ProgressStream(raw_stream)
        handshake_held = True
        admitted = False
        try:
            async with trio.open_nursery() as nursery:
                request: WebSocketRequest | None = None
                with trio.move_on_after(self.settings.handshake_timeout_s):
                    request = await accept_request(
                        nursery, stream, max_message_size=self.settings.max_frame_bytes
                    )
                self._handshakes.release()
                handshake_held = False
                if request is None:
                    self.stats.rejections["handshake_timeout"] += 1
                    nursery.cancel_scope.cancel()
                    return
                refusal = self._admit(request, ip)
                if refusal is not None:
                    status, headers, body = refusal
                    with trio.move_on_after(self.settings.handshake_timeout_s):
                        await request.reject(status, extra_headers=headers, body=body)
                    nursery.cancel_scope.cancel()
                    return
                admitted = True
                identity = self.tokens.authenticate(_header(request, b"authorization"))
                assert identity is not None  # checked in _admit
                subprotocol = "mcp" if "mcp" in request.proposed_subprotocols else None
                conn = await request.accept(subprotocol=subprotocol)
                session = Session(self, conn, ip, identity, stream)
                self.sessions.add(session)
                try:
                    await session.run()
                finally:
                    self.sessions.discard(session)
                    self.notify()
                    with trio.move_on_after(1.0) as closing:
                        closing.shield = True
                        await conn.aclose()
                    nursery.cancel_scope.cancel()
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # one connection's failure never takes the daemon down
            if not _only_disconnects(exc):
                self.stats.rejections["session_error"] += 1
                log_event(
                    "session.error",
                    logging.ERROR,
                    ip=ip,
                    exc_type=type(unwrap_exception(exc)).__name__,
                    error=str(unwrap_exception(exc))[:200],
                )
        finally:
            if handshake_held:
                self._handshakes.release()
            if admitted:
                self.admission.release(ip)
            await trio.aclose_forcefully(stream)

    def _admit(
        self, request: WebSocketRequest, ip: str
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """Decide before the upgrade. Returns (status, headers, body) to refuse, or None after
        taking an admission slot (the caller releases it)."""
        json_ct = (b"Content-Type", b"application/json")
        malformed = _malformed_upgrade(request)
        if malformed is not None:
            self.stats.rejections["bad_request"] += 1
            return 400, [json_ct], _body("bad_request", malformed)
        if self.draining or self.overloaded_reason is not None:
            reason = "draining" if self.draining else "overloaded"
            self.stats.rejections[reason] += 1
            return 503, [json_ct, (b"Retry-After", b"1")], _body(reason, "not accepting now")
        refused = self.admission.try_admit(ip)
        if refused is not None:
            limit = (
                self.settings.max_connections
                if refused == "max_connections"
                else self.settings.max_connections_per_ip
            )
            return (
                503,
                [json_ct, (b"Retry-After", b"1")],
                _body(refused, f"connection limit reached ({refused}={limit}); retry later"),
            )
        ok = False
        try:
            if self.tokens.authenticate(_header(request, b"authorization")) is None:
                self.stats.rejections["unauthorized"] += 1
                return (
                    401,
                    [json_ct, (b"WWW-Authenticate", b'Bearer realm="exai"')],
                    _body("unauthorized", "missing or invalid bearer token"),
                )
            if request.path.split("?", 1)[0] != "/mcp":
                self.stats.rejections["not_found"] += 1
                return 404, [json_ct], _body("not_found", "the MCP endpoint is /mcp")
            ok = True
            return None
        finally:
            if not ok:
                self.admission.release(ip)


_DISCONNECTS = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError)


def _only_disconnects(exc: BaseException) -> bool:
    """True when ``exc`` (or every leaf of an exception group) is a peer going away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_disconnects(e) for e in exc.exceptions)
    return isinstance(exc, _DISCONNECTS)


def _body(reason: str, message: str) -> bytes:
    return json.dumps({"error": reason, "message": message}).encode()


def _malformed_upgrade(request: WebSocketRequest) -> str | None:
    """Why the upgrade request is refused with 400 before anything else, or ``None``.

    An HTTP/1.0 upgrade (RFC 6455 needs 1.1), and more than one ``Authorization`` header
    (which one counts would depend on the reader; a proxy may have checked the other).
    """
    version = http_version(request)
    if version is not None and version != b"1.1":
        return f"a WebSocket upgrade needs HTTP/1.1 (got HTTP/{version.decode('ascii', 'replace')})"
    if sum(1 for k, _ in request.headers if k.lower() == b"authorization") > 1:
        return "more than one Authorization header; send exactly one"
    return None


def _header(request: WebSocketRequest, name: bytes) -> str | None:
    for k, v in request.headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _peer_ip(stream: trio.abc.Stream) -> str:
    sock_stream: Any = stream
    if isinstance(stream, trio.SSLStream):
        sock_stream = stream.transport_stream
    try:
        return str(sock_stream.socket.getpeername()[0])
    except (AttributeError, OSError):
        return "unknown"


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise errors.ConfigError(f"cannot load EXAI_TLS_CERT/EXAI_TLS_KEY: {exc}") from exc
    return ctx


def check_bind(settings: Settings, tokens: TokenTable) -> None:
    """Refuse an unsafe bind with a message saying what it would expose.

    Raises:
        ConfigError: non-loopback without tokens; or non-loopback without TLS unless
            ``EXAI_ALLOW_INSECURE_BIND`` is set.
    """
    if is_loopback(settings.host):
        return
    if not tokens.enabled:
        raise errors.ConfigError(
            f"refusing to listen on {settings.host}: no client tokens are configured, so anyone "
            "who can reach this address could use your provider keys. Set EXAI_TOKENS or "
            "EXAI_TOKENS_FILE (see `exai token new NAME`), or bind 127.0.0.1."
        )
    if not settings.tls_cert and not settings.allow_insecure_bind:
        raise errors.ConfigError(
            f"refusing to listen on {settings.host} without TLS: client tokens and every "
            "prompt, file and answer would cross the network in clear text. Set EXAI_TLS_CERT "
            "and EXAI_TLS_KEY, or EXAI_ALLOW_INSECURE_BIND=1 if the network is trusted."
        )


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
        registry = default_registry()
    daemon = Daemon(settings, registry, services)
    check_bind(settings, daemon.tokens)
    # reading the certificate and key files is blocking file I/O: not on the loop
    ssl_ctx = await trio.to_thread.run_sync(_ssl_context, settings, limiter=_TLS_LIMITER)
    daemon.started_at = trio.current_time()
    tune_malloc()
    daemon.memory = OverloadManager(daemon)
    if reload is not None:
        daemon.reloader = Reloader(daemon, reload, reload_environ)

    with stall_detector(settings.stall_threshold_s, daemon.on_stall) as detector:
        daemon.stall_detector = detector
        await _serve(daemon, settings, ssl_ctx, announce, task_status)
    log_event("daemon.stopped")


async def _serve(
    daemon: Daemon,
    settings: Settings,
    ssl_ctx: ssl.SSLContext | None,
    announce: bool,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    # the audit log closes after the calls drained, so their lines are written
    async with AuditLog.from_settings(settings) as audit, trio.open_nursery() as calls_nursery:
        daemon.audit = audit
        daemon.calls_nursery = calls_nursery
        async with trio.open_nursery() as conn_nursery:
            listeners: list[Any] = list(
                await trio.open_tcp_listeners(settings.port, host=settings.host, backlog=4096)
            )
            daemon.url = _url("wss" if ssl_ctx else "ws", listeners[0]) + "/mcp"
            if ssl_ctx is not None:
                listeners = [
                    trio.SSLListener(lst, ssl_ctx, https_compatible=True) for lst in listeners
                ]
            admin_url = await conn_nursery.start(serve_admin, daemon)
            daemon.admin_url = admin_url
            daemon.conn_nursery = conn_nursery
            assert daemon.memory is not None
            conn_nursery.start_soon(daemon.memory.run)
            if daemon.reloader is not None:
                conn_nursery.start_soon(daemon.reloader.watch)
            async with trio.open_nursery() as accept_nursery:
                for lst in listeners:
                    accept_nursery.start_soon(daemon._accept_loop, lst, conn_nursery)
                daemon.ready = True
                if announce:
                    _announce(daemon)
                log_event("daemon.ready", url=daemon.url, admin=admin_url)
                task_status.started(daemon)
                await daemon._shutdown.wait()
                accept_nursery.cancel_scope.cancel()
            daemon.draining = True
            for lst in listeners:
                with trio.move_on_after(1.0):
                    await lst.aclose()
            log_event("daemon.draining", running=len(daemon.calls.running))
            with trio.move_on_after(settings.drain_timeout_s):
                await daemon.wait_for(lambda: not daemon.calls.running)
            for ex in list(daemon.calls.running.values()):
                ex.cancel()  # past the drain bound (the calls nursery also encloses sessions)
            # let responders deliver what finished, then close every session
            with trio.move_on_after(1.0):
                await daemon.wait_for(lambda: not any(s.inflight for s in daemon.sessions))
            for session in list(daemon.sessions):
                conn_nursery.start_soon(session.close, 1001, "exai is shutting down")
            with trio.move_on_after(2.0):
                await daemon.wait_for(lambda: not daemon.sessions)
            conn_nursery.cancel_scope.cancel()


def _announce(daemon: Daemon) -> None:
    print(f"exai: listening on {daemon.url}", file=sys.stderr, flush=True)
    print(f"exai: admin on {daemon.admin_url}", file=sys.stderr, flush=True)
