"""Must-show 5 of the front-doors issue: the bridge tried as a new user would, each item through
the real ``exai bridge`` process (the official MCP SDK's stdio client where it is about what a
client sees).

* a daemon that is not running is a clear error within seconds (not a wait of the call
  timeout), naming the URL and a start command that works as pasted;
* ``EXAI_AUTOSTART=1``: several bridges at once start exactly one daemon and are all answered;
  a daemon killed mid-call is started again and the call answered;
* ``EXAI_PORT`` without ``EXAI_URL`` reaches the daemon (bridge, ``exai call``, ``exai status``)
  and ``exai doctor`` flags an ``EXAI_URL`` that disagrees with the listener;
* a one-shot pipe (``initialize``, ``tools/list``, a call, EOF) gets every answer, even with a
  message cut by the EOF and a line of bad bytes among them;
* a client offering protocol ``2024-11-05`` gets it;
* the README's stdio snippet works from a minimal environment (``env -i``) and ``cwd=/``;
* a bridge that works says nothing on stderr.

No test here bounds wall-clock time: "within seconds" is shown by an answer that arrives while
``EXAI_CALL_TIMEOUT_S`` is huge, under a generous fail-after.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

from exai.client.autostart import LOG_NAME, PID_NAME
from exai.testing import MockUpstream
from tests.helpers import (
    REPO,
    async_daemon_process,
    daemon_process,
    free_port,
    subprocess_env,
)

EXAI = str(Path(sys.executable).parent / "exai")
#: a call timeout no test waits for: an answer that arrives did not come from it
HUGE_S = "100000"

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "pipe", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
CALL = {
    "jsonrpc": "2.0",
    "id": 3,
    "method": "tools/call",
    "params": {"name": "version", "arguments": {}},
}


def lines(*msgs: Any) -> bytes:
    return b"".join(m if isinstance(m, bytes) else (json.dumps(m) + "\n").encode() for m in msgs)


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What an MCP client gives the bridge: its own few variables and the config's env block."""
    return {"EXAI_STATE_DIR": str(tmp_path / "state"), "EXAI_ADMIN_PORT": "0", **extra}


def bridge_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """For a bridge run by ``subprocess``: no EXAI_* of the test's own environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "KIMI_", "GLM_"))}
    env.update(client_env(tmp_path, **extra))
    return env


def one_shot(env: dict[str, str], data: bytes, *, cwd: str | None = None) -> tuple[int, list, str]:
    """Pipe ``data`` into ``exai bridge`` and close stdin; exit code, answers, stderr."""
    proc = subprocess.run(
        [EXAI, "bridge"], input=data, capture_output=True, env=env, timeout=120, cwd=cwd
    )
    answers = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    return proc.returncode, answers, proc.stderr.decode()


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def daemons_of(state: Path) -> list[psutil.Process]:
    """Running ``exai serve`` processes whose state directory is ``state``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if (
                "serve" in cmd
                and any("exai" in c for c in cmd)
                and proc.environ().get("EXAI_STATE_DIR") == str(state)
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_daemons(state: Path) -> None:
    for proc in daemons_of(state):
        proc.kill()
    psutil.wait_procs(daemons_of(state), timeout=10)


@asynccontextmanager
async def reaping_daemons(state: Path) -> AsyncIterator[None]:
    """Kill every daemon started for ``state`` when the test ends (they are detached)."""
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(kill_daemons, state)


# --------------------------------------------------------------------------- not running


@pytest.mark.anyio
async def test_daemon_not_running_is_a_clear_error_with_a_start_command_that_works(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/mcp"
    params = StdioServerParameters(
        command=EXAI,
        args=["bridge"],
        env=client_env(tmp_path, EXAI_URL=url, EXAI_CALL_TIMEOUT_S=HUGE_S),
        cwd=str(tmp_path),
    )
    with anyio.fail_after(60):  # the call timeout is 100,000 s: only the new bound answers
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            with pytest.raises(MCPError) as info:
                await session.initialize()
    error = info.value.error
    assert error.code == -32000
    assert f"exai daemon unreachable at {url}" in error.message
    assert isinstance(error.data, dict) and error.data["reason"] == "daemon_unavailable"
    start = error.data["start"]
    assert f"start it with: {start}" in error.message
    # the command, pasted into a shell, starts a daemon where the bridge looks
    listening = await anyio.to_thread.run_sync(run_pasted, start, tmp_path)
    assert f"exai: listening on {url}" in listening


def run_pasted(start: str, tmp_path: Path) -> str:
    """Run ``start`` in a shell as a user would; the daemon's "listening on" line."""
    env = subprocess_env(tmp_path)
    del env["EXAI_PORT"]
    shell = subprocess.Popen(
        ["sh", "-c", start],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the shell and the daemon it runs: one group to kill
    )
    try:
        assert shell.stderr is not None
        for line in shell.stderr:
            if "listening on" in line:
                return line
        return ""
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(10)


def test_a_one_shot_pipe_without_a_daemon_is_answered_and_the_bridge_exits(
    tmp_path: Path,
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/mcp"
    env = bridge_env(tmp_path, EXAI_URL=url, EXAI_CALL_TIMEOUT_S=HUGE_S, EXAI_CONNECT_WAIT_S="1")
    code, answers, err = one_shot(env, lines(INIT, INITIALIZED, LIST, CALL))
    assert code == 0
    assert [a["id"] for a in answers] == [1, 2, 3]
    assert all(a["error"]["data"]["reason"] == "daemon_unavailable" for a in answers)
    assert "unreachable" in err  # a failure is reported on stderr


# ----------------------------------------------------------------------------- autostart


@pytest.mark.anyio
async def test_autostart_several_bridges_at_once_start_one_daemon_and_all_are_answered(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    url = f"ws://127.0.0.1:{free_port()}/mcp"
    env = client_env(tmp_path, EXAI_URL=url, EXAI_AUTOSTART="1", EXAI_CALL_TIMEOUT_S=HUGE_S)
    versions: list[str] = []

    async def one_editor() -> None:
        params = StdioServerParameters(command=EXAI, args=["bridge"], env=env, cwd="/")
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("version", {})
            assert result.is_error is False
            versions.append(text_of(result))

    async with reaping_daemons(state):
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(one_editor)
        running = await anyio.to_thread.run_sync(daemons_of, state)
        log = (state / LOG_NAME).read_text()
        pid = int((state / PID_NAME).read_text())
    assert len(versions) == 4
    assert [p.pid for p in running] == [pid]  # exactly one daemon, the one named in daemon.pid
    assert log.count("starts exai serve") == 1
    assert f"exai: listening on {url}" in log  # its log is in the state directory


@pytest.mark.anyio
async def test_autostart_starts_the_daemon_again_when_it_dies_mid_call(tmp_path: Path) -> None:
    state = tmp_path / "state"
    url = f"ws://127.0.0.1:{free_port()}/mcp"
    async with MockUpstream(models=("mock-fast",), latency_s=1.0) as mock:
        env = client_env(
            tmp_path,
            EXAI_URL=url,
            EXAI_AUTOSTART="1",
            EXAI_CALL_TIMEOUT_S="120",
            EXAI_PROVIDER_MOCK_BASE_URL=mock.base_url,
            EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        )
        params = StdioServerParameters(command=EXAI, args=["bridge"], env=env, cwd="/")
        with anyio.fail_after(120):
            async with (
                reaping_daemons(state),
                stdio_client(params) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                first = int((state / PID_NAME).read_text())
                results: list[Any] = []
                async with anyio.create_task_group() as tg:

                    async def chat() -> None:
                        results.append(
                            await session.call_tool("chat", {"prompt": "hi", "model": "mock-fast"})
                        )

                    tg.start_soon(chat)
                    while not mock.chat_requests:  # the call reached the upstream: mid-call
                        await anyio.sleep(0.02)
                    os.kill(first, signal.SIGKILL)
                second = int((state / PID_NAME).read_text())
                running = [p.pid for p in await anyio.to_thread.run_sync(daemons_of, state)]
    (result,) = results
    assert result.is_error is False, text_of(result)
    assert second != first and running == [second]
    assert (state / LOG_NAME).read_text().count("starts exai serve") == 2


def test_an_autostart_that_fails_is_answered_at_once_with_the_daemon_log(tmp_path: Path) -> None:
    # the daemon cannot load its certificate and exits before listening; the bridge only
    # trusts a CA, so it starts
    url = f"wss://127.0.0.1:{free_port()}/mcp"
    missing = str(tmp_path / "missing.pem")
    env = bridge_env(
        tmp_path,
        EXAI_URL=url,
        EXAI_AUTOSTART="1",
        EXAI_TLS_CERT=missing,
        EXAI_TLS_KEY=missing,
        EXAI_CALL_TIMEOUT_S=HUGE_S,
        EXAI_CONNECT_WAIT_S=HUGE_S,  # only the failed start can answer
    )
    code, answers, _ = one_shot(env, lines(INIT))
    assert code == 0
    (answer,) = answers
    message = answer["error"]["message"]
    assert answer["error"]["data"]["reason"] == "daemon_unavailable"
    assert "exited with status" in message
    assert str(tmp_path / "state" / LOG_NAME) in message
    assert "start it by hand with:" in message


# -------------------------------------------------------------------- EXAI_PORT, no EXAI_URL


@pytest.mark.anyio
async def test_exai_port_alone_is_where_the_bridge_call_and_status_connect(
    tmp_path: Path,
) -> None:
    port = free_port()
    daemon_env = subprocess_env(tmp_path, EXAI_PORT=str(port))
    async with async_daemon_process(tmp_path, env=daemon_env) as (_, url):
        assert url == f"ws://127.0.0.1:{port}/mcp"
        client = client_env(tmp_path, EXAI_PORT=str(port))  # no EXAI_URL
        params = StdioServerParameters(command=EXAI, args=["bridge"], env=client, cwd="/")
        with anyio.fail_after(60):
            async with (
                stdio_client(params) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                result = await session.call_tool("version", {})
        assert result.is_error is False
        env = bridge_env(tmp_path, EXAI_PORT=str(port))
        for args in (["call", "version"], ["status"]):
            with anyio.fail_after(60):
                out = await anyio.run_process([EXAI, *args], env=env, cwd="/", check=False)
            assert out.returncode == 0, (args, out.stderr)


def test_doctor_flags_an_exai_url_that_misses_the_listener(tmp_path: Path) -> None:
    env = bridge_env(tmp_path, EXAI_PORT="9123", EXAI_URL="ws://127.0.0.1:8079/mcp")
    out = subprocess.run(
        [EXAI, "doctor", "--offline", "--strict"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert out.returncode == 1, out.stdout
    (line,) = [ln for ln in out.stdout.splitlines() if "client-url:" in ln]
    assert "ws://127.0.0.1:8079/mcp" in line and "port 8079 where EXAI_PORT is 9123" in line
    # without EXAI_URL the client side follows EXAI_PORT: nothing to flag
    del env["EXAI_URL"]
    out = subprocess.run(
        [EXAI, "doctor", "--offline"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "clients connect to ws://127.0.0.1:9123/mcp" in out.stdout


# ------------------------------------------------------------------------- one-shot pipe


@pytest.fixture
def daemon_url(tmp_path: Path) -> Iterator[str]:
    with daemon_process(tmp_path) as (_, url):
        yield url


def test_a_one_shot_pipe_gets_every_answer_and_a_working_bridge_is_quiet(
    tmp_path: Path, daemon_url: str
) -> None:
    env = bridge_env(tmp_path, EXAI_URL=daemon_url)
    env.pop("EXAI_LOG_LEVEL", None)
    code, answers, err = one_shot(env, lines(INIT, INITIALIZED, LIST, CALL))
    assert code == 0
    assert [a["id"] for a in answers] == [1, 2, 3]
    assert answers[0]["result"]["serverInfo"]["name"] == "exai"
    assert "version" in {t["name"] for t in answers[1]["result"]["tools"]}
    assert answers[2]["result"]["isError"] is False
    assert err == ""  # nothing on stderr when all goes well


def test_a_one_shot_pipe_with_bad_bytes_and_a_message_cut_by_eof(
    tmp_path: Path, daemon_url: str
) -> None:
    env = bridge_env(tmp_path, EXAI_URL=daemon_url)
    cut = b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"vers'
    code, answers, _ = one_shot(env, lines(INIT, INITIALIZED, b"\xff\xfe\x00junk\n", LIST, cut))
    assert code == 0
    by_id = {a["id"]: a for a in answers}
    assert set(by_id) == {1, None, 2, 9}
    assert by_id[None]["error"]["code"] == -32700  # the bad bytes
    assert by_id[9]["error"]["code"] == -32700  # the message cut by EOF, matched by its id
    assert "result" in by_id[1] and "result" in by_id[2]


# -------------------------------------------------------------------------- 2024-11-05


@pytest.mark.anyio
async def test_a_client_offering_2024_11_05_gets_it_through_the_bridge(
    tmp_path: Path, daemon_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mcp.client.session

    # the SDK offers its newest handshake version; an SDK 1.x of late 2024 offered this one
    # and refused any other answer
    monkeypatch.setattr(mcp.client.session, "LATEST_HANDSHAKE_VERSION", "2024-11-05")
    params = StdioServerParameters(
        command=EXAI, args=["bridge"], env=client_env(tmp_path, EXAI_URL=daemon_url), cwd="/"
    )
    with anyio.fail_after(60):
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            init = await session.initialize()
            tools = await session.list_tools()
            result = await session.call_tool("version", {})
    assert init.protocol_version == "2024-11-05"
    assert "version" in {t.name for t in tools.tools}
    assert result.is_error is False


# ------------------------------------------------------------------- the README's snippet


def readme_bridge_snippet() -> dict[str, Any]:
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"<!-- bridge-snippet -->.*?```json\n(.*?)```", text, re.S)
    doc: dict[str, Any] = json.loads(block)
    return doc


@pytest.mark.anyio
async def test_the_readme_stdio_snippet_works_from_a_minimal_environment(tmp_path: Path) -> None:
    (server,) = readme_bridge_snippet()["mcpServers"].values()
    token = "editor-" + "e" * 40
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    daemon_env = subprocess_env(tmp_path, EXAI_PORT=str(port), EXAI_TOKENS=f"editor:{token}")
    # the snippet as the user fills it in: this checkout, this daemon's port, this token file
    command = server["command"].replace("/path/to/exai/.venv/bin/exai", EXAI)
    env = {
        k: v.replace("9123", str(port)).replace("/home/you/.config/exai/token", str(token_file))
        for k, v in server["env"].items()
    }
    assert set(env) == {"EXAI_URL", "EXAI_TOKEN_FILE"}
    minimal = ["PATH=/usr/bin:/bin", f"HOME={tmp_path}"]
    params = StdioServerParameters(
        command="env",
        args=["-i", *minimal, *(f"{k}={v}" for k, v in env.items()), command, *server["args"]],
        cwd="/",
    )
    async with async_daemon_process(tmp_path, env=daemon_env):
        with anyio.fail_after(60):
            async with (
                stdio_client(params) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                result = await session.call_tool("version", {})
    assert result.is_error is False
    assert shlex.split(command) == [EXAI]
