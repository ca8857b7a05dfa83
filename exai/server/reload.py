"""Secret rotation without restart: SIGHUP or a changed secret file reloads keys and tokens.

What is reloaded: client tokens (``EXAI_TOKENS`` / ``EXAI_TOKENS_FILE``) and provider keys
(and the rest of each provider's settings). Listener settings (host, ports, limits) need a
restart; a reload that changes them logs that they were not applied.

What happens:
    * the new settings are read and validated first (in a worker thread: they read files); a
      failure keeps every old value and logs ``config.reload_failed`` with the reason;
    * new connections authenticate against the new tokens at once; established sessions stay
      up, except those whose token was removed, which are closed with WebSocket code 4001
      ("token revoked");
    * providers get the new keys for their next upstream request.

Which files are watched: every ``*_FILE`` variable of exai (``EXAI_*``, ``KIMI_*``, ``GLM_*``),
plus ``EXAI_ENV_FILE``/``./.env`` and ``EXAI_CONFIG``; checked every
``EXAI_SECRET_WATCH_INTERVAL_S`` by (inode, size, mtime).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import trio

from exai.config import Settings
from exai.errors import ConfigError
from exai.logs import log_event
from exai.server.auth import TokenTable, parse_tokens

if TYPE_CHECKING:
    from exai.server.app import Daemon

__all__ = ["REVOKED_CLOSE_CODE", "Reloader", "watched_files"]

REVOKED_CLOSE_CODE = 4001
_RESTART_ONLY = ("host", "port", "admin_host", "admin_port", "tls_cert", "tls_key")
_LIMITER = anyio.CapacityLimiter(1)


def watched_files(environ: Mapping[str, str]) -> list[Path]:
    """The secret and config files whose change triggers a reload."""
    paths = []
    for name, value in environ.items():
        if value and name.endswith("_FILE") and name.startswith(("EXAI_", "KIMI_", "GLM_")):
            paths.append(Path(value))
    for name in ("EXAI_CONFIG", "EXAI_ENV_FILE"):
        if environ.get(name):
            paths.append(Path(environ[name]))
    if "EXAI_ENV_FILE" not in environ:
        paths.append(Path(".env"))
    return paths


def _fingerprints(paths: list[Path]) -> dict[Path, tuple[int, int, int] | None]:
    out: dict[Path, tuple[int, int, int] | None] = {}
    for p in paths:
        try:
            st = p.stat()
            out[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            out[p] = None
    return out


class Reloader:
    """Reloads secrets into a running daemon.

    Args:
        daemon: the daemon to update.
        load: builds fresh settings (``Settings.from_env`` in ``exai serve``); runs in a thread.
        environ: where the watched file names come from (default ``os.environ``).
    """

    def __init__(
        self,
        daemon: Daemon,
        load: Callable[[], Settings],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.daemon = daemon
        self.load = load
        self.paths = watched_files(os.environ if environ is None else environ)
        # and every file the settings were read from, whichever source named it (a tokens
        # file named in .env or in the TOML file is rotated like one named in the environment)
        for _var, path in daemon.settings.source_files:
            if Path(path) not in self.paths:
                self.paths.append(Path(path))
        self.reloads = 0
        self.failures = 0
        self._lock = trio.Lock()

    async def reload(self, why: str) -> bool:
        """Reload now. Returns False (old values kept, reason logged) when validation fails."""
        async with self._lock:
            try:
                new = await anyio.to_thread.run_sync(self.load, limiter=_LIMITER)
                tokens = TokenTable(parse_tokens(new.tokens))
                from exai.server.app import check_bind

                check_bind(attrs.evolve(new, host=self.daemon.settings.host), tokens)
                if self.daemon.tokens.enabled and not tokens.enabled:
                    # an emptied tokens file (or one caught half-written) must not switch
                    # authentication off for a running daemon
                    raise ConfigError(
                        "the reloaded settings have no client tokens, which would turn "
                        "authentication off; keeping the current tokens (restart to run "
                        "without tokens)"
                    )
            except ConfigError as exc:
                self.failures += 1
                log_event("config.reload_failed", logging.ERROR, why=why, reason=str(exc))
                return False
            self._apply(new, tokens, why)
            return True

    def _apply(self, new: Settings, tokens: TokenTable, why: str) -> None:
        daemon = self.daemon
        old = daemon.settings
        ignored = [f for f in _RESTART_ONLY if getattr(new, f) != getattr(old, f)]
        daemon.settings = attrs.evolve(
            old, tokens=new.tokens, providers=new.providers, source_files=new.source_files
        )
        daemon.tokens = tokens
        for service in daemon.services.values():
            update = getattr(service, "update_settings", None)
            if update is not None and service is not daemon:
                update(daemon.settings)
        revoked = 0
        if tokens.enabled:
            valid = {i.digest for i in tokens.identities}
            for session in list(daemon.sessions):
                if session.identity.digest not in valid:
                    revoked += 1
                    if daemon.conn_nursery is not None:
                        daemon.conn_nursery.start_soon(
                            session.close, REVOKED_CLOSE_CODE, "token revoked"
                        )
        self.reloads += 1
        fields: dict[str, Any] = {
            "why": why,
            "tokens": len(tokens.identities),
            "sessions_revoked": revoked,
            "providers": [p.name for p in new.providers if p.configured],
        }
        if ignored:
            fields["not_applied_until_restart"] = ignored
        log_event("config.reloaded", **fields)

    async def watch(self) -> None:
        """Reload whenever a watched file changes (runs until cancelled)."""
        interval = self.daemon.settings.secret_watch_interval_s
        if interval <= 0 or not self.paths:
            return
        seen = await anyio.to_thread.run_sync(_fingerprints, self.paths, limiter=_LIMITER)
        while True:
            await trio.sleep(interval)
            now = await anyio.to_thread.run_sync(_fingerprints, self.paths, limiter=_LIMITER)
            if now != seen:
                changed = [str(p) for p in self.paths if now.get(p) != seen.get(p)]
                seen = now
                await self.reload("file changed: " + ", ".join(changed))
