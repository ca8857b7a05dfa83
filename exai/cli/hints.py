"""What the command line tells a person to do next, in commands that work as pasted.

:func:`exai_command` is how to run this very ``exai`` from a shell: ``exai`` when the ``exai``
on ``PATH`` is this one, else its path (``/home/me/exai/.venv/bin/exai`` after ``make serve``,
which does not put the virtualenv on ``PATH``); where no script runs it, the installation's own
command (:func:`exai.client.autostart.exai_words`, which the bridge's autostart runs).
:func:`port_in_use` explains a port that is taken at start-up: which address, whether an exai
daemon answers there (and its version), which process holds it when this account can see it,
and how to stop it or start beside it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exai.client.autostart import exai_script, exai_words
from exai.config import Settings
from exai.config.settings import connect_host

__all__ = ["exai_command", "exai_executable", "listening_pid", "port_in_use", "probe_exai"]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def exai_executable(argv0: str | None = None, executable: str | None = None) -> str | None:
    """The absolute path of this ``exai`` script: the running one (``argv0``, ``sys.argv[0]`` by
    default, when it is an ``exai`` script), else the one beside the interpreter
    (:func:`exai.client.autostart.exai_script`); None when run as ``python -m exai.cli``
    without a script beside the interpreter."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) == "exai":
        running = os.path.abspath(argv0)
        if os.path.isfile(running) and os.access(running, os.X_OK):
            return running
    return exai_script(executable)


def exai_command(argv0: str | None = None, executable: str | None = None) -> str:
    """The shell words that run this ``exai``: ``exai`` when ``PATH`` finds this one, else the
    absolute path of :func:`exai_executable`, else this installation's
    ``<python> -m exai.cli`` (:func:`exai.client.autostart.exai_words`), quoted for the shell."""
    script = exai_executable(argv0, executable)
    if script is None:
        return shlex.join(exai_words(executable))
    on_path = shutil.which("exai")
    return "exai" if on_path and _same_file(on_path, script) else shlex.quote(script)


# ---------------------------------------------------------------------------------------
# a port taken at start-up


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def probe_exai(host: str, port: int, settings: Settings, timeout_s: float = 3.0) -> dict[str, Any]:
    """Who answers MCP over WebSocket at ``host:port``: ``{"exai": version}`` for an exai
    daemon, ``{"refused": status}`` when it refused the handshake (a token is needed), or
    ``{"other": reason}``."""
    import anyio

    from exai.client import Client
    from exai.client.ws import HandshakeRejected

    url = f"ws://{_url_host(connect_host(host))}:{port}/mcp"

    async def probe() -> dict[str, Any]:
        with anyio.fail_after(timeout_s):
            async with Client(url, settings=settings, client_name="exai-serve-probe") as client:
                info = client.server_info.get("serverInfo") or {}
                return {"name": info.get("name"), "exai": info.get("version") or "unknown"}

    try:
        found = anyio.run(probe, backend="trio")
    except HandshakeRejected as exc:
        return {"refused": exc.status}
    except Exception as exc:  # anything else: not an exai daemon we can talk to
        return {"other": type(exc).__name__}
    if found.get("name") != "exai":
        return {"other": f"an MCP server named {found.get('name')!r}"}
    return found


def _admin_answers(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether ``GET /readyz`` at ``host:port`` answers as exai's admin listener does."""
    import json

    try:
        with socket.create_connection((connect_host(host), port), timeout=timeout_s) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: exai\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    _head, _, body = data.partition(b"\r\n\r\n")
    try:
        return "ready" in json.loads(body)
    except ValueError:
        return False


def _tcp_inodes(port: int) -> set[str]:
    """Socket inodes of TCP listeners on ``port`` (Linux ``/proc/net/tcp*``)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def listening_pid(port: int) -> tuple[int, str] | None:
    """``(pid, process name)`` of the process listening on TCP ``port``, when this account can
    see it (Linux; None elsewhere). Only the name (``/proc/PID/comm``), never the command line,
    which may hold a secret."""
    inodes = _tcp_inodes(port)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    name = (entry / "comm").read_text().strip()
                    return int(entry.name), name
        except OSError:
            continue
    return None


def _free_pair(host: str, admin_host: str, start: int) -> tuple[int, int] | None:
    """Two neighbouring free ports from ``start`` on (MCP, admin), or None."""

    def free(h: str, p: int) -> bool:
        try:
            with socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET) as s:
                s.bind((h, p))
            return True
        except OSError:
            return False

    for port in range(start, min(start + 200, 65534), 10):
        if free(host, port) and free(admin_host, port + 1):
            return port, port + 1
    return None


def port_in_use(
    err: Any,
    settings: Settings,
    *,
    probe: Callable[[str, int, Settings], dict[str, Any]] = probe_exai,
) -> str:
    """The lines that explain a taken port (``err``: an :class:`exai.server.app.BindError`)."""
    exai = exai_command()
    where = f"{_url_host(err.host or '0.0.0.0')}:{err.port}"
    lines = [f"exai: cannot start: the {err.what} port {where} ({err.variable}) is already in use"]
    holder = listening_pid(err.port)
    pid_text = f"pid {holder[0]}, {holder[1]}" if holder else None
    if err.what == "MCP":
        found = probe(err.host, err.port, settings)
        if "exai" in found:
            lines.append(
                f"exai: an exai daemon answers there: exai {found['exai']}"
                + (f" ({pid_text})" if pid_text else "")
            )
            url = f"ws://{_url_host(connect_host(err.host))}:{err.port}/mcp"
            env = "" if settings.effective_url == url else f"EXAI_URL={url} "
            lines.append(f"exai: use it as it is: `{env}{exai} status`")
        elif "refused" in found:
            lines.append(
                f"exai: a daemon there refused the handshake (HTTP {found['refused']}): "
                "probably an exai daemon with client tokens (set EXAI_TOKEN to talk to it)"
                + (f"; {pid_text}" if pid_text else "")
            )
        else:
            lines.append(
                "exai: no exai daemon answers there: another program holds the port"
                + (f" ({pid_text})" if pid_text else "")
            )
    else:
        if _admin_answers(err.host, err.port):
            what = "exai: the admin listener of another exai daemon answers there"
        else:
            what = "exai: no exai admin listener answers there: another program holds the port"
        lines.append(what + (f" ({pid_text})" if pid_text else ""))
    stop = f"`kill {holder[0]}`" if holder else "Ctrl-C where it runs, or `kill` its process"
    lines.append(f"exai: stop it ({stop}) and start again, or start this one on other ports:")
    start = settings.port + 10 if settings.port >= 1024 else 8089
    pair = _free_pair(connect_host(settings.host), connect_host(settings.admin_host), start)
    mcp_port, admin_port = pair if pair else (settings.port + 10, settings.port + 11)
    lines.append(f"  EXAI_PORT={mcp_port} EXAI_ADMIN_PORT={admin_port} {exai} serve")
    return "\n".join(lines)
