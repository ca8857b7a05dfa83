"""The `exai` command as a user runs it: serve, config, token new, and secret hygiene."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio

from tests.helpers import REPO, Rpc, daemon_process, subprocess_env, ws

SECRETS = {
    "EXAI_TOKENS": "alice:tok-alice-secret-0001,tok-anon-secret-0002",
    "KIMI_API_KEY": "sk-kimi-secret-0003",
    "GLM_API_KEY": "sk-glm-secret-0004",
    "EXAI_STORAGE_URL": "sqlite:///{tmp}/x.sqlite3",
    "EXAI_REDIS_URL": "redis://:redis-pass-secret-0005@127.0.0.1:6379/0",
}
SECRET_VALUES = [
    "tok-alice-secret-0001",
    "tok-anon-secret-0002",
    "sk-kimi-secret-0003",
    "sk-glm-secret-0004",
    "redis-pass-secret-0005",
]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exai.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )


def test_config_prints_settings_with_secrets_redacted(tmp_path):
    env = subprocess_env(tmp_path, **{k: v.format(tmp=tmp_path) for k, v in SECRETS.items()})
    out = run_cli(["config"], env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["port"] == 0
    assert data["providers"]["kimi"]["configured"] is True
    for value in SECRET_VALUES:
        assert value not in out.stdout + out.stderr


def test_unknown_setting_stops_start_up_with_a_suggestion(tmp_path):
    out = run_cli(["serve"], subprocess_env(tmp_path, EXAI_MAX_INFLITE="3"))
    assert out.returncode == 2
    assert "EXAI_MAX_INFLIGHT" in out.stderr


def test_non_loopback_bind_without_tokens_is_refused(tmp_path):
    out = run_cli(["serve"], subprocess_env(tmp_path, EXAI_HOST="0.0.0.0"))
    assert out.returncode == 2
    assert "no client tokens" in out.stderr


def test_token_new_prints_a_token_and_its_hashed_line(tmp_path):
    out = run_cli(["token", "new", "laptop"], subprocess_env(tmp_path))
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    token = lines[0].rsplit(" ", 1)[1]
    import hashlib

    assert f"laptop:sha256:{hashlib.sha256(token.encode()).hexdigest()}" in lines
    assert len(token) >= 32


def test_serve_announces_once_serves_and_exits_0_on_sigterm(tmp_path):
    env = subprocess_env(tmp_path, EXAI_LOG_FORMAT="text")
    with daemon_process(tmp_path, env=env) as (proc, url):
        assert url.startswith("ws://127.0.0.1:") and not url.endswith(":0/mcp")

        async def ping() -> dict:
            async with ws(url) as conn:
                return await Rpc(conn).call("version")

        res = trio.run(ping)
        assert res["result"]["isError"] is False
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    lines = proc.stderr_lines  # type: ignore[attr-defined]
    assert sum(1 for ln in lines if ln.startswith("exai: listening on ")) == 1
    assert sum(1 for ln in lines if ln.startswith("exai: admin on http://127.0.0.1:")) == 1
    assert any("no client tokens configured" in ln for ln in lines)
    assert any("no provider is configured" in ln for ln in lines)


def test_secrets_never_appear_in_logs_errors_or_status(tmp_path):
    env = subprocess_env(
        tmp_path,
        **{k: v.format(tmp=tmp_path) for k, v in SECRETS.items() if k != "EXAI_REDIS_URL"},
        EXAI_LOG_LEVEL="debug",
    )
    with daemon_process(tmp_path, "--plugin", "tests.daemon_tools:register", env=env) as (
        proc,
        url,
    ):

        async def session() -> list[str]:
            seen = []
            async with ws(url, token="tok-alice-secret-0001") as conn:
                rpc = Rpc(conn)
                for name, args in (("status", {}), ("version", {}), ("fail", {}), ("nope", {})):
                    seen.append(json.dumps(await rpc.call(name, args)))
                seen.append(json.dumps(await rpc.request("tools/list")))
            return seen

        outputs = trio.run(session)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    captured = "\n".join(outputs + proc.stderr_lines)  # type: ignore[attr-defined]
    assert "call.finished" in captured  # the logs were captured
    for value in SECRET_VALUES:
        assert value not in captured


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_drains_a_running_call_before_exit(tmp_path, signum):
    env = subprocess_env(tmp_path, EXAI_DRAIN_TIMEOUT_S="10")
    with daemon_process(tmp_path, "--plugin", "tests.daemon_tools:register", env=env) as (
        proc,
        url,
    ):

        async def call_and_signal() -> dict:
            async with ws(url) as conn:
                rpc = Rpc(conn)
                await rpc.send(
                    {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "tools/call",
                        "params": {"name": "sleep", "arguments": {"seconds": 1.0}},
                    }
                )
                await trio.sleep(0.3)
                proc.send_signal(signum)
                return await rpc.response(1)

        res = trio.run(call_and_signal)
        assert res["result"]["content"][0]["text"] == "slept"
        assert proc.wait(15) == 0


def test_non_loopback_bind_with_tokens_but_no_tls_is_refused_unless_allowed(tmp_path):
    env = subprocess_env(tmp_path, EXAI_HOST="0.0.0.0", EXAI_TOKENS="a:tok-0123456789abcdef")
    out = run_cli(["serve"], env)
    assert out.returncode == 2
    assert "without TLS" in out.stderr and "EXAI_ALLOW_INSECURE_BIND" in out.stderr


def test_migrate_applies_the_schema_of_the_configured_store(tmp_path):
    db = tmp_path / "m.sqlite3"
    out = run_cli(["migrate"], subprocess_env(tmp_path, EXAI_STORAGE_URL=f"sqlite:///{db}"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["store"]["kind"] == "sqlite"
    assert db.exists()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["mock-upstream", "--help"], "--port"),
        (["doctor", "--help"], "--strict"),
        (["call", "--help"], "key=value"),
    ],
)
def test_subcommands_take_their_own_options(tmp_path, args, expect):
    out = run_cli(args, subprocess_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout + out.stderr


def test_doctor_offline_runs_through_the_cli(tmp_path):
    out = run_cli(["doctor", "--offline"], subprocess_env(tmp_path))
    assert out.returncode in (0, 1), out.stderr
    assert "unrecognized arguments" not in out.stderr


# ---------------------------------------------------------------------------------------
# one parser tree


def test_version_prints_the_version_and_exits_0(tmp_path):
    out = run_cli(["--version"], subprocess_env(tmp_path))
    assert out.returncode == 0
    from exai import __version__

    assert out.stdout.strip() == f"exai {__version__}"


def test_one_parser_tree_holds_every_subcommand_and_its_options():
    from exai.cli.completion import _options, _subcommands
    from exai.cli.main import build_parser

    tree = _subcommands(build_parser())
    assert sorted(tree) == sorted(
        [
            "bridge",
            "call",
            "completion",
            "config",
            "doctor",
            "migrate",
            "mock-upstream",
            "serve",
            "service",
            "status",
            "token",
        ]
    )
    assert {"--strict", "--offline"} <= set(_options(tree["doctor"]))
    assert {"--json", "--url", "--quiet"} <= set(_options(tree["call"]))
    assert {"--port", "--models", "--latency-s"} <= set(_options(tree["mock-upstream"]))
    assert list(_subcommands(tree["token"])) == ["new"]
    assert list(_subcommands(tree["service"])) == ["install", "status", "uninstall"]
    assert {"--json", "--human"} <= set(_options(tree["status"]))


def test_a_usage_error_in_any_subcommand_exits_2_with_its_usage(capsys):
    from exai.cli.main import main

    assert main(["migrate", "extra"]) == 2
    assert "usage: exai migrate" in capsys.readouterr().err
    assert main(["doctor", "--nope"]) == 2
    assert "usage: exai doctor" in capsys.readouterr().err
    assert main(["call"]) == 2
    assert "usage: exai call" in capsys.readouterr().err


def test_help_of_a_subcommand_exits_0(capsys):
    from exai.cli.main import main

    assert main(["bridge", "--help"]) == 0
    assert "--url" in capsys.readouterr().out


def _complete(script: str, words: list[str]) -> list[str]:
    """What the generated bash completion offers for ``words`` (the last one being typed)."""
    line = " ".join(f"'{w}'" for w in words)
    program = (
        f"{script}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        '_exai_complete; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.split()


def test_bash_completion_is_generated_from_the_parser_tree(tmp_path):
    out = run_cli(["completion", "bash"], subprocess_env(tmp_path))
    assert out.returncode == 0, out.stderr
    script = out.stdout
    subprocess.run(["bash", "-n", "-c", script], check=True, timeout=30)
    assert _complete(script, ["exai", "se"]) == ["serve", "service"]
    assert _complete(script, ["exai", "service", "u"]) == ["uninstall"]
    assert sorted(_complete(script, ["exai", "token", ""])) == ["--help", "-h", "new"]
    assert _complete(script, ["exai", "doctor", "--s"]) == ["--strict"]
    assert "--version" in _complete(script, ["exai", "--"])
    assert _complete(script, ["exai", "call", "--q"]) == ["--quiet"]


# ---------------------------------------------------------------------------------------
# the first five minutes (issue 17)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_on_a_pipe_every_stderr_line_of_serve_is_one_json_record(tmp_path):
    """EXAI_LOG_FORMAT=auto on a pipe: the start-up lines, the hints, the logs and the shutdown
    lines all come as JSON records, none as a plain line between them."""
    env = subprocess_env(tmp_path, EXAI_LOG_FORMAT="auto")
    with daemon_process(tmp_path, env=env) as (proc, url):
        _stop(proc)
    lines = [ln for ln in proc.stderr_lines if ln.strip()]  # type: ignore[attr-defined]
    records = [json.loads(ln) for ln in lines]  # each line parses, or this fails
    events = [r["event"] for r in records]
    assert {"daemon.listening", "daemon.admin_listening", "config.no_tokens"} <= set(events)
    assert {"config.providers", "daemon.shutting_down", "daemon.stopped"} <= set(events)
    listening = records[events.index("daemon.listening")]
    assert listening["url"] == url and listening["message"] == f"exai: listening on {url}"


def test_in_text_format_the_start_up_lines_are_plain(tmp_path):
    env = subprocess_env(tmp_path, EXAI_LOG_FORMAT="text")
    with daemon_process(tmp_path, env=env) as (proc, url):
        _stop(proc)
    lines = proc.stderr_lines  # type: ignore[attr-defined]
    assert f"exai: listening on {url}" in lines
    assert not [ln for ln in lines if ln.startswith("{")]


def _hint_command(lines: list[str]) -> str:
    """The command the start-up hint says to run for the mock upstream."""
    import re

    text = "\n".join(lines)
    m = re.search(r"run `(.+?) mock-upstream --port 9000`", text)
    assert m, text
    return m.group(1)


def test_the_start_up_hint_names_an_exai_that_runs_as_pasted(tmp_path):
    import os
    import shlex

    bin_dir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bin_dir, "exai")), "the test needs the venv's exai script"
    # exai not on PATH (as after `make serve`): the hint names the venv's script by its path
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir
    )
    env = subprocess_env(tmp_path, EXAI_LOG_FORMAT="text", PATH=path or "/usr/bin:/bin")
    with daemon_process(tmp_path, env=env) as (proc, _url):
        _stop(proc)
    command = _hint_command(proc.stderr_lines)  # type: ignore[attr-defined]
    assert command == shlex.quote(os.path.join(bin_dir, "exai"))
    done = subprocess.run(
        [*shlex.split(command), "--version"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("exai "), done.stderr
    # the venv's bin first on PATH: plain `exai`
    env = subprocess_env(tmp_path, EXAI_LOG_FORMAT="text", PATH=bin_dir + os.pathsep + path)
    with daemon_process(tmp_path, env=env) as (proc, _url):
        _stop(proc)
    assert _hint_command(proc.stderr_lines) == "exai"  # type: ignore[attr-defined]


def test_a_second_serve_on_a_taken_port_says_an_exai_daemon_answers_there(tmp_path):
    from urllib.parse import urlparse

    from exai import __version__

    with daemon_process(tmp_path, env=subprocess_env(tmp_path)) as (proc, url):
        port = urlparse(url).port
        env = subprocess_env(
            tmp_path,
            EXAI_PORT=str(port),
            EXAI_LOG_FORMAT="text",
            EXAI_STATE_DIR=str(tmp_path / "2"),
        )
        out = run_cli(["serve"], env)
        _stop(proc)
    assert out.returncode == 1
    err = out.stderr
    assert f"the MCP port 127.0.0.1:{port} (EXAI_PORT) is already in use" in err
    assert f"an exai daemon answers there: exai {__version__} (pid {proc.pid}," in err
    assert f"`kill {proc.pid}`" in err
    # with the same EXAI_PORT, `exai status` finds that daemon (no EXAI_URL needed)
    (use,) = [ln for ln in err.splitlines() if ln.startswith("exai: use it as it is: `")]
    assert use.endswith(" status`") and "EXAI_URL" not in use
    assert "EXAI_PORT=" in err.splitlines()[-1] and "EXAI_ADMIN_PORT=" in err.splitlines()[-1]
    assert err.splitlines()[-1].rstrip().endswith(" serve")


def test_a_port_taken_by_another_program_is_named_as_such(tmp_path):
    import os
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        out = run_cli(
            ["serve"], subprocess_env(tmp_path, EXAI_PORT=str(port), EXAI_LOG_FORMAT="json")
        )
    assert out.returncode == 1
    (record,) = [json.loads(ln) for ln in out.stderr.splitlines() if ln.strip()]
    assert record["event"] == "daemon.port_in_use" and record["port"] == port
    assert f"127.0.0.1:{port} (EXAI_PORT) is already in use" in record["message"]
    assert "no exai daemon answers there: another program holds the port" in record["message"]
    assert f"pid {os.getpid()}," in record["message"]


def test_call_usage_says_arguments_are_optional(tmp_path):
    out = run_cli(["call"], subprocess_env(tmp_path))
    assert out.returncode == 2
    assert "the following arguments are required: tool" in out.stderr
    assert "key=value" not in out.stderr.splitlines()[-1]


def test_version_tool_reports_the_installed_anyio(tmp_path):
    import importlib.metadata

    with daemon_process(tmp_path) as (proc, url):

        async def version() -> dict:
            async with ws(url) as conn:
                return await Rpc(conn).call("version")

        res = trio.run(version)
        _stop(proc)
    assert res["result"]["structuredContent"]["anyio"] == importlib.metadata.version("anyio")


def test_status_prints_a_short_summary_and_the_whole_document_with_json(tmp_path):
    env = subprocess_env(tmp_path)
    with daemon_process(tmp_path, env=env) as (proc, url):
        env = {**env, "EXAI_URL": url}
        human = run_cli(["status", "--human"], env)
        whole = run_cli(["status", "--json"], env)
        piped = run_cli(["status"], env)  # stdout is a pipe here: the document
        _stop(proc)
    from exai import __version__

    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert len(lines) <= 15
    assert lines[0].startswith(f"exai {__version__} at {url}: ready, up ")
    assert lines[1].startswith("connections: 1 open")
    assert lines[2].startswith("calls in flight: 0 ")
    assert any(ln.split()[:4] == ["kimi", "not", "configured", "breaker"] for ln in lines)
    assert any(ln.startswith("store: sqlite") for ln in lines)
    assert any(ln.startswith("spool: 0 writes waiting") for ln in lines)
    assert whole.returncode == piped.returncode == 0
    doc = json.loads(whole.stdout)
    assert doc["daemon"]["version"] == __version__ and "providers" in doc
    assert json.loads(piped.stdout).keys() == doc.keys()


def test_status_errors_say_exai_status(tmp_path):
    from tests.helpers import free_port

    env = subprocess_env(tmp_path, EXAI_URL=f"ws://127.0.0.1:{free_port()}/mcp")
    out = run_cli(["status"], env)
    assert out.returncode == 1
    assert out.stderr.startswith("exai status: cannot connect to the exai daemon at ")
    assert "exai call" not in out.stderr


def test_a_call_with_no_daemon_says_how_to_start_it(tmp_path):
    """As the bridge does: ``exai status`` / ``exai call`` before any ``exai serve`` said only
    "cannot connect … All connection attempts failed"."""
    from tests.helpers import free_port

    port = free_port()
    out = run_cli(["call", "version"], subprocess_env(tmp_path, EXAI_PORT=str(port)))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"exai call: is the daemon running? start it with: EXAI_PORT={port} ")
    assert last.endswith(" serve"), last


@pytest.fixture
def slow_mock():
    """The mock upstream as a process, streaming its answer in chunks 0.3 s apart."""
    import re

    cmd = [sys.executable, "-m", "exai.cli", "mock-upstream", "--chunk-delay-s", "0.3"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=str(REPO)
    )
    try:
        assert proc.stderr is not None
        m = re.search(r"listening on (http://\S+)", proc.stderr.readline())
        assert m, "the mock upstream did not start"
        yield m.group(1)
    finally:
        proc.kill()
        proc.wait(10)


def _slow_chat_env(tmp_path, base_url: str) -> dict[str, str]:
    return subprocess_env(
        tmp_path, EXAI_PROVIDER_MOCK_BASE_URL=base_url, EXAI_PROVIDER_MOCK_MODELS="mock-fast"
    )


def test_call_on_a_pipe_prints_one_line_per_progress_notification(tmp_path, slow_mock):
    env = _slow_chat_env(tmp_path, slow_mock)
    with daemon_process(tmp_path, env=env) as (proc, url):
        env = {**env, "EXAI_URL": url}
        out = run_cli(["call", "chat", "prompt=hello", "model=mock-fast"], env)
        quiet = run_cli(["call", "--quiet", "chat", "prompt=hello", "model=mock-fast"], env)
        _stop(proc)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    progress = [ln for ln in out.stderr.splitlines() if ln.startswith("exai call: progress ")]
    assert "exai call: progress asking a model" in progress
    assert any(ln.startswith("exai call: progress mock/mock-fast answering: ") for ln in progress)
    assert "\r" not in out.stderr  # no spinner on a pipe
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_call_on_a_terminal_shows_a_progress_line_and_erases_it(tmp_path, slow_mock):
    import os
    import pty

    env = _slow_chat_env(tmp_path, slow_mock)
    with daemon_process(tmp_path, env=env) as (proc, url):
        main_fd, tty_fd = pty.openpty()
        try:
            call = subprocess.run(
                [sys.executable, "-m", "exai.cli", "call", "chat", "prompt=hello"],
                env={**env, "EXAI_URL": url},
                stdout=subprocess.PIPE,
                stderr=tty_fd,
                text=True,
                timeout=120,
                cwd=str(REPO),
            )
            os.close(tty_fd)
            seen = b""
            while True:
                try:
                    chunk = os.read(main_fd, 65536)
                except OSError:  # EIO: the terminal's other end is closed and drained
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            os.close(main_fd)
        _stop(proc)
    assert call.returncode == 0 and call.stdout.strip()
    text = seen.decode()
    assert "mock/mock-fast answering: " in text  # the progress message, drawn in place
    assert "\r\x1b[K" in text and "\n" not in text  # one line, redrawn in place
    assert text.endswith("\r\x1b[K")  # erased once the answer came
    assert "exai call: progress" not in text


# ---------------------------------------------------------------------------------------
# exai service


def _service(tmp_path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``exai service …`` in ``tmp_path/project`` with a temporary XDG_CONFIG_HOME and HOME, and
    no systemctl on PATH (systemd does not run here)."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    env = subprocess_env(
        tmp_path,
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        HOME=str(tmp_path / "home"),
        PATH=str(tmp_path / "no-bin"),
        **extra,
    )
    env.pop("EXAI_STATE_DIR")
    env.pop("EXAI_LOG_FORMAT")
    env.pop("EXAI_PORT")
    env.pop("EXAI_ADMIN_PORT")
    return subprocess.run(
        [sys.executable, "-m", "exai.cli", "service", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(project),
    )


def test_service_install_writes_a_systemd_user_unit_that_references_the_settings(tmp_path):
    import os
    import stat

    project = tmp_path / "project"
    project.mkdir()
    (project / ".env").write_text("KIMI_API_KEY=sk-in-the-env-file-0001\nEXAI_PORT=8179\n")
    (project / "glm.key").write_text("sk-glm-in-a-file-0002\n")
    out = _service(
        tmp_path,
        "install",
        "--no-start",
        EXAI_MAX_INFLIGHT="12",
        GLM_API_KEY_FILE="glm.key",
        EXAI_TOKENS="alice:tok-exported-secret-0003",
    )
    assert out.returncode == 0, out.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "exai.service"
    assert f"wrote {unit}" in out.stdout
    assert "systemctl --user enable --now exai.service" in out.stdout  # how to start it
    text = unit.read_text()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    exai = os.path.join(os.path.dirname(sys.executable), "exai")
    assert f'ExecStart="{exai}" "serve"\n' in text
    assert f"WorkingDirectory={project}\n" in text
    assert f'Environment="EXAI_ENV_FILE={project / ".env"}"\n' in text
    assert 'Environment="EXAI_MAX_INFLIGHT=12"\n' in text
    assert f'Environment="GLM_API_KEY_FILE={project / "glm.key"}"\n' in text  # a path
    assert 'Environment="EXAI_LOG_FORMAT=json"\n' in text
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
    assert "[Install]\nWantedBy=default.target\n" in text
    for secret in ("sk-in-the-env-file-0001", "sk-glm-in-a-file-0002", "tok-exported-secret-0003"):
        assert secret not in text + out.stdout + out.stderr
    assert "EnvironmentFile" not in text  # the daemon reads its .env itself (and on SIGHUP)
    assert "EXAI_TOKENS is a secret set in this shell's environment" in out.stderr
    import shutil

    if shutil.which("systemd-analyze"):  # systemd's own reading of the file, where it exists
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0, verify.stderr


def test_service_install_dry_run_prints_the_unit_and_writes_nothing(tmp_path):
    out = _service(tmp_path, "install", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# ") and "(dry run: nothing written)" in out.stdout
    assert "[Service]" in out.stdout and '"serve"' in out.stdout
    assert not (tmp_path / "config").exists()
    assert "no .env file here" in out.stderr


def test_service_status_and_uninstall_say_what_to_run_without_systemctl(tmp_path):
    assert _service(tmp_path, "status").returncode == 3  # not installed
    assert _service(tmp_path, "install", "--no-start").returncode == 0
    unit = tmp_path / "config" / "systemd" / "user" / "exai.service"
    status = _service(tmp_path, "status")
    assert status.returncode == 1
    assert f"installed: {unit}" in status.stdout
    assert "systemctl is not on PATH here" in status.stdout
    assert "systemctl --user status --no-pager exai.service" in status.stdout
    gone = _service(tmp_path, "uninstall")
    assert "systemctl --user disable --now exai.service" in gone.stdout
    assert f"removed {unit}" in gone.stdout
    assert not unit.exists()


def test_launchd_plist_runs_exai_serve_with_the_settings_files():
    import plistlib

    from exai.cli.service import LAUNCHD_LABEL, launchd_plist

    data = plistlib.loads(
        launchd_plist(
            ["/Users/me/exai/.venv/bin/exai", "serve"],
            "/Users/me/exai",
            {"EXAI_ENV_FILE": "/Users/me/exai/.env"},
            "/Users/me/Library/Logs/exai.log",
        )
    )
    assert data["Label"] == LAUNCHD_LABEL
    assert data["ProgramArguments"] == ["/Users/me/exai/.venv/bin/exai", "serve"]
    assert data["WorkingDirectory"] == "/Users/me/exai"
    assert data["EnvironmentVariables"] == {
        "EXAI_ENV_FILE": "/Users/me/exai/.env",
        "EXAI_LOG_FORMAT": "json",
    }
    assert data["RunAtLoad"] is True and data["KeepAlive"] == {"SuccessfulExit": False}
    assert data["StandardErrorPath"] == "/Users/me/Library/Logs/exai.log"


def test_service_install_of_a_launchd_agent_as_a_dry_run(tmp_path):
    import plistlib

    out = _service(tmp_path, "install", "--kind", "launchd", "--dry-run")
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n")
    assert head.endswith("(dry run: nothing written)")
    assert "Library/LaunchAgents/dev.exai.daemon.plist" in head
    assert plistlib.loads(body.encode())["ProgramArguments"][-1] == "serve"


def test_version_and_help_work_without_the_daemon_extras(tmp_path):
    """A bare `pip install exai` (no trio-websocket): --version exits 0, a command that needs
    the extras says which install it needs (was: every command, --version too, exit 2)."""
    program = (
        "import importlib.util as u, sys\n"
        "real = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'trio_websocket' else real(name, *a)\n"
        "from exai.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )

    def bare(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", program, *args],
            env=subprocess_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(REPO),
        )

    from exai import __version__

    version = bare("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"exai {__version__}")
    assert bare("--help").returncode == 0
    assert bare("token", "new", "laptop").returncode == 0
    serve = bare("serve")
    assert serve.returncode == 2
    assert "`exai serve` needs the daemon extras: pip install 'exai[daemon]'" in serve.stderr


def test_status_summary_counts_in_words():
    from exai.cli.status import summary

    doc = {
        "daemon": {"version": "9", "ready": True, "uptime_s": 3725, "inflight": {"calls": 3}},
        "providers": {
            "providers": {
                "mock": {
                    "configured": True,
                    "breaker": {"state": "open"},
                    "counters": {"requests": 1, "ok": 0, "failed": 1},
                }
            }
        },
        "conversations": {"spool": {"depth": 1, "bytes": 2048, "max_bytes": 1 << 20}},
    }
    text = summary(doc)
    assert text.splitlines()[0] == "exai 9: ready, up 1h 02m, auth ?"
    assert "calls in flight: 2 " in text  # the status call itself not counted
    assert "mock  configured      breaker open       1 request (0 ok, 1 failed)" in text
    assert "spool: 1 write waiting for the store (2.0 KiB of 1.0 MiB)" in text


def test_status_summary_never_shows_the_urls_password_or_query():
    """`exai status` (the summary) headed its lines with the URL as given, so EXAI_URL or --url
    with a password or a token in the query string was printed whole."""
    from exai.cli.status import summary

    doc = {"daemon": {"version": "9", "ready": True}}
    head = summary(doc, "ws://u:pw-SECRET@127.0.0.1:1/mcp?token=q-SECRET").splitlines()[0]
    assert head == "exai 9 at ws://u:***@127.0.0.1:1/mcp: ready, up ?, auth ?"


def test_client_commands_do_not_read_the_daemons_secret_files(tmp_path):
    """A ``.env`` shared with the daemon names its tokens file, provider key and storage URL
    files, which the client's account cannot read (here: they do not exist — the tests run as
    root, for whom no mode hides a file). ``exai call`` / ``exai status`` stopped with
    "EXAI_TOKENS_FILE: cannot read secret file"; they need none of them. A client secret that
    cannot be read (``EXAI_TOKEN_FILE``) is still an error naming it."""
    hidden = tmp_path / "daemon-only"
    dotenv = tmp_path / "client.env"
    dotenv.write_text(
        f"EXAI_TOKENS_FILE={hidden}/tokens\n"
        f"KIMI_API_KEY_FILE={hidden}/kimi\n"
        f"EXAI_STORAGE_URL_FILE={hidden}/storage-url\n"
        f"EXAI_SESSION_SIGNING_KEY_FILE={hidden}/signing\n"
    )
    with daemon_process(tmp_path) as (proc, url):
        env = subprocess_env(tmp_path, EXAI_URL=url, EXAI_ENV_FILE=str(dotenv))
        called = run_cli(["call", "version"], env)
        status = run_cli(["status", "--json"], env)
        env["EXAI_TOKEN_FILE"] = str(hidden / "token")
        no_token = run_cli(["call", "version"], env)
        _stop(proc)
    assert called.returncode == 0, called.stderr
    assert status.returncode == 0, status.stderr
    assert no_token.returncode != 0
    assert "EXAI_TOKEN_FILE" in no_token.stderr and "cannot read" in no_token.stderr
    assert "EXAI_TOKENS_FILE" not in no_token.stderr


def test_config_says_which_restart_only_settings_the_running_daemon_still_runs_without(tmp_path):
    """After a SIGHUP with a restart-only setting changed in the files, `exai config` showed the
    new value and nothing said the daemon still ran with the old one. Its status now names the
    settings changed since it started, and `exai config` says so on stderr (stdout stays JSON)."""
    import time

    dotenv = tmp_path / "daemon.env"
    dotenv.write_text("EXAI_MAX_INFLIGHT=5\n")
    env = subprocess_env(tmp_path, EXAI_ENV_FILE=str(dotenv))
    with daemon_process(tmp_path, env=env) as (proc, url):
        dotenv.write_text("EXAI_MAX_INFLIGHT=7\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # (only turns a hang into a failure)
        while not any("config.reloaded" in line for line in proc.stderr_lines):
            assert time.monotonic() < deadline, proc.stderr_lines
            time.sleep(0.05)
        shown = run_cli(["config"], env | {"EXAI_URL": url})
        offline = run_cli(["config", "--offline"], env | {"EXAI_URL": url})
        _stop(proc)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["max_inflight"] == 7  # the files' value
    assert "max_inflight" in shown.stderr and "restart" in shown.stderr
    assert offline.returncode == 0 and offline.stderr == ""


def test_config_says_a_provider_added_since_the_start_awaits_the_restart(tmp_path):
    """A provider added to the files (or given another base URL) is taken only at a restart
    (provider.reload_needs_restart), but the daemon's status left it out of
    not_applied_until_restart: `exai config` showed it configured and said nothing."""
    import time

    dotenv = tmp_path / "daemon.env"
    dotenv.write_text("")
    env = subprocess_env(tmp_path, EXAI_ENV_FILE=str(dotenv))
    with daemon_process(tmp_path, env=env) as (proc, url):
        dotenv.write_text(
            "EXAI_PROVIDER_LATE_BASE_URL=http://127.0.0.1:9/v1\nEXAI_PROVIDER_LATE_MODELS=m-1\n"
        )
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # (only turns a hang into a failure)
        while not any("config.reloaded" in line for line in proc.stderr_lines):
            assert time.monotonic() < deadline, proc.stderr_lines
            time.sleep(0.05)
        shown = run_cli(["config"], env | {"EXAI_URL": url})
        _stop(proc)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["providers"]["late"]["configured"] is True
    assert "providers.late" in shown.stderr and "restart" in shown.stderr, shown.stderr


def test_config_says_a_signing_key_taken_out_of_the_files_awaits_the_restart(tmp_path):
    """A reload whose files no longer set EXAI_SESSION_SIGNING_KEY leaves the daemon signing
    with the key it started with (its sessions go on), but `exai config` showed no key and said
    nothing, while the restart will take another key and end every session."""
    import time

    dotenv = tmp_path / "daemon.env"
    dotenv.write_text("EXAI_SESSION_SIGNING_KEY=" + "s" * 40 + "\n")
    env = subprocess_env(tmp_path, EXAI_ENV_FILE=str(dotenv))
    with daemon_process(tmp_path, env=env) as (proc, url):
        dotenv.write_text("")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60  # (only turns a hang into a failure)
        while not any("config.reloaded" in line for line in proc.stderr_lines):
            assert time.monotonic() < deadline, proc.stderr_lines
            time.sleep(0.05)
        shown = run_cli(["config"], env | {"EXAI_URL": url})
        _stop(proc)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["session_signing_key"] is None
    assert "session_signing_key" in shown.stderr and "restart" in shown.stderr, shown.stderr


def test_config_says_when_the_daemon_could_not_be_asked(tmp_path):
    """A daemon with client tokens refused `exai config`'s status call (no EXAI_TOKEN, or a
    wrong one) and `exai config` said nothing: the silence read as "the daemon runs with these
    values" although it could not tell. It now says on stderr that it could not ask, and why;
    stdout stays the JSON document. Nothing listening (no daemon) stays silent."""
    import hashlib

    token = "t" * 43
    line = f"alice:sha256:{hashlib.sha256(token.encode()).hexdigest()}"
    env = subprocess_env(tmp_path, EXAI_TOKENS=line)
    with daemon_process(tmp_path, env=env) as (proc, url):
        refused = run_cli(["config"], env | {"EXAI_URL": url})
        wrong = run_cli(["config"], env | {"EXAI_URL": url, "EXAI_TOKEN": "w" * 43})
        right = run_cli(["config"], env | {"EXAI_URL": url, "EXAI_TOKEN": token})
        _stop(proc)
    nothing = run_cli(["config"], env | {"EXAI_URL": url})  # (the daemon has stopped)
    for out in (refused, wrong):
        assert out.returncode == 0, out.stderr
        json.loads(out.stdout)
        assert "could not ask the daemon" in out.stderr and "refused" in out.stderr, out.stderr
        assert "w" * 43 not in out.stderr
    assert right.returncode == 0 and right.stderr == "", right.stderr
    assert nothing.returncode == 0 and nothing.stderr == "", nothing.stderr


# ---------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.parametrize(
    "command", [["config"], ["status"], ["call", "version"], ["doctor"], ["bridge"]]
)
def test_ctrl_c_while_a_command_waits_for_the_daemon_exits_130_without_a_traceback(
    tmp_path, command
):
    """Ctrl-C while `exai config` waited for the daemon's status printed a Python traceback
    (the KeyboardInterrupt went through `except Exception`), as did every command interrupted
    while it imported what it runs. Here the "daemon" accepts the connection and never answers;
    once the command has sent its request, it gets SIGINT. `exai bridge` takes SIGINT as its
    signal to stop (exit 0)."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.settimeout(60)  # (only turns a hang into a failure)
        env = subprocess_env(tmp_path, EXAI_URL=f"ws://127.0.0.1:{silent.getsockname()[1]}/mcp")
        proc = subprocess.Popen(
            [sys.executable, "-m", "exai.cli", *command],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            # (as from a terminal: a test run started in the background ignores SIGINT)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            conn, _ = silent.accept()
            with conn:
                conn.settimeout(60)
                assert conn.recv(4096).startswith(b"GET /mcp")  # it waits for the answer
                proc.send_signal(signal.SIGINT)
                _out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    expected = 0 if command == ["bridge"] else 130
    assert (proc.returncode, "Traceback" in err) == (expected, False), err
    assert len(err.strip().splitlines()) <= 1, err


def test_an_interrupt_in_a_trio_nursery_or_under_another_error_is_still_130(monkeypatch):
    """The KeyboardInterrupt reaches main() as it is, inside trio's exception groups, or as the
    context of an error raised while it unwound: each is an interruption."""
    from exai.cli import main as cli

    def in_a_group(args):
        raise BaseExceptionGroup("nursery", [KeyboardInterrupt()])

    def under_another(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cleaning up") from None

    for fn in (in_a_group, under_another):
        monkeypatch.setattr(cli, "_token_new", fn)
        assert cli.main(["token", "new", "x"]) == 130

    def failing(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_token_new", failing)
    with pytest.raises(RuntimeError):
        cli.main(["token", "new", "x"])


@pytest.mark.parametrize("args", [["completion", "bash"], ["doctor", "--offline"]])
def test_a_reader_that_goes_away_ends_a_command_quietly(tmp_path, args):
    # `exai call listmodels | head` and `exai doctor | head -1` ended in a BrokenPipeError
    # traceback (found by a new-user run of the README's commands)
    read, write = os.pipe()
    os.close(read)  # (nobody will read: the first write is a broken pipe)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "exai.cli", *args],
            env=subprocess_env(tmp_path),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            cwd=str(REPO),
        )
    finally:
        os.close(write)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 141


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(monkeypatch):
    from exai.cli import main as cli

    def broken(argv):
        raise RuntimeError("the daemon went away") from BrokenPipeError()

    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(RuntimeError, match="the daemon went away"):
        cli.main([])
