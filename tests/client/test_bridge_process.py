"""``exai bridge`` as a process: clean stdout, exit on stdin EOF, exit when its parent dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from .conftest import FakeDaemon

BRIDGE = [sys.executable, "-m", "exai.cli", "bridge"]


#: Bounds that only turn a hang into a failure (never a figure under test): on a busy
#: machine starting a Python process alone can take seconds.
HANG_GUARD_S = 60.0
#: The bridges here run with this call timeout, so their drain after stdin EOF, bounded by
#: it, would take an hour: a bridge that exits within HANG_GUARD_S did not wait for it.
CALL_TIMEOUT_S = 3600


def wait_for_exit(proc: psutil.Process, bound_s: float) -> None:
    """Wait until ``proc`` has exited. It is not our child, so it is reaped by whoever
    adopted it, maybe late: a zombie counts as exited."""
    start = time.monotonic()
    while time.monotonic() - start < bound_s:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {proc.pid} still running after {bound_s}s")


def bridge_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    env["EXAI_URL"] = url
    env["EXAI_LOG_LEVEL"] = "debug"
    env["EXAI_CALL_TIMEOUT_S"] = str(CALL_TIMEOUT_S)
    return env


def test_bridge_answers_over_stdio_and_exits_0_on_stdin_eof(threaded_daemon: FakeDaemon) -> None:
    with subprocess.Popen(
        BRIDGE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=bridge_env(threaded_daemon.url),
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert json.loads(line) == {"jsonrpc": "2.0", "id": 1, "result": {}}
        proc.stdin.close()
        # it exits on the EOF itself: nothing is in flight, and a drain waiting for an answer
        # would be bounded by the hour-long call timeout, not by this guard
        code = proc.wait(timeout=HANG_GUARD_S)
        rest = proc.stdout.read()
        err = proc.stderr.read()
    assert code == 0, err.decode()
    assert rest == b""  # nothing but JSON-RPC on stdout: the logs went to stderr
    assert b"bridging stdio to" in err


def test_the_bridges_log_lines_are_shaped_as_the_daemons(threaded_daemon: FakeDaemon) -> None:
    """Each stderr line is a record with a short dotted event name and fields, the sentence a
    person reads under ``message`` (the bridge put the whole sentence in ``event``)."""
    import re

    env = bridge_env(threaded_daemon.url) | {"EXAI_LOG_FORMAT": "json"}
    with subprocess.Popen(
        BRIDGE, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        proc.stdin.write(b"not json\n")  # a warning: the client sent a line that is not JSON
        proc.stdin.flush()
        proc.stdout.readline()
        proc.stdout.readline()
        proc.stdin.close()
        code = proc.wait(timeout=HANG_GUARD_S)
        err = proc.stderr.read().decode()
    assert code == 0, err
    records = [json.loads(line) for line in err.splitlines()]
    events = {r["event"]: r for r in records}
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", e) for e in events), sorted(events)
    assert events["bridge.started"]["message"].startswith("bridging stdio to ws://")
    assert events["bridge.client_line_invalid"]["level"] == "warning"
    assert "is not valid JSON" in events["bridge.client_line_invalid"]["message"]


def test_stray_prints_inside_the_bridge_go_to_stderr(threaded_daemon: FakeDaemon) -> None:
    code = textwrap.dedent(
        """
        import sys
        from exai.client import bridge, stdio
        real_run = bridge.Bridge.run
        async def noisy_run(self, stdin, stdout):
            print("stray print")
            await real_run(self, stdin, stdout)
        bridge.Bridge.run = noisy_run
        sys.exit(stdio.run())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n',
        capture_output=True,
        env=bridge_env(threaded_daemon.url),
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0
    assert b"stray print" in proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in lines)


def test_sigterm_ends_the_bridge_and_tells_the_daemon_the_waiting_calls_are_cancelled(
    threaded_daemon: FakeDaemon,
) -> None:
    with subprocess.Popen(
        BRIDGE,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=bridge_env(threaded_daemon.url),
    ) as proc:
        assert proc.stdin is not None
        call = {"name": "hold", "arguments": {}}
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        proc.stdin.write(
            (
                json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": call})
            ).encode()
            + b"\n"
        )
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not threaded_daemon.hold_started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert threaded_daemon.hold_started
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    cancels = [
        m for _, m in list(threaded_daemon.received) if m.get("method") == "notifications/cancelled"
    ]
    assert cancels and cancels[0]["params"]["requestId"] == 7


def test_a_bridge_started_from_a_thread_that_ends_keeps_serving(
    threaded_daemon: FakeDaemon,
) -> None:
    # trio's open_process (the MCP SDK's stdio client under trio) starts the child from a
    # worker thread that ends after 10 s idle; a parent-death signal tied to that thread
    # killed the bridge then
    started: list[subprocess.Popen[bytes]] = []

    def spawn_and_use() -> None:
        proc = subprocess.Popen(
            BRIDGE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=bridge_env(threaded_daemon.url),
        )
        started.append(proc)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        proc.stdin.flush()
        proc.stdout.readline()  # answered: the bridge is past its start-up

    thread = threading.Thread(target=spawn_and_use)
    thread.start()
    thread.join()  # the thread that started the bridge has ended
    (proc,) = started
    with proc:
        assert proc.stdin is not None and proc.stdout is not None
        time.sleep(0.5)  # give a (wrongly) signalled bridge time to go
        proc.stdin.write(b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n')
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"jsonrpc": "2.0", "id": 2, "result": {}}
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process tree")
def test_bridge_exits_when_its_parent_dies(threaded_daemon: FakeDaemon) -> None:
    # The test keeps the write end of the bridge's stdin open, so only the parent's death
    # (not an EOF) can end the bridge.
    read_fd, write_fd = os.pipe()
    parent_code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        p = subprocess.Popen({BRIDGE!r}, stdin={read_fd}, stdout=subprocess.DEVNULL,
                             pass_fds=({read_fd},))
        print(p.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code],
        stdout=subprocess.PIPE,
        pass_fds=(read_fd,),
        env=bridge_env(threaded_daemon.url),
    )
    os.close(read_fd)
    try:
        assert parent.stdout is not None
        bridge_pid = int(parent.stdout.readline())
        bridge = psutil.Process(bridge_pid)
        # wait until the bridge is connected, so it is past start-up
        deadline = time.monotonic() + HANG_GUARD_S
        while threaded_daemon.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threaded_daemon.connections >= 1
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=HANG_GUARD_S)
        # stdin stays open (the test holds its write end): only the parent's death ends it
        wait_for_exit(bridge, HANG_GUARD_S)
    finally:
        os.close(write_fd)
        if parent.stdout is not None:
            parent.stdout.close()
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://127.0.0.1:1/mcp", "not a WebSocket URL"),
        ("ws:///mcp", "without a host"),
        ("ws://127.0.0.1:99999/mcp", "a bad port"),
        ("ws://u:pw-SECRET@127.0.0.1:99999/mcp?token=q-SECRET", "a bad port"),
    ],
)
def test_a_malformed_url_stops_the_bridge_and_exai_call_with_a_configuration_error(
    url: str, said: str
) -> None:
    """A URL that can never work (EXAI_URL=http://…, no host) had the bridge retry it for ever,
    every call of the MCP client failing as "unreachable"; a port out of range crashed the
    bridge and `exai call` with a ValueError traceback. The bridge now stops at start (2), and
    `exai call` says so in one line (1); neither shows the URL's password or query."""
    env = bridge_env(url)
    bridge = subprocess.run(BRIDGE, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                            timeout=HANG_GUARD_S)  # fmt: skip
    call = subprocess.run([*BRIDGE[:-1], "call", "version"], capture_output=True, env=env,
                          timeout=HANG_GUARD_S)  # fmt: skip
    assert bridge.returncode == 2, bridge.stderr
    assert call.returncode == 1, call.stderr
    for err in (bridge.stderr.decode(), call.stderr.decode()):
        assert said in err and "Traceback" not in err and "SECRET" not in err, err
        assert len(err.strip().splitlines()) == 1, err
