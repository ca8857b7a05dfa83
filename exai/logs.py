"""Structured logs: one line per event on stderr, JSON when stderr is not a terminal.

``EXAI_LOG_FORMAT`` (``auto``, ``json``, ``text``) chooses the format of the whole stream:
:func:`say` writes the lines meant for the person running exai (``exai: listening on …``, the
start-up hints, "cannot start: …") as plain text in text format and as JSON records (with the
same text under ``"message"``) in JSON format, so a pipe or a log collector never gets plain
lines between JSON ones.

Use :func:`log_event` with an event name and fields. Values pass through :func:`_safe`, which
renders :class:`exai.config.Secret` masked; nothing here ever calls ``Secret.reveal``.

Writing never happens on the caller's thread (the event loop, in the daemon), and neither does
building the :class:`logging.LogRecord`: once :func:`configure_logging` has run, an event goes on
the queue as a small tuple (level, name, fields, time) and the writer thread makes the record
(issue 18: ``logging``'s record, caller lookup and handler locks cost ≈ 15 µs per line on the
loop, two lines per call at ``info``). Before it, or when another handler was put on the
``exai`` logger (pytest's log capture), events take the standard ``logging`` path. A record
is put on a bounded queue (:data:`QUEUE_MAX` records, each field clipped to
:data:`FIELD_MAX_CHARS`) and a listener thread formats and writes it. When the queue is full
a record is dropped and counted (:func:`dropped_log_records`, shown by ``status``);
:func:`flush_logging` (also run at exit) writes what is queued.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, TextIO

from exai.config import Secret

__all__ = [
    "configure_logging",
    "dropped_log_records",
    "flush_logging",
    "log_event",
    "logger",
    "say",
    "use_json",
]

logger = logging.getLogger("exai")

#: records waiting for the writer thread at most; more are dropped and counted
QUEUE_MAX = 4_096
#: a string field longer than this is clipped (so the queue is bounded in bytes too)
FIELD_MAX_CHARS = 500


def _safe(v: Any) -> Any:
    if isinstance(v, Secret):
        return repr(v)
    if isinstance(v, str):
        return v if len(v) <= FIELD_MAX_CHARS else v[: FIELD_MAX_CHARS - 1] + "…"
    if isinstance(v, (int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_safe(x) for x in v]
    return str(v)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.getMessage()),
        }
        out.update(getattr(record, "fields", {}))
        exc_type = getattr(record, "exc_type_name", None)
        if exc_type is None and record.exc_info and record.exc_info[0] is not None:
            exc_type = record.exc_info[0].__name__
        if exc_type is not None:
            out["exc_type"] = exc_type
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        event = getattr(record, "event", record.getMessage())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return f"{stamp} {record.levelname.lower():7} {event} {extra}".rstrip()


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Puts records on a bounded queue without blocking; a full queue drops and counts."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Formatting happens in the writer thread; only make the record safe to hand over.
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_type_name = record.exc_info[0].__name__
        record.msg = record.getMessage()
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def enqueue_event(self, level: int, event: str, fields: dict[str, Any]) -> None:
        """The fast path of :func:`log_event`: the writer thread makes the record."""
        try:
            self.queue.put_nowait((level, event, fields, time.time()))
        except queue.Full:
            self.dropped += 1


class _Listener(logging.handlers.QueueListener):
    """The writer thread. Stopping waits (bounded) for room to queue its stop mark."""

    def __init__(self, q: queue.Queue[Any], handler: logging.Handler) -> None:
        super().__init__(q, handler, respect_handler_level=False)
        self._bounded: queue.Queue[Any] = q

    def prepare(self, record: Any) -> logging.LogRecord:
        if isinstance(record, tuple):  # an event from log_event's fast path
            level, event, fields, created = record
            made = logger.makeRecord(
                logger.name, level, "exai", 0, event, (), None,
                extra={"event": event, "fields": fields},
            )  # fmt: skip
            made.created = created
            made.msecs = (created - int(created)) * 1000
            return made
        prepared: logging.LogRecord = super().prepare(record)
        return prepared

    def enqueue_sentinel(self) -> None:
        try:
            self._bounded.put(getattr(self, "_sentinel", None), timeout=FLUSH_TIMEOUT_S)
        except queue.Full:
            pass  # the writer is stuck on a stream nobody reads: give up on it

    def stop(self) -> None:
        if self._thread is not None:
            self.enqueue_sentinel()
            self._thread.join(FLUSH_TIMEOUT_S)
            self._thread = None


#: how long flushing at exit may wait for a stuck stderr
FLUSH_TIMEOUT_S = 5.0

_handler: _DroppingQueueHandler | None = None
_listener: _Listener | None = None
#: the format chosen by :func:`configure_logging` (True: JSON); None until it ran
_json_chosen: bool | None = None


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):
        return False


def use_json(fmt: str | None = None, stream: Any = None) -> bool:
    """Whether stderr (or ``stream``) gets JSON: ``json``, or ``auto`` when it is not a
    terminal. Without ``fmt``: the choice :func:`configure_logging` made, else
    ``EXAI_LOG_FORMAT`` as set (before the settings are loaded, or when they fail to load)."""
    if fmt is None:
        if _json_chosen is not None and stream is None:
            return _json_chosen
        import os

        fmt = os.environ.get("EXAI_LOG_FORMAT", "auto").strip().lower()
    if fmt == "json":
        return True
    if fmt == "text":
        return False
    return not _isatty(sys.stderr if stream is None else stream)


def say(message: str, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Tell the person running exai something, whatever the log level, in the stream's format:
    ``message`` as it is in text format, a JSON record ``{"ts", "level", "event", "message",
    **fields}`` in JSON format. One write per line, on the caller's thread (the log writer
    thread shares stderr; a line written in two pieces could get a record between them)."""
    if use_json():
        out: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": logging.getLevelName(level).lower(),
            "event": event,
            "message": message,
        }
        out.update(_safe(fields))
        line = json.dumps(out, default=str, ensure_ascii=False)
    else:
        line = message
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def dropped_log_records() -> int:
    """Log records dropped because the writer thread could not keep up."""
    return _handler.dropped if _handler is not None else 0


def flush_logging() -> None:
    """Write every queued record and stop the writer thread (idempotent; run at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send exai's logs to ``stream`` (default stderr), one line per event, through the writer
    thread. Warnings of other libraries (the root logger) take the same path.
    """
    global _handler, _listener, _json_chosen
    flush_logging()
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not _isatty(out))
    if stream is None:
        _json_chosen = as_json
    handler = logging.StreamHandler(out)
    handler.setFormatter(_JsonFormatter() if as_json else _TextFormatter())
    q: queue.Queue[Any] = queue.Queue(QUEUE_MAX)
    dropped = _handler.dropped if _handler is not None else 0
    _handler = _DroppingQueueHandler(q)
    _handler.dropped = dropped
    _listener = _Listener(q, handler)
    _listener.start()
    logger.handlers[:] = [_handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _DroppingQueueHandler)]
    root.addHandler(_handler)
    if root.level == logging.NOTSET or root.level < logging.WARNING:
        root.setLevel(logging.WARNING)


atexit.register(flush_logging)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (secrets masked)."""
    if logger.isEnabledFor(level):
        handler = _handler
        if handler is not None and logger.handlers == [handler]:
            handler.enqueue_event(level, event, _safe(fields))
        else:
            logger.log(level, event, extra={"event": event, "fields": _safe(fields)})
