"""Secret rotation without restart: SIGHUP or a changed secret file reloads keys and tokens.

What is reloaded: client tokens (``EXAI_TOKENS`` / ``EXAI_TOKENS_FILE``), the session-signing
key (``EXAI_SESSION_SIGNING_KEY_FILE``: sessions signed with the old key become unknown) and
provider keys (and the rest of each provider's settings). Every other setting of the daemon
(host, ports, limits, timeouts, stores, …) needs a restart; a reload that changes one logs its
name under ``not_applied_until_restart`` (values are not logged: some are secrets). The
client side's settings (``EXAI_URL``, ``EXAI_TOKEN``, ``EXAI_TLS_CA``, ``EXAI_CONNECT_WAIT_S``,
``EXAI_AUTOSTART*``: the bridge's and ``exai call``'s) are never named: the daemon does not use
them, so there is nothing to restart for.

What happens:
    * the new settings are read and validated first (in a worker thread: they read files); a
      failure keeps every old value and logs ``config.reload_failed`` with the reason;
    * new connections authenticate against the new tokens at once; established sessions stay
      up, except those whose token was removed, which are closed with WebSocket code 4001
      ("token revoked");
    * providers get the new keys for their next upstream request.

A session-signing key taken out of the files (``EXAI_SESSION_SIGNING_KEY`` and its ``_FILE``
both gone) is not applied: the daemon keeps signing with the key it has, and the reload names
``session_signing_key`` under ``not_applied_until_restart`` (at the restart the daemon takes the
key kept in the state directory, or one per run, and every session it signed ends).

Which files are watched: every ``*_FILE`` variable of exai (``EXAI_*``, ``KIMI_*``, ``GLM_*``),
plus ``EXAI_ENV_FILE``/``./.env`` and ``EXAI_CONFIG``, and every file the settings were read
from (at start, and as of each reload: a ``*_FILE`` newly named in the ``.env`` or TOML file);
checked every ``EXAI_SECRET_WATCH_INTERVAL_S`` by (inode, size, mtime, mode); a change is read
once the files have stayed the same for one interval (a file still being written is not read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs
import trio

from exai.config import Settings
from exai.errors import ConfigError
from exai.logs import log_event
from exai.server.auth import TokenTable, check_bind, parse_tokens

__all__ = ["REVOKED_CLOSE_CODE", "Reloader", "watched_files"]

REVOKED_CLOSE_CODE = 4001
#: the settings a reload applies; every other one waits for a restart
_APPLIED = frozenset({"tokens", "providers", "source_files", "session_signing_key"})
_LIMITER = anyio.CapacityLimiter(1)

#: looks in a row that found the watched files changing after which the watcher reads them
#: anyway: one file that never stops changing (a credential refresher rewriting a key file every
#: second) must not hold off, for ever, the reload of another — a client token removed from the
#: tokens file still authenticated and its sessions stayed open while it changed
SETTLE_MAX_LOOKS = 5


def watched_files(environ: Mapping[str, str]) -> list[Path]:
    """The secret and config files whose change triggers a reload, each once (``EXAI_ENV_FILE``
    is a ``*_FILE`` variable too: it was watched twice, and one change of the file was logged
    as ``why: "file changed: .env, .env"``)."""
    paths: list[Path] = []
    for name, value in environ.items():
        if value and name.endswith("_FILE") and name.startswith(("EXAI_", "KIMI_", "GLM_")):
            paths.append(Path(value))
    for name in ("EXAI_CONFIG", "EXAI_ENV_FILE"):
        if environ.get(name):
            paths.append(Path(environ[name]))
    if "EXAI_ENV_FILE" not in environ:
        paths.append(Path(".env"))
    return list(dict.fromkeys(paths))


def _fingerprints(paths: list[Path]) -> dict[Path, tuple[int, int, int, int] | None]:
    """What a change of each file is seen by: its inode, size, mtime — and its mode, so a
    secret file made readable by others (``chmod 644``, which leaves the rest alone) is
    reloaded and warned about (``config.secret_file_exposed``), not left in silence."""
    out: dict[Path, tuple[int, int, int, int] | None] = {}
    for p in paths:
        try:
            st = p.stat()
            out[p] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        except OSError:
            out[p] = None
    return out


class Reloader:
    """Reloads secrets into a running daemon.

    Args:
        settings: the settings the daemon started with (what a reload is compared with).
        tokens: the client tokens the daemon started with.
        load: builds fresh settings (``Settings.from_env`` in ``exai serve``); runs in a thread.
        apply: ``apply(settings, tokens) -> sessions revoked``: hands validated settings (the
            old ones with the new tokens, providers and source files) and their token table
            to the daemon, which closes the sessions whose token was removed.
        environ: where the watched file names come from (default ``os.environ``).

    Attributes:
        settings: the settings in force (after the last successful reload).
        tokens: the token table in force.
    """

    def __init__(
        self,
        settings: Settings,
        tokens: TokenTable,
        load: Callable[[], Settings],
        *,
        apply: Callable[[Settings, TokenTable], int],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.load = load
        #: the restart-only settings whose value in the files differs from the one the daemon
        #: started with, as of the last reload (``status``: ``config``; ``exai config`` says so)
        self.not_applied: list[str] = []
        self.apply = apply
        self.paths = watched_files(os.environ if environ is None else environ)
        # and every file the settings were read from, whichever source named it (a tokens
        # file named in .env or in the TOML file is rotated like one named in the environment)
        for _var, path in settings.source_files:
            if Path(path) not in self.paths:
                self.paths.append(Path(path))
        self.reloads = 0
        self.failures = 0
        self._lock = trio.Lock()

    async def reload(self, why: str) -> bool:
        """Reload now. Returns False (old values kept, reason logged) when validation or
        loading fails, whatever the failure."""
        async with self._lock:
            try:
                # (the tokens are parsed and hashed in the thread too: work that grows with
                # the file, off the loop)
                new, tokens = await anyio.to_thread.run_sync(self._read, limiter=_LIMITER)
                check_bind(attrs.evolve(new, host=self.settings.host), tokens)
                if self.tokens.enabled and not tokens.enabled:
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
            except Exception as exc:
                # whatever else loading the files raised: a reload never takes the daemon
                # down (it ran with settings that were valid; they stay)
                self.failures += 1
                log_event(
                    "config.reload_failed",
                    logging.ERROR,
                    why=why,
                    reason=f"the settings could not be loaded ({type(exc).__name__})",
                )
                return False
            self._apply(new, tokens, why)
            return True

    def _read(self) -> tuple[Settings, TokenTable]:
        """The settings as the files give them now, and their tokens' table (in a thread)."""
        new = self.load()
        return new, TokenTable(parse_tokens(new.tokens))

    def _apply(self, new: Settings, tokens: TokenTable, why: str) -> None:
        old = self.settings
        ignored = [
            f.name
            for f in attrs.fields(Settings)
            if f.name not in _APPLIED
            and not f.metadata.get("client")  # (the bridge's and clients': never the daemon's)
            and getattr(new, f.name) != getattr(old, f.name)
        ]
        # a session-signing key taken out of the files is not applied: the daemon goes on
        # signing with the key it has (dropping it would end every session at once, as a
        # restart will: it then uses the key kept in the state directory, or one per run), so
        # it is named with the settings that wait for a restart
        key = new.session_signing_key
        if key is None and old.session_signing_key is not None:
            key = old.session_signing_key
            ignored.append("session_signing_key")
        self.settings = attrs.evolve(
            old,
            tokens=new.tokens,
            providers=new.providers,
            source_files=new.source_files,
            session_signing_key=key,
        )
        # and the files these settings were read from are watched from now on (a key moved
        # from the .env into EXAI_SESSION_SIGNING_KEY_FILE, a tokens file newly named in the
        # TOML file): their next rotation reloads without a SIGHUP
        for _var, path in new.source_files:
            if Path(path) not in self.paths:
                self.paths.append(Path(path))
        self.tokens = tokens
        self.not_applied = ignored
        revoked = self.apply(self.settings, tokens)
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

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload whenever a watched file changes (runs until cancelled).

        Started with ``nursery.start``: it reports started once it has taken its first look at
        the files, so a daemon that says it is ready reloads any change made from then on (a
        first look taken later, by a worker thread a busy machine runs late, could see the
        changed file as its starting point and never reload it)."""
        interval = self.settings.secret_watch_interval_s
        if interval <= 0 or not self.paths:
            task_status.started()
            return
        seen = await anyio.to_thread.run_sync(_fingerprints, list(self.paths), limiter=_LIMITER)
        last = seen
        #: looks in a row that found the files changing (SETTLE_MAX_LOOKS)
        changing = 0
        task_status.started()
        while True:
            await trio.sleep(interval)
            now = await anyio.to_thread.run_sync(_fingerprints, list(self.paths), limiter=_LIMITER)
            if now != last and changing < SETTLE_MAX_LOOKS:
                # still being written (or just written): a change is read once the files
                # stayed the same for a whole interval. A tokens file caught half-written —
                # an editor saving in place, a large file written in parts — was applied as
                # it stood, and the sessions of the tokens not written yet were revoked.
                # Files that keep changing are read all the same after SETTLE_MAX_LOOKS looks.
                last = now
                changing += 1
                continue
            last = now
            changing = 0
            # (a file first watched since the last look counts as changed: it may have changed
            # since the reload that added it read it, so it is read once more)
            changed = [str(p) for p in now if now[p] != seen.get(p, ())]
            seen = now
            if changed:
                await self.reload("file changed: " + ", ".join(changed))
