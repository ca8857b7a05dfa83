"""Structured logs: one line per event on stderr, JSON when stderr is not a terminal.

Use :func:`log_event` with an event name and fields. Values pass through :func:`_safe`, which
renders :class:`exai.config.Secret` masked; nothing here ever calls ``Secret.reveal``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from exai.config import Secret

__all__ = ["configure_logging", "log_event", "logger"]

logger = logging.getLogger("exai")


def _safe(v: Any) -> Any:
    if isinstance(v, Secret):
        return repr(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
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
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        event = getattr(record, "event", record.getMessage())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extra = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return f"{stamp} {record.levelname.lower():7} {event} {extra}".rstrip()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Send exai's logs to stderr, one line per event."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if use_json else _TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields (secrets masked)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"event": event, "fields": _safe(fields)})
