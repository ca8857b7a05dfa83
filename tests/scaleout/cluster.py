"""N ``exai serve`` processes behind a real HAProxy, sharing Redis and PostgreSQL.

The reusable part of the scale-out tests (and of the ``scale_out`` benchmark)::

    async with open_cluster(tmp_path, mock_url=mock.base_url, storage_url=..., redis_prefix=...)
            as cluster:
        cluster.url                      # ws://127.0.0.1:<haproxy>/mcp — what clients use
        cluster.daemons[0].kill()        # SIGKILL; .stop() is SIGTERM (drain) and waits
        await cluster.daemons[0].start() # again, on the same ports
        await cluster.wait_servers({"exai1": "UP", ...})

* **HAProxy** runs the tested configuration ``deploy/haproxy.cfg`` (the one docs/deploy.md
  shows) with the environment variables it names: its own instance on free ports, its runtime
  API socket in the test's directory (:meth:`HAProxy.show_servers`, :meth:`HAProxy.command`).
  :func:`find_haproxy` finds the binary (``PATH``, ``/usr/sbin``); the fixtures skip with the
  reason when it is missing (``make services`` installs the Debian package where it can).
* **The daemons** are real ``exai serve`` processes, each on fixed loopback ports (so one can be
  restarted where HAProxy expects it), with its own state directory and the same
  ``EXAI_STORAGE_URL``, ``EXAI_REDIS_URL`` and ``EXAI_REDIS_KEY_PREFIX``. Their provider is
  ``mock`` at ``mock_url``.

The HTTP door (Streamable HTTP at ``POST /mcp``) is on the same listener and port as the
WebSocket door: ``cluster.http_url`` is where an HTTP client posts, and HAProxy's HTTP mode
balances those requests one by one. The daemons share one ``EXAI_SESSION_SIGNING_KEY`` (made
per cluster), so any of them accepts an initialize-era session id another one minted.

Processes are started and stopped from worker threads (their pipes are read by threads), so the
test's trio loop never blocks on them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

REPO = Path(__file__).resolve().parents[2]
#: the tested HAProxy configuration (shown in docs/deploy.md)
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
#: how many servers the configuration names
SERVERS = 3
#: only turns a hang into a failure
START_WITHIN_S = 60.0

_LISTEN = re.compile(r'exai: listening on (wss?://[^\s"]+)')


def find_haproxy() -> str | None:
    """The ``haproxy`` binary, or None."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this one without any exai/provider setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "KIMI_", "GLM_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


@attrs.define(eq=False)
class DaemonProcess:
    """One ``exai serve`` on fixed ports; :meth:`start` again after :meth:`kill` or :meth:`stop`."""

    name: str
    port: int
    admin_port: int
    env: dict[str, str]
    argv: list[str]
    proc: subprocess.Popen[str] | None = None
    #: stderr of every run of this daemon, in order
    lines: list[str] = attrs.Factory(list)
    runs: int = 0
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The daemon's own WebSocket URL (bypassing the balancer)."""
        return f"ws://127.0.0.1:{self.port}/mcp"

    @property
    def http_url(self) -> str:
        """The daemon's own Streamable HTTP URL (bypassing the balancer)."""
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        """Start it and wait until it listens (it is ready then: /readyz answers 200)."""
        await trio.to_thread.run_sync(self._start_blocking)

    def _start_blocking(self) -> None:
        assert not self.alive(), f"{self.name} is running"
        self.runs += 1
        self.lines.append(f"--- {self.name} run {self.runs}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "exai.cli", "serve", *self.argv],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        self.proc = proc
        listening = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if _LISTEN.search(line):
                    listening.set()
            listening.set()

        self._reader = threading.Thread(target=read, daemon=True, name=f"{self.name}-stderr")
        self._reader.start()
        if not listening.wait(START_WITHIN_S) or proc.poll() is not None:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines[-40:]))

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye (what a crash or the OOM killer does)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: stop accepting, drain, exit (what a rolling restart sends)."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, bound_s: float = START_WITHIN_S) -> int:
        """Wait for the process to exit; its exit code."""
        assert self.proc is not None
        code = await trio.to_thread.run_sync(self.proc.wait, bound_s)
        if self._reader is not None:
            await trio.to_thread.run_sync(self._reader.join, 5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return int(code)

    async def stop(self, bound_s: float = START_WITHIN_S) -> int:
        """SIGTERM and wait for the exit; its exit code."""
        self.terminate()
        return await self.wait(bound_s)

    async def get(self, path: str) -> httpx.Response:
        """GET ``path`` on its admin listener."""
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.get(self.admin_url + path)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of its ``/metrics`` (0 when absent)."""
        text = (await self.get("/metrics")).text
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m is None or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
        return 0.0

    async def status(self) -> dict[str, Any]:
        """The ``status`` tool's document, asked of this daemon directly."""
        from tests.helpers import Rpc, ws

        with trio.fail_after(30):
            async with ws(self.url, token=self.env.get("EXAI_STATUS_TOKEN")) as conn:
                reply = await Rpc(conn).call("status")
        doc: dict[str, Any] = reply["result"]["structuredContent"]
        return doc

    async def redis_round_trips(self) -> int:
        """Redis commands this daemon's client has sent since it started (its own counter)."""
        doc = await self.status()
        redis = (doc.get("conversations") or {}).get("redis") or {}
        return int((redis.get("pool") or {}).get("calls") or 0)

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Its JSON log lines whose ``event`` is ``event`` (every run)."""
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == event:
                    out.append(rec)
        return out


@attrs.define(eq=False)
class HAProxy:
    """Our own ``haproxy`` process running ``deploy/haproxy.cfg``."""

    binary: str
    port: int
    socket_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    async def start(self) -> None:
        await trio.to_thread.run_sync(self._start_blocking)

    def _start_blocking(self) -> None:
        check = subprocess.run(
            [self.binary, "-c", "-q", "-f", str(HAPROXY_CFG)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {HAPROXY_CFG}:\n{check.stdout}{check.stderr}")
        assert self.log is not None
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", str(HAPROXY_CFG)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_WITHIN_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited:\n" + self.log.read_text(errors="replace"))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if self.socket_path.exists():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("haproxy did not listen:\n" + self.log.read_text())
            time.sleep(0.05)

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await trio.to_thread.run_sync(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait, 10)

    async def command(self, line: str) -> str:
        """One command on HAProxy's runtime API socket; its answer."""
        stream = await trio.open_unix_socket(str(self.socket_path))
        async with stream:
            await stream.send_all(line.encode() + b"\n")
            chunks = []
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
        return b"".join(chunks).decode()

    async def show_stat(self) -> list[dict[str, str]]:
        """``show stat`` of the backend's servers (csv rows as dicts)."""
        text = await self.command("show stat")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, ln.split(","), strict=False)) for ln in lines[1:]]
        return [r for r in rows if r.get("pxname") == "exai_daemons" and r["svname"] != "BACKEND"]

    async def show_servers(self) -> dict[str, str]:
        """Server name → ``UP``, ``DOWN``, ``MAINT``, … as HAProxy sees them now."""
        return {r["svname"]: r["status"].split()[0] for r in await self.show_stat()}

    async def wait_servers(self, want: Mapping[str, str], bound_s: float = START_WITHIN_S) -> None:
        """Wait until the named servers have the given status."""
        got: dict[str, str] = {}
        with trio.move_on_after(bound_s):
            while True:
                got = await self.show_servers()
                if all(got.get(k) == v for k, v in want.items()):
                    return
                await trio.sleep(0.05)
        raise AssertionError(f"HAProxy servers {got}, wanted {dict(want)}")


@attrs.define(eq=False)
class Cluster:
    """HAProxy in front of :data:`SERVERS` daemon slots (``daemons``; some may be left off)."""

    lb: HAProxy
    daemons: list[DaemonProcess]
    directory: Path

    @property
    def url(self) -> str:
        """Where MCP clients connect: the balancer's WebSocket URL."""
        return f"ws://127.0.0.1:{self.lb.port}/mcp"

    @property
    def http_url(self) -> str:
        """Where Streamable HTTP clients post: the balancer's ``/mcp``."""
        return f"http://127.0.0.1:{self.lb.port}/mcp"

    async def wait_servers(self, want: Mapping[str, str], bound_s: float = START_WITHIN_S) -> None:
        await self.lb.wait_servers(want, bound_s)

    async def wait_all_up(self) -> None:
        """Until HAProxy routes to every running daemon (and not to the others)."""
        want = {d.name: ("UP" if d.alive() else "DOWN") for d in self.daemons}
        await self.wait_servers(want)

    async def calls_by_daemon(self, outcome: str = "ok") -> dict[str, float]:
        """``exai_calls_total{outcome=…}`` of each running daemon."""
        return {
            d.name: await d.metric("exai_calls_total", outcome=outcome)
            for d in self.daemons
            if d.alive()
        }


def daemon_env(
    directory: Path,
    name: str,
    port: int,
    admin_port: int,
    *,
    mock_url: str,
    storage_url: str,
    redis_url: str,
    redis_prefix: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one daemon of the cluster (every daemon shares all but the ports and
    the state directory)."""
    env = base_env(
        EXAI_HOST="127.0.0.1",
        EXAI_PORT=str(port),
        EXAI_ADMIN_PORT=str(admin_port),
        EXAI_STATE_DIR=str(directory / name),
        EXAI_LOG_FORMAT="json",
        EXAI_LOG_LEVEL="info",
        EXAI_STORAGE_URL=storage_url,
        EXAI_REDIS_URL=redis_url,
        EXAI_REDIS_KEY_PREFIX=redis_prefix,
        EXAI_PG_POOL_MAX="4",
        EXAI_PROVIDER_MOCK_BASE_URL=mock_url,
        EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        EXAI_FAST_MODELS="mock-fast",
        EXAI_QUALITY_MODELS="mock-fast",
        EXAI_RATE_LIMIT_REPLICAS=str(SERVERS),
        # every connection comes from HAProxy on 127.0.0.1
        EXAI_MAX_CONNECTIONS_PER_IP="100000",
        EXAI_SESSION_RATE_PER_S="100000",
        EXAI_SESSION_BURST="100000",
        EXAI_HEARTBEAT_INTERVAL_S="0",
    )
    env.update(extra or {})
    return env


@asynccontextmanager
async def open_cluster(
    directory: Path,
    *,
    mock_url: str,
    storage_url: str,
    redis_prefix: str,
    redis_url: str = "redis://127.0.0.1:6379/0",
    running: int = SERVERS,
    env: Mapping[str, str] | None = None,
    argv: Sequence[str] = (),
    haproxy: str | None = None,
) -> AsyncIterator[Cluster]:
    """Start HAProxy and ``running`` of the :data:`SERVERS` daemons; stop everything on exit.

    Raises:
        RuntimeError: ``haproxy`` is not installed (fixtures skip before), or a process did not
            start (its output is in the message).
    """
    binary = haproxy or find_haproxy()
    if binary is None:
        raise RuntimeError("haproxy is not installed (Debian package haproxy)")
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    ports = free_ports(1 + 2 * SERVERS)
    lb_port, rest = ports[0], ports[1:]
    # what every daemon of a deployment shares (docs/deploy.md), the session-signing key too
    shared = {"EXAI_SESSION_SIGNING_KEY": secrets.token_urlsafe(32), **(env or {})}
    daemons = []
    lb_env = base_env(
        EXAI_LB_BIND=f"127.0.0.1:{lb_port}",
        EXAI_LB_ADMIN_SOCKET=str(directory / "haproxy.sock"),
    )
    for i in range(SERVERS):
        name = f"exai{i + 1}"
        port, admin = rest[2 * i], rest[2 * i + 1]
        lb_env[f"EXAI{i + 1}_ADDR"] = f"127.0.0.1:{port}"
        lb_env[f"EXAI{i + 1}_ADMIN_PORT"] = str(admin)
        daemons.append(
            DaemonProcess(
                name=name,
                port=port,
                admin_port=admin,
                env=daemon_env(
                    directory,
                    name,
                    port,
                    admin,
                    mock_url=mock_url,
                    storage_url=storage_url,
                    redis_url=redis_url,
                    redis_prefix=redis_prefix,
                    extra=shared,
                ),
                argv=list(argv),
            )
        )
    lb = HAProxy(
        binary=binary,
        port=lb_port,
        socket_path=directory / "haproxy.sock",
        env=lb_env,
        log=directory / "haproxy.log",
    )
    cluster = Cluster(lb=lb, daemons=daemons, directory=directory)
    async with AsyncExitStack() as stack:

        async def stop_all() -> None:
            with trio.CancelScope(shield=True):
                for d in daemons:
                    d.kill()
                for d in daemons:
                    if d.proc is not None:
                        await d.wait(30)
                await lb.stop()

        stack.push_async_callback(stop_all)
        # the first daemon migrates the schema; the others start beside each other
        if running:
            await daemons[0].start()
        async with trio.open_nursery() as nursery:
            for d in daemons[1:running]:
                nursery.start_soon(d.start)
        await lb.start()
        await cluster.wait_all_up()
        yield cluster
