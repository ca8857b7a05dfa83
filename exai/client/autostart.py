"""``EXAI_AUTOSTART=1``: the bridge starts ``exai serve`` itself when nothing answers on its URL,
and how to start the daemon by hand when it does not.

:func:`ensure_daemon` is called by the bridge when a connection attempt fails. It acts only for
a loopback ``ws://``/``wss://`` URL with a port (a daemon on another machine cannot be started
from here), and only when nothing accepts a TCP connection on that address (something that
accepts but is slow or refuses the upgrade is left alone). Several bridges starting at once
(an editor opening many windows) make exactly one daemon: each takes an exclusive
``fcntl.flock`` on ``autostart.lock`` in the state directory, probes the address again under
the lock, and only the first finds it silent and starts the daemon; the others find it
answering. The one that starts it holds the lock until the daemon listens (at most
``EXAI_AUTOSTART_WAIT_S``), so the others wait instead of starting a second.

The daemon is this installation's ``exai serve`` (:func:`exai_words`: the ``exai`` script beside
the bridge's interpreter, else ``<this python> -m exai.cli``) with the bridge's own environment
and working directory (so it reads the same settings, ``.env`` and ``*_FILE`` paths included), plus
``EXAI_HOST``/``EXAI_PORT`` taken from the URL so it listens where the bridge looks. It is
detached: its own session (no terminal signal, no process-group kill of the editor reaches it),
stdin from ``/dev/null``, stdout and stderr appended to ``daemon.log`` in the state directory,
its pid written to ``daemon.pid`` there. It outlives the bridge; stop it with
``kill $(cat <state dir>/daemon.pid)``.

:func:`start_hint` is the command that starts the daemon the URL names, as it can be pasted
into a shell. :func:`exai_words` is the one place that says how to run this installation's
``exai``; the command line's pasted commands (:mod:`exai.cli.hints`) are built from it too.

Resource handling:
    The lock file descriptor is closed (releasing the lock) before :func:`ensure_daemon`
    returns or raises; the log file descriptor is closed once the child holds it. The
    :class:`subprocess.Popen` objects of started daemons are kept in :data:`STARTED` so they are
    never collected while running (and reaped by :meth:`~subprocess.Popen.poll`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import anyio
import anyio.to_thread

from exai.config import Settings, is_loopback
from exai.config.dirs import make_dirs

__all__ = [
    "LOCK_NAME",
    "LOG_NAME",
    "PID_NAME",
    "STARTED",
    "AutostartFailed",
    "ensure_daemon",
    "exai_words",
    "loopback_target",
    "start_hint",
]

LOCK_NAME = "autostart.lock"
LOG_NAME = "daemon.log"
PID_NAME = "daemon.pid"
#: bound on one TCP probe of the daemon's address
PROBE_S = 1.0
#: how often the lock and the starting daemon are looked at
POLL_S = 0.1
#: the last bytes of the log quoted when a started daemon exits at once
LOG_TAIL_BYTES = 600

#: the daemons this process started (see *Resource handling* in the module docstring)
STARTED: list[subprocess.Popen[bytes]] = []


class AutostartFailed(Exception):
    """The daemon could not be started; the message says why and where its log is."""


def loopback_target(url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``ws://``/``wss://`` URL on this machine with a port, else
    ``None`` (another machine, a missing or zero port, not a WebSocket URL)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme not in ("ws", "wss") or not host or not port or not is_loopback(host):
        return None
    return host, port


def exai_script(executable: str | None = None) -> str | None:
    """The absolute path of the ``exai`` script installed beside the interpreter ``executable``
    (``sys.executable`` by default; a virtualenv's ``bin/exai``), or ``None`` when there is no
    such executable file (or Python cannot tell its interpreter: an empty ``executable``)."""
    executable = sys.executable if executable is None else executable
    if not executable:
        return None
    # (the virtualenv's bin, not the interpreter its python symlink points to)
    script = os.path.join(os.path.dirname(os.path.abspath(executable)), "exai")
    return script if os.path.isfile(script) and os.access(script, os.X_OK) else None


def exai_words(executable: str | None = None) -> list[str]:
    """The command words that run this installation's ``exai`` (unquoted, absolute paths):
    ``[<script>]`` (:func:`exai_script`), else ``[<executable>, "-m", "exai.cli"]``
    (``python3`` when ``executable``, ``sys.executable`` by default, is empty)."""
    executable = sys.executable if executable is None else executable
    script = exai_script(executable)
    if script is not None:
        return [script]
    return [os.path.abspath(executable) if executable else "python3", "-m", "exai.cli"]


def start_hint(url: str) -> str | None:
    """The shell command that starts the daemon ``url`` names on this machine (settings the
    URL implies as variables in front), or ``None`` when the URL is not on this machine."""
    target = loopback_target(url)
    if target is None:
        return None
    host, port = target
    env = []
    if host not in ("127.0.0.1", "localhost"):
        env.append(f"EXAI_HOST={shlex.quote(host)}")
    if port != 8079:
        env.append(f"EXAI_PORT={port}")
    if url.startswith("wss://"):
        env.append("EXAI_TLS_CERT=<cert.pem> EXAI_TLS_KEY=<key.pem>")
    return " ".join([*env, *(shlex.quote(a) for a in exai_words()), "serve"])


async def _answers(host: str, port: int) -> bool:
    """Whether anything accepts a TCP connection on ``host:port``."""
    try:
        with anyio.fail_after(PROBE_S):
            stream = await anyio.connect_tcp(host, port)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


def _open_lock(state: Path) -> int:
    make_dirs(state)
    return os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _spawn(state: Path, host: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["EXAI_HOST"] = host
    env["EXAI_PORT"] = str(port)
    log_path = state / LOG_NAME
    # the daemon's log and pid file private as the directory (0600 whatever the umask)
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"--- exai bridge (pid {os.getpid()}) starts exai serve at {stamp}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [*exai_words(), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    STARTED.append(proc)
    fd = os.open(state / PID_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as pid_file:
        pid_file.write(f"{proc.pid}\n")
    return proc


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            tail = fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return tail.splitlines()[-1] if tail else ""


async def ensure_daemon(settings: Settings, url: str) -> str:
    """Start the daemon ``url`` names unless something answers there (see the module
    docstring). Bounded by about twice ``settings.autostart_wait_s``.

    Returns:
        ``"started"`` when this call started a daemon that now listens, ``"appeared"`` when one
        began to answer while this call waited for the lock (another bridge started it),
        ``"answering"`` when something answered already (the connection failed for another
        reason: nothing is started).

    Raises:
        AutostartFailed: the URL is not on this machine, the lock could not be had, or the
            daemon exited or did not listen in time (the message names its log).
    """
    target = loopback_target(url)
    if target is None:
        raise AutostartFailed(
            "EXAI_AUTOSTART starts a daemon only for a ws:// or wss:// URL on this machine "
            "with a port"
        )
    host, port = target
    if await _answers(host, port):
        return "answering"
    state = settings.state_path
    try:
        fd = await anyio.to_thread.run_sync(_open_lock, state)
    except OSError as exc:
        raise AutostartFailed(f"cannot use the state directory {state}: {exc}") from exc
    try:
        with anyio.move_on_after(settings.autostart_wait_s + PROBE_S) as waited:
            # polled: a blocking flock in a thread could not be abandoned safely (it might
            # take the lock after we gave up, on a descriptor closed and reused meanwhile)
            while not _try_lock(fd):  # noqa: ASYNC110
                await anyio.sleep(POLL_S)
        if waited.cancelled_caught:
            raise AutostartFailed(
                f"another exai bridge has been starting the daemon for over "
                f"{settings.autostart_wait_s:g}s (lock {state / LOCK_NAME}); its log: "
                f"{state / LOG_NAME}"
            )
        if await _answers(host, port):
            return "appeared"
        try:
            proc = await anyio.to_thread.run_sync(_spawn, state, host, port)
        except OSError as exc:
            raise AutostartFailed(f"cannot start exai serve: {exc}") from exc
        log_path = state / LOG_NAME
        with anyio.move_on_after(settings.autostart_wait_s):
            while True:
                code = proc.poll()
                if code is not None:
                    if await _answers(host, port):
                        # it lost the address to a daemon started meanwhile by other means
                        # (another state directory, a user's exai serve): that one serves us
                        return "appeared"
                    tail = await anyio.to_thread.run_sync(_log_tail, log_path)
                    raise AutostartFailed(
                        f"the exai daemon the bridge started exited with status {code} before "
                        f"listening on {host}:{port}; its log: {log_path}"
                        + (f" (last line: {tail})" if tail else "")
                    )
                if await _answers(host, port):
                    return "started"
                await anyio.sleep(POLL_S)
        raise AutostartFailed(
            f"the exai daemon the bridge started (pid {proc.pid}) does not listen on "
            f"{host}:{port} after {settings.autostart_wait_s:g}s (EXAI_AUTOSTART_WAIT_S); "
            f"its log: {log_path}"
        )
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
