"""``exai status``: the daemon's status, as a short summary for a person or the whole document.

The summary (on a terminal, or with ``--human``) is a dozen lines: version, readiness and
uptime, connections, calls in flight, each provider with its breaker state, the conversation
store and its spool. The whole JSON document of the ``status`` tool comes with ``--json``, and
by default when stdout is not a terminal (a pipe to ``jq``, a script), so scripts keep getting
what they parse.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from exai.config.secret import redact_url

__all__ = ["run", "summary"]


def _get(doc: Mapping[str, Any], *path: str) -> Any:
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(doc: Mapping[str, Any], url: str | None = None) -> str:
    """A dozen lines a person reads at a glance, from the ``status`` tool's document.

    The call that fetched ``doc`` is itself in flight; it is not counted.
    """
    d = _get(doc, "daemon") or {}
    lines = []
    state = "draining" if d.get("draining") else ("ready" if d.get("ready") else "not ready")
    # (the URL as given: EXAI_URL or --url may carry a password or a token in its query)
    head = f"exai {d.get('version', '?')}" + (f" at {redact_url(url)}" if url else "")
    lines.append(f"{head}: {state}, up {_duration(d.get('uptime_s'))}, auth {d.get('auth', '?')}")
    conns = d.get("connections") or {}
    lines.append(
        f"connections: {conns.get('open', '?')} open (limit {conns.get('max_connections', '?')}), "
        f"{conns.get('accepted_total', '?')} accepted since start"
    )
    inflight = d.get("inflight") or {}
    calls = inflight.get("calls")
    running = max(0, calls - 1) if isinstance(calls, int) else "?"
    lines.append(
        f"calls in flight: {running} (limit {inflight.get('max_inflight', '?')}; "
        "this status call not counted)"
    )
    if d.get("overloaded"):
        lines.append(f"overloaded: {d['overloaded']}")
    providers = _get(doc, "providers", "providers") or {}
    if providers:
        lines.append("providers:")
        width = max(len(name) for name in providers)
        for name, p in sorted(providers.items()):
            configured = "configured" if p.get("configured") else "not configured"
            breaker = _get(p, "breaker", "state") or "?"
            counters = p.get("counters") or {}
            in_flight = _get(p, "use", "in_flight")
            lines.append(
                f"  {name:<{width}}  {configured:<14}  breaker {breaker:<9}  "
                f"{_plural(counters.get('requests', 0), 'request')} ({counters.get('ok', 0)} ok, "
                f"{counters.get('failed', 0)} failed), {in_flight or 0} in flight"
            )
    else:
        lines.append("providers: none")
    store = _get(doc, "conversations", "primary") or {}
    if store:
        where = store.get("file") or store.get("kind", "?")
        health = "open" if store.get("open") else "closed"
        if store.get("corrupt"):
            health = "corrupt"
        lines.append(
            f"store: {store.get('kind', '?')} ({where}), {health}, "
            f"breaker {_get(store, 'breaker', 'state') or '?'}"
        )
    spool = _get(doc, "conversations", "spool")
    if isinstance(spool, Mapping):
        lines.append(
            f"spool: {_plural(spool.get('depth', 0), 'write')} waiting for the store "
            f"({_bytes(spool.get('bytes'))} of {_bytes(spool.get('max_bytes'))}), "
            f"{spool.get('replayed', 0)} replayed"
        )
    redis = _get(doc, "conversations", "redis")
    if isinstance(redis, Mapping):
        lines.append(f"redis: breaker {_get(redis, 'breaker', 'state') or '?'}")
    from exai.cli.hints import exai_command

    lines.append(f"the whole document: {exai_command()} status --json")
    return "\n".join(lines)


def run(url: str | None = None, mode: str = "auto") -> int:
    """``exai status [--json | --human]``: ``mode`` ``json``, ``human``, or ``auto`` (the
    summary on a terminal, JSON otherwise). Errors are reported as ``exai status: …``."""
    from exai.cli.call import call_tool
    from exai.config import Settings

    result = call_tool("status", {}, url=url, prog="exai status", quiet=True)
    if isinstance(result, int):
        return result
    doc = result.get("structuredContent")
    if result.get("isError") or not isinstance(doc, dict):
        from exai.cli.call import text_of

        print(f"exai status: {text_of(result)}", file=sys.stderr)
        return 1
    human = mode == "human" or (mode == "auto" and sys.stdout.isatty())
    if not human:
        print(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    shown_url: str | None = url
    if shown_url is None:
        try:
            shown_url = Settings.from_env(client=True).effective_url
        except Exception:  # the call connected, so this does not fail; the URL is a nicety
            shown_url = None
    print(summary(doc, shown_url))
    return 0
