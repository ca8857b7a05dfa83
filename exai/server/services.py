"""The composition root: what a daemon is made of, and who gets what.

:func:`open_services` starts the shared services the tools use — providers, conversations,
idempotency results, the file sandbox — each an async context manager, and closes them in
reverse order on exit.

:func:`compose` builds every part of one daemon from its settings, tools and services and wires
them together. Each part is handed only the narrow things it needs — the readiness view, the
metrics registry and its histograms, the call runner, callbacks — and none refers back to the
daemon::

    Listener      ← settings, Admission, TokenTable, Readiness, DaemonStats, SessionTable.serve
    SessionTable  ← SessionShared (tools, Readiness, CallSlots, MemoryBudget, CallRegistry,
                    CallRunner, Changes, DaemonStats, slot-wait histogram, AuditLog)
    CallRunner    ← settings, tools, CallRegistry, DaemonStats, call histogram, AuditLog,
                    Changes, the shared results (Redis)
    OverloadManager ← settings, MemoryBudget, reserved_bytes / shrink_caches / cached_bytes
    Readiness     ← Admission, MemoryBudget, the overload reason, services' not_ready_reason
    Reloader      ← settings, TokenTable, apply(settings, tokens) -> sessions revoked
    admin         ← Readiness.readiness, DaemonMetrics.render      (started by exai.server.app)
    tools         ← services["daemon"]: a status view (status(), protocol_versions)
    providers     ← the round pacer's reads lane, for the daemon's run only (:func:`paced`,
                    entered by exai.server.app)

:class:`Daemon` is what the composition hands back to its owner (:func:`exai.server.app.serve`,
the CLI, tests): the parts by name, and :meth:`Daemon.status`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import attrs
import trio

from exai import __version__
from exai.config import Settings
from exai.logs import dropped_log_records, log_event
from exai.server import protocol as p
from exai.server.admission import Admission, CallSlots
from exai.server.audit import AuditLog
from exai.server.auth import TokenTable, parse_tokens
from exai.server.budget import MemoryBudget
from exai.server.calls import CallRegistry, CallRunner, Changes
from exai.server.core import SessionShared
from exai.server.httpdoor import HttpDoor
from exai.server.legacy import LegacyDoor
from exai.server.listener import Listener
from exai.server.mcp_sessions import Revocations, SessionSigner
from exai.server.metrics import (
    DaemonMetrics,
    call_metrics,
    connection_metrics,
    loop_metrics,
    memory_metrics,
    pacing_metrics,
    pressure_metrics,
    service_metrics,
)
from exai.server.origins import OriginPolicy
from exai.server.overload import OverloadManager
from exai.server.pacing import RoundPacer
from exai.server.readiness import Readiness
from exai.server.reload import REVOKED_CLOSE_CODE, Reloader
from exai.server.sessions import SessionTable
from exai.server.shared_calls import SharedCalls
from exai.server.shared_limits import SharedLimits
from exai.server.stalls import LoopProbe
from exai.server.stats import DaemonStats
from exai.tools.base import ToolRegistry

__all__ = ["ORPHAN_GRACE_S", "Daemon", "DaemonView", "compose", "open_services"]

#: how long an execution started by a bridge (idempotency key) waits to be re-adopted
ORPHAN_GRACE_S = 30.0

INSTRUCTIONS = (
    "exai serves AI tools (chat, thinkdeep, codereview, consensus, …) through Kimi, GLM "
    "and OpenAI-compatible providers. Use continuation_id to continue a conversation."
)


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """Yield ``{"providers": …, "conversations": …, "idempotency": …}`` for the daemon."""
    from exai.providers import ProviderRouter
    from exai.providers.health import SharedHealth
    from exai.storage.service import ConversationService
    from exai.storage.stores import store_kind
    from exai.tools.sandbox import FileSandbox

    services: dict[str, Any] = {"files": FileSandbox(settings)}
    async with AsyncExitStack() as stack:
        bridge = None
        if settings.redis_url or store_kind(settings.effective_storage_url) == "postgres":
            from exai.storage.aio_bridge import open_asyncio_bridge

            bridge = await stack.enter_async_context(open_asyncio_bridge())
        conversations = await stack.enter_async_context(
            ConversationService.open(settings, bridge=bridge)
        )
        services["conversations"] = conversations
        if conversations.idempotency is not None:
            services["idempotency"] = conversations.idempotency
        router = await stack.enter_async_context(ProviderRouter(settings))
        if conversations.redis is not None:
            router.share_limits(conversations.redis)
            if settings.shared_health_poll_s > 0:
                # one daemon's open breaker, Retry-After or quota hold closes the provider on
                # every daemon of the deployment (read in the background, never on a call)
                router.shared_health = await stack.enter_async_context(
                    SharedHealth(
                        conversations.redis,
                        router.providers.values(),
                        key_prefix=settings.redis_key_prefix,
                        poll_interval_s=settings.shared_health_poll_s,
                    )
                )
        services["providers"] = router
        # learn what each configured provider serves (GET /models), bounded per provider, in
        # the background: start-up does not wait for a slow or unreachable endpoint
        background = await stack.enter_async_context(trio.open_nursery())
        stack.callback(background.cancel_scope.cancel)
        background.start_soon(router.refresh_models)
        yield services


@attrs.frozen
class DaemonView:
    """What tools see of the daemon that runs them (``services["daemon"]``, the
    :class:`exai.tools.base.DaemonView` protocol): its status and the protocol versions."""

    status: Callable[[], dict[str, Any]]
    protocol_versions: tuple[str, ...] = p.SUPPORTED_VERSIONS


class Daemon:
    """The parts of one daemon, as :func:`compose` wired them (see the module docstring).

    Nothing inside the daemon holds this object: it is for the daemon's owner — the run in
    :mod:`exai.server.app`, ``exai serve`` (shutdown, SIGHUP), and tests that look at a part.
    """

    def __init__(self, settings: Settings, registry: ToolRegistry, services: dict[str, Any]):
        self.settings = settings
        self.registry = registry
        self.services = services
        self.version = __version__
        #: a random id of this daemon run (session ids and call keys are built on it)
        self.instance_id = secrets.token_hex(6)
        self.admission = Admission(settings.max_connections, settings.max_connections_per_ip)
        self.slots = CallSlots(settings)
        self.calls = CallRegistry(
            ttl_s=settings.idempotency_ttl_s,
            max_entries=settings.idempotency_max_entries,
            max_bytes=settings.result_cache_max_bytes,
            orphan_grace_s=ORPHAN_GRACE_S,
        )
        #: bytes charged by every session's pending requests and unwritten answers
        self.budget = MemoryBudget(settings.max_pending_bytes)
        self.stats = DaemonStats()
        self.metrics = DaemonMetrics()
        self.changes = Changes()
        self.audit = AuditLog.from_settings(settings)
        self.started_at = 0.0
        self.url = ""
        self.admin_url = ""
        self.stall_detector: LoopProbe | None = None
        self.reloader: Reloader | None = None
        #: where the daemon's run starts its background work (session closes on revocation)
        self.conn_nursery: trio.Nursery | None = None
        #: across daemons (Redis): exactly-once claims, per-identity and per-IP limits
        self.shared_calls: SharedCalls | None = None
        self.shared_limits: SharedLimits | None = None
        #: the Streamable HTTP door, its session-id signer and the sessions ended by DELETE
        self.http_door: HttpDoor
        self.signer: SessionSigner
        #: where its key came from: "configured", "state directory" or "per run"
        self.signing_key_source = "per run"
        self.revocations: Revocations
        self._shutdown = trio.Event()
        # set by compose()
        self.memory: OverloadManager
        self.readiness: Readiness
        self.runner: CallRunner
        #: calls' starts and answers' reads taken in bites (see :func:`paced`)
        self.pacer: RoundPacer
        self.sessions: SessionTable
        self.listener: Listener

    # the handles tests and the CLI use
    @property
    def tokens(self) -> TokenTable:
        """The client tokens in force."""
        return self.listener.tokens

    @property
    def inflight(self) -> trio.CapacityLimiter:
        return self.slots.inflight

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    @property
    def draining(self) -> bool:
        return self.readiness.draining

    @property
    def overloaded_reason(self) -> str | None:
        return self.readiness.overloaded_reason

    @overloaded_reason.setter
    def overloaded_reason(self, reason: str | None) -> None:
        self.readiness.overloaded_reason = reason

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._shutdown.set()

    async def wait_for_shutdown(self) -> None:
        await self._shutdown.wait()

    def reserved_bytes(self) -> int:
        """The byte budgets of the daemon's caches (what they may hold at most): the stored
        results, the conversation thread cache, and every service with a
        ``memory_budget_bytes()``."""
        total = self.calls.max_bytes + self.settings.thread_cache_max_bytes
        for service in self.services.values():
            budget = getattr(service, "memory_budget_bytes", None)
            if budget is not None:
                total += int(budget() or 0)
        return total

    def shrink_caches(self) -> int:
        """Drop what can be rebuilt (stored results down to half their budget, service
        caches). Returns entries freed."""
        freed = self.calls.shrink(0.5)
        for service in self.services.values():
            shrink = getattr(service, "shrink_caches", None)
            if shrink is not None:
                freed += int(shrink() or 0)
        return freed

    def on_stall(self, duration_s: float, task_name: str) -> None:
        """The stall detector's callback: observed and logged."""
        self.metrics.loop_stall.observe(duration_s)
        log_event("loop.stall", logging.WARNING, duration_s=round(duration_s, 4), task=task_name)

    def status(self) -> dict[str, Any]:
        """What the ``status`` tool and ``exai status`` report. Never contains a secret."""
        s = self.settings
        detector, memory = self.stall_detector, self.memory
        return {
            "version": self.version,
            "uptime_s": round(trio.current_time() - self.started_at, 3),
            "ready": self.readiness.readiness()[0],
            "draining": self.readiness.draining,
            "overloaded": self.readiness.overloaded_reason,
            "auth": "tokens" if self.tokens.enabled else "none (loopback only)",
            "doors": {
                "websocket": "/mcp",
                "streamable_http": "/mcp",
                "legacy_op_protocol": "/" if s.legacy_protocol else None,
                "session_signing_key": self.signing_key_source,
                "http_sessions": self.revocations.status(),
            },
            "connections": self.admission.snapshot(),
            "sessions": len(self.sessions),
            "inflight": {
                "calls": int(self.slots.inflight.borrowed_tokens),
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
            "config": (
                {
                    "reloads": self.reloader.reloads,
                    # (and the providers the reload added or moved: the router's, by name)
                    "not_applied_until_restart": [
                        *self.reloader.not_applied,
                        *(
                            f"providers.{name}"
                            for name in getattr(self.services.get("providers"), "needs_restart", ())
                        ),
                    ],
                }
                if self.reloader
                else None
            ),
            "log_dropped": dropped_log_records(),
            "progress_dropped": self.stats.progress_dropped,
            "max_loop_stall_s": round(detector.max_stall_s, 4) if detector else None,
            "loop_stalls": detector.stall_count if detector else None,
            "memory": (
                {
                    "used_bytes": memory.used_bytes,
                    "limit_bytes": memory.limit_bytes,
                    "baseline_bytes": memory.baseline_bytes,
                    "reserved_bytes": self.reserved_bytes(),
                    "sheds": memory.sheds,
                    "trims": memory.trims,
                }
                if memory
                else None
            ),
        }


def _signer(settings: Settings, kept: bytes | None = None) -> tuple[SessionSigner, str]:
    """The session-id signer of ``EXAI_SESSION_SIGNING_KEY``, else of ``kept`` (the key kept in
    the state directory, :func:`~exai.server.mcp_sessions.stored_key`), else of a key made for
    this run; and which of the three (``"configured"``, ``"state directory"``, ``"per run"``)."""
    if settings.session_signing_key:
        key, source = settings.session_signing_key.reveal().encode(), "configured"
    elif kept is not None:
        key, source = kept, "state directory"
    else:
        key, source = secrets.token_bytes(32), "per run"  # (exai.server.app logs which)
    return SessionSigner(key, settings.http_session_ttl_s), source


def compose(
    settings: Settings,
    registry: ToolRegistry,
    services: Mapping[str, Any] | None = None,
    *,
    reload: Callable[[], Settings] | None = None,
    reload_environ: Mapping[str, str] | None = None,
    kept_signing_key: bytes | None = None,
) -> Daemon:
    """Build and wire every part of one daemon (see the module docstring). Starts nothing, and
    reads no file (it runs on the event loop): :func:`exai.server.app.serve` runs what is built
    here, and reads beforehand, in a thread, what it needs from files.

    Args:
        settings: the daemon's settings.
        registry: its tools.
        services: the shared services tools use (:func:`open_services`); a ``"daemon"`` entry
            (the status view) is added unless given.
        reload: builds fresh settings for secret rotation; ``None`` disables it.
        reload_environ: where the names of the watched secret files come from.
        kept_signing_key: the session-signing key kept in the state directory
            (:func:`~exai.server.mcp_sessions.stored_key`, blocking file I/O: ``serve`` reads it
            in a thread), used unless ``EXAI_SESSION_SIGNING_KEY`` is set; ``None``: a key made
            for this run.

    Raises:
        ConfigError: a malformed token entry.
    """
    tool_services: dict[str, Any] = dict(services or {})
    d = Daemon(settings, registry, tool_services)
    tool_services.setdefault("daemon", DaemonView(status=d.status))
    others = [svc for name, svc in tool_services.items() if name != "daemon"]

    d.memory = OverloadManager(
        settings,
        d.budget,
        reserved_bytes=d.reserved_bytes,
        shrink_caches=d.shrink_caches,
        cached_bytes=lambda: d.calls.nbytes,
    )
    d.readiness = Readiness(
        d.admission,
        d.budget,
        memory_reason=lambda: d.memory.reason,
        checks=[
            check for svc in others if (check := getattr(svc, "not_ready_reason", None)) is not None
        ],
    )
    # with Redis, exactly-once and the per-identity/per-IP limits hold across every daemon of
    # the deployment (started and stopped by the daemon's run, around its calls)
    redis = getattr(tool_services.get("conversations"), "redis", None)
    if redis is not None:
        d.shared_calls = SharedCalls(
            redis,
            key_prefix=settings.redis_key_prefix,
            instance_id=d.instance_id,
            result_ttl_s=settings.idempotency_ttl_s,
        )
        d.shared_limits = SharedLimits(settings, redis, d.instance_id)
    d.runner = CallRunner(
        settings=settings,
        tools=registry,
        calls=d.calls,
        stats=d.stats,
        call_duration=d.metrics.call_duration,
        audit=d.audit,
        changes=d.changes,
        shared=tool_services.get("idempotency"),
    )
    d.runner.shared_calls = d.shared_calls
    shared = SessionShared(
        instance_id=d.instance_id,
        version=d.version,
        instructions=INSTRUCTIONS,
        tools=registry,
        tool_services=tool_services,
        readiness=d.readiness,
        slots=d.slots,
        budget=d.budget,
        calls=d.calls,
        runner=d.runner,
        changes=d.changes,
        stats=d.stats,
        slot_wait=d.metrics.slot_wait,
        audit=d.audit,
        shared_limits=d.shared_limits,
        pacer=RoundPacer(settings.round_budget_s),
    )
    d.pacer = shared.pacer
    d.sessions = SessionTable(shared, lambda: d.settings, d.changes)
    tokens = TokenTable(parse_tokens(settings.tokens))
    d.signer, d.signing_key_source = _signer(settings, kept_signing_key)
    d.revocations = Revocations(redis, key_prefix=settings.redis_key_prefix)
    origins = OriginPolicy.from_settings(settings)
    d.http_door = HttpDoor(
        shared,
        settings=lambda: d.settings,
        tokens=lambda: d.listener.tokens,
        sessions=d.sessions,
        signer=lambda: d.signer,
        revocations=d.revocations,
        origins=lambda: origins,
    )
    legacy = None
    if settings.legacy_protocol:
        legacy = LegacyDoor(
            shared,
            settings=lambda: d.settings,
            tokens=lambda: d.listener.tokens,
            sessions=d.sessions,
        )
    d.listener = Listener(
        settings,
        admission=d.admission,
        tokens=tokens,
        readiness=d.readiness,
        stats=d.stats,
        serve_session=d.sessions.serve,
        shared_limits=d.shared_limits,
        http_door=d.http_door,
        legacy_door=legacy,
        origins=origins,
    )

    if reload is not None:

        def apply(new: Settings, new_tokens: TokenTable) -> int:
            old_key = d.settings.session_signing_key
            d.settings = new
            d.listener.tokens = new_tokens
            if new.session_signing_key and (
                old_key is None or new.session_signing_key.reveal() != old_key.reveal()
            ):
                # a rotated key: sessions signed with the old one are unknown from now on
                d.signer, d.signing_key_source = _signer(new)
            for svc in others:
                update = getattr(svc, "update_settings", None)
                if update is not None:
                    update(new)
            return d.sessions.revoke(
                new_tokens, d.conn_nursery, REVOKED_CLOSE_CODE, "token revoked"
            )

        d.reloader = Reloader(settings, tokens, reload, apply=apply, environ=reload_environ)

    m = d.metrics
    m.add_collector(lambda: connection_metrics(d.admission, d.stats, lambda: len(d.sessions)))
    m.add_collector(
        lambda: call_metrics(
            d.stats,
            d.calls,
            max_inflight=settings.max_inflight,
            session_max_inflight=settings.session_max_inflight,
        )
    )
    m.add_collector(lambda: pressure_metrics(d.readiness, d.budget, d.calls))
    m.add_collector(lambda: pacing_metrics(shared.pacer))
    m.add_collector(lambda: loop_metrics(d.stall_detector) if d.stall_detector else ())
    m.add_collector(lambda: memory_metrics(d.memory))
    m.add_collector(lambda: service_metrics(tool_services))
    return d


@contextmanager
def paced(pacer: RoundPacer, services: Mapping[str, Any]) -> Iterator[None]:
    """The daemon's round pacer (:mod:`exai.server.pacing`) for the length of its run: the
    provider router's reads (``services["providers"]``) take turns of its ``reads`` lane —
    an answer's bytes are taken in on the same budget as a call's start, so a storm's answers
    arriving at once are taken in bites too — and on exit the router is given back unpaced
    (unless another daemon paced it since: a router its caller lent goes on without turns of
    a stopped daemon's pacer) and the pacer stops timing the run's rounds."""
    from exai.providers import ProviderRouter

    router = services.get("providers")
    if isinstance(router, ProviderRouter):
        router.pace_reads(pacer.reads)
    try:
        yield
    finally:
        if isinstance(router, ProviderRouter) and all(
            provider.client.pace is pacer.reads for provider in router.providers.values()
        ):
            router.pace_reads(None)
        pacer.close()
