"""The audit log: one JSON line per tool call, written without ever stalling a call.

Each line holds ``ts`` (ISO-8601 UTC), ``client`` (the token's *name*, never the token),
``peer`` (address), ``tool``, ``provider``, ``model``, ``key_fp`` (the provider key's
:meth:`~exai.config.Secret.fingerprint`, never the key), ``outcome``, ``duration_s``,
``session`` and ``request_id``::

    async with AuditLog.from_settings(settings) as audit:
        ...
        audit.record(tool="chat", client="alice", peer="10.0.0.7", outcome="ok", ...)

Resource handling:
    :class:`AuditLog` is an async context manager owning one writer task. :meth:`AuditLog.record`
    is synchronous and puts the record on a bounded in-memory channel (``capacity`` records,
    10,000 by default); the writer takes everything queued, turns it into lines and appends them
    to the file in one ``anyio.to_thread.run_sync`` call under the log's own
    ``CapacityLimiter(1)``, so the event loop never waits on the disk and lines are never
    interleaved. Leaving the block writes what is still queued, within :data:`DRAIN_S`.

Error handling:
    Auditing never stalls or fails a call. When the channel is full (the disk is slower than the
    calls), the record is dropped and counted (:meth:`AuditLog.statistics`), and an
    ``audit.dropped`` warning is logged at most once per second. A batch that cannot be written
    (disk full, permission denied) is counted in ``write_errors`` and logged
    (``audit.write_failed``, at most once per second); the next batch tries again.

Rotation:
    The file is opened in append mode for every batch and closed after it, so ``logrotate``'s
    default *move and create* works without signals: lines written after the move go to the
    new file at ``path``. No ``copytruncate`` needed. The file is created with mode 0600.
"""

from __future__ import annotations

import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from exai.config import Secret, Settings
from exai.config.dirs import make_dirs
from exai.logs import log_event

__all__ = ["DEFAULT_CAPACITY", "DRAIN_S", "FIELDS", "AuditLog", "AuditStatistics"]

#: records queued before :meth:`AuditLog.record` starts dropping
DEFAULT_CAPACITY = 10_000
#: most records written in one thread call
BATCH_MAX = 1_000
#: how long leaving the ``async with`` block may spend writing what is still queued
DRAIN_S = 5.0
#: least time between two warnings of the same kind
WARN_INTERVAL_S = 1.0

#: the standard fields of every line, in order
FIELDS = (
    "ts",
    "client",
    "peer",
    "tool",
    "provider",
    "model",
    "key_fp",
    "outcome",
    "duration_s",
    "session",
    "request_id",
)


@attrs.frozen(kw_only=True)
class AuditStatistics:
    """A snapshot of an :class:`AuditLog`.

    Attributes:
        enabled: whether records are written anywhere.
        recorded: records accepted onto the channel.
        written: records appended to the file.
        dropped: records refused because the channel was full (or the log closed).
        write_errors: records lost because their batch could not be written.
        queued: records waiting to be written.
    """

    enabled: bool
    recorded: int
    written: int
    dropped: int
    write_errors: int
    queued: int


def _clean(value: Any) -> Any:
    """A JSON-safe value; a :class:`Secret` becomes its masked repr, never its value."""
    if isinstance(value, Secret):
        return repr(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


def _now_iso() -> str:
    # The wall clock, on purpose: an audit line is read by people and matched against other
    # systems' logs. Nothing in exai computes with this value.
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _append(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


class AuditLog:
    """Append-only JSON-lines audit log of tool calls (see the module docstring).

    Args:
        path: the file; its directory is created on entry. ``None`` makes a disabled log
            (:meth:`disabled`) whose :meth:`record` does nothing.
        capacity: records that may wait for the writer before new ones are dropped.
        limiter: the limiter the file writes run under (default: a private
            ``CapacityLimiter(1)``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        capacity: int = DEFAULT_CAPACITY,
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.path = Path(path) if path is not None else None
        self.capacity = capacity
        self._limiter = limiter
        # created on first use, so a log that is built but never used holds no open stream
        self._send: MemoryObjectSendStream[dict[str, Any]] | None = None
        self._receive: MemoryObjectReceiveStream[dict[str, Any]] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._recorded = 0
        self._written = 0
        self._dropped = 0
        self._write_errors = 0
        self._last_warned: dict[str, float] = {}
        self._progress = anyio.Event()

    @classmethod
    def disabled(cls) -> AuditLog:
        """A log that records nothing (``EXAI_AUDIT_LOG`` empty). Safe to enter and call."""
        return cls(None, capacity=1)

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLog:
        """The log at ``settings.audit_log``, or :meth:`disabled` when it is empty."""
        return cls(settings.audit_log) if settings.audit_log else cls.disabled()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def __repr__(self) -> str:
        s = self.statistics()
        where = str(self.path) if self.path else "disabled"
        return (
            f"<AuditLog {where} queued={s.queued}/{self.capacity} written={s.written} "
            f"dropped={s.dropped}>"
        )

    def statistics(self) -> AuditStatistics:
        """Counters since creation (see :class:`AuditStatistics`)."""
        return AuditStatistics(
            enabled=self.enabled,
            recorded=self._recorded,
            written=self._written,
            dropped=self._dropped,
            write_errors=self._write_errors,
            queued=self._receive.statistics().current_buffer_used if self._receive else 0,
        )

    # ------------------------------------------------------------------ recording
    def record(
        self,
        *,
        tool: str,
        outcome: str,
        client: str | None = None,
        peer: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        key_fp: str | None = None,
        duration_s: float | None = None,
        session: str | None = None,
        request_id: Any = None,
        **extra: Any,
    ) -> None:
        """Queue one audit line. Never blocks and never raises for a full queue.

        ``client`` is the identity's name and ``key_fp`` a key's fingerprint: pass neither a
        token nor a key. A :class:`~exai.config.Secret` passed anywhere is written masked.
        ``extra`` fields are added after the standard ones.
        """
        if self.path is None:
            return
        line: dict[str, Any] = {
            "ts": _now_iso(),
            "client": client,
            "peer": peer,
            "tool": tool,
            "provider": provider,
            "model": model,
            "key_fp": key_fp,
            "outcome": outcome,
            "duration_s": round(duration_s, 4) if isinstance(duration_s, float) else duration_s,
            "session": session,
            "request_id": request_id,
        }
        for key, value in extra.items():
            if key not in line:
                line[key] = value
        clean = {k: _clean(v) for k, v in line.items()}
        send, _ = self._channel()
        try:
            send.send_nowait(clean)
        except anyio.WouldBlock:
            self._dropped += 1
            self._warn(
                "audit.dropped",
                dropped=self._dropped,
                capacity=self.capacity,
                hint="the audit log's disk is slower than the calls; records are being dropped",
            )
            return
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._dropped += 1
            return
        self._recorded += 1

    def _channel(
        self,
    ) -> tuple[MemoryObjectSendStream[dict[str, Any]], MemoryObjectReceiveStream[dict[str, Any]]]:
        if self._send is None or self._receive is None:
            self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](
                self.capacity
            )
        return self._send, self._receive

    def _warn(self, event: str, **fields: Any) -> None:
        try:
            now = anyio.current_time()
        except RuntimeError:  # called outside an event loop (e.g. a sync test)
            now = math.inf
        last = self._last_warned.get(event)
        if last is not None and now != math.inf and now - last < WARN_INTERVAL_S:
            return
        self._last_warned[event] = now
        log_event(event, logging.WARNING, path=str(self.path), **fields)

    async def flush(self) -> None:
        """Wait until every record accepted so far is written (or failed). The caller bounds
        the wait (``fail_after``); the writer must be running (inside ``async with``)."""
        target = self._recorded
        while self._written + self._write_errors < target:
            await self._progress.wait()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> AuditLog:
        if self.path is None:
            return self
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        # once, at start: anyio's default thread limiter (the write limiter may be saturated)
        await anyio.to_thread.run_sync(_make_dir, self.path.parent)
        _, receive = self._channel()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._writer, receive)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._send is not None:
            self._send.close()
        tg, self._tg = self._tg, None
        if tg is None:
            return None
        # The writer ends once the closed channel is empty; bound the drain so a stuck disk
        # cannot hold up shutdown.
        tg.cancel_scope.deadline = anyio.current_time() + DRAIN_S
        return await tg.__aexit__(exc_type, exc, tb)

    async def _writer(self, receive: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
        assert self.path is not None
        path = str(self.path)
        async with receive:
            async for first in receive:
                batch = [first]
                while len(batch) < BATCH_MAX:
                    try:
                        batch.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                data = "".join(
                    json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in batch
                ).encode("utf-8")
                try:
                    await anyio.to_thread.run_sync(_append, path, data, limiter=self._limiter)
                except OSError as exc:
                    self._write_errors += len(batch)
                    self._warn("audit.write_failed", error=exc.strerror or type(exc).__name__)
                else:
                    self._written += len(batch)
                self._progress.set()
                self._progress = anyio.Event()


def _make_dir(directory: Path) -> None:
    make_dirs(directory)  # (0700 whatever the umask; an existing directory as it is)
