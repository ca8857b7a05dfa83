"""A real ``exai serve`` process, an attacker beside it, and a well-behaved client.

Every test in this folder is an attack on a running daemon process (never an in-process
daemon: the point is what the whole process does — its memory, its loop, its exit). The
pattern::

    async with live_daemon(tmp_path, EXAI_SESSION_MAX_INFLIGHT="4") as daemon:
        ... attack daemon.url ...
        await daemon.assert_serves()          # a fresh client still gets answers

:class:`LiveDaemon` gives the daemon's URLs, its RSS (``psutil``), its ``/readyz`` and
``/metrics``, and :meth:`LiveDaemon.status` (the ``status`` tool through a fresh connection).

Bounds in these tests are counts, bytes and outcomes, never wall-clock durations: the suite runs
on a shared 2-core machine. Where a wait is needed it is generous (``SERVED_WITHIN_S``) and only
turns a hang into a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import psutil
import trio

from tests.helpers import Rpc, async_daemon_process, subprocess_env, ws

#: how long a well-behaved client may wait for an answer before the test calls it a hang
SERVED_WITHIN_S = 30.0

_ADMIN = re.compile(r'exai: admin on (https?://[^\s"]+)')


@attrs.define
class LiveDaemon:
    """An ``exai serve`` subprocess started by :func:`live_daemon`."""

    proc: subprocess.Popen[str]
    url: str
    admin_url: str
    env: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr_lines(self) -> list[str]:
        """What the daemon wrote to stderr so far (JSON log lines and the announce lines)."""
        lines: list[str] = self.proc.stderr_lines  # type: ignore[attr-defined]
        return lines

    def log_events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines whose ``event`` is ``name``."""
        found = []
        for line in list(self.stderr_lines):
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == name:
                found.append(rec)
        return found

    async def wait_log_events(
        self, name: str, count: int = 1, within_s: float = SERVED_WITHIN_S
    ) -> list[dict[str, Any]]:
        """The log lines called ``name`` once there are at least ``count`` of them. The daemon
        logs from a listener thread and this process reads its stderr in another: a line can
        arrive well after what it reports, on a busy machine most of all."""
        with trio.fail_after(within_s):
            while len(found := self.log_events(name)) < count:
                await trio.sleep(0.02)
        return found

    def pause_stderr(self) -> None:
        """Stop reading the daemon's stderr: once the pipe is full its writes would block."""
        self.proc.stderr_gate.clear()  # type: ignore[attr-defined]

    def resume_stderr(self) -> None:
        self.proc.stderr_gate.set()  # type: ignore[attr-defined]

    def rss_bytes(self) -> int:
        """The daemon's resident set size now."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def open_fds(self) -> int:
        return int(psutil.Process(self.pid).num_fds())

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def get(self, path: str) -> httpx.Response:
        """GET ``path`` on the admin listener (``/readyz``, ``/metrics``, ``/healthz``)."""
        async with httpx.AsyncClient(timeout=SERVED_WITHIN_S) as client:
            return await client.get(self.admin_url + path)

    async def ready(self) -> bool:
        return (await self.get("/readyz")).status_code == 200

    async def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0 when absent)."""
        text = (await self.get("/metrics")).text
        want = {k: v for k, v in labels.items()}
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m is None or m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in want.items()):
                return float(m.group(3))
        return 0.0

    @asynccontextmanager
    async def client(self, token: str | None = None) -> AsyncIterator[Rpc]:
        """A fresh, well-behaved connection that has done the ``initialize`` handshake."""
        async with ws(self.url, token=token) as conn:
            rpc = Rpc(conn)
            with trio.fail_after(SERVED_WITHIN_S):
                await rpc.request(
                    "initialize",
                    {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {},
                        "clientInfo": {"name": "well-behaved", "version": "1"},
                    },
                )
                await rpc.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            yield rpc

    async def call(
        self, name: str, arguments: dict[str, Any] | None = None, *, token: str | None = None
    ) -> dict[str, Any]:
        """One ``tools/call`` on a fresh connection; the JSON-RPC response."""
        async with self.client(token) as rpc:
            with trio.fail_after(SERVED_WITHIN_S):
                return await rpc.call(name, arguments or {})

    async def assert_serves(self, token: str | None = None) -> None:
        """A well-behaved client gets ``version`` answered (within ``SERVED_WITHIN_S``)."""
        assert self.alive(), "the daemon process died:\n" + "\n".join(self.stderr_lines[-30:])
        reply = await self.call("version", token=token)
        assert "result" in reply, reply
        assert reply["result"]["isError"] is False, reply

    async def status(self, token: str | None = None) -> dict[str, Any]:
        """The ``status`` tool's document."""
        reply = await self.call("status", token=token)
        result: dict[str, Any] = reply["result"]["structuredContent"]
        return result


def argument_error(reply: dict[str, Any]) -> dict[str, Any]:
    """The error of a call refused for its arguments, as this harness's clients (protocol
    2025-11-25) receive it: a tool result with ``isError: true`` whose
    ``structuredContent.error`` is the JSON-RPC error (-32602 with ``data.reason`` and
    ``data.field``) an earlier version would have got (see
    :func:`exai.server.protocol.argument_error_result`)."""
    assert "result" in reply and reply["result"]["isError"] is True, reply
    error: dict[str, Any] = reply["result"]["structuredContent"]["error"]
    assert error["code"] == -32602, error
    return error


@asynccontextmanager
async def live_daemon(
    tmp_path: Path, *args: str, plugin: bool = True, **env: str
) -> AsyncIterator[LiveDaemon]:
    """Start ``exai serve`` (with the test tools of ``tests.daemon_tools`` unless
    ``plugin=False``) with ``env`` on top of a clean test environment; stop it on exit."""
    full_env = subprocess_env(tmp_path, **env)
    argv = [*args]
    if plugin:
        argv += ["--plugin", "tests.daemon_tools:register"]
    async with async_daemon_process(tmp_path, *argv, env=full_env) as (proc, url):
        admin = ""
        with trio.fail_after(SERVED_WITHIN_S):
            while not admin:
                for line in list(proc.stderr_lines):  # type: ignore[attr-defined]
                    m = _ADMIN.search(line)
                    if m:
                        admin = m.group(1)
                        break
                else:
                    await trio.sleep(0.02)
        yield LiveDaemon(proc=proc, url=url, admin_url=admin, env=full_env)
