"""Must-show: every secret value set in a test — provider keys (from the environment and from
``*_FILE``), client tokens, a database password in a URL, a Redis password — is absent from the
daemon's logs (debug level), from every answer and error, from ``status``, ``exai status``,
``exai config``, ``exai doctor`` and the audit log; values read from ``*_FILE`` never reach
``os.environ``; and a child process the daemon starts sees no secret.

One daemon subprocess, one mock upstream subprocess; the calls exercise the success path, an
upstream that refuses a key (401), an unreachable provider, a crashing tool, an unknown tool and
a refused client token.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.client import Client
from exai.client.ws import WebSocketError
from exai.config import Settings
from tests.helpers import REPO, Rpc, daemon_process, free_port, subprocess_env, ws

TOKEN_ALICE = "tok-hygiene-alice-secret-000000000001"
TOKEN_ANON = "tok-hygiene-anon-secret-0000000000002"
TOKEN_WRONG = "tok-hygiene-wrong-secret-000000000003"  # presented, never accepted
MOCK_KEY = "sk-mock-hygiene-file-secret-0004"  # from a *_FILE
KIMI_KEY = "sk-kimi-hygiene-env-secret-0005"  # refused by the upstream (401)
GLM_KEY = "sk-glm-hygiene-file-secret-0006"  # from a *_FILE; its endpoint is unreachable
PG_PASSWORD = "pw-secret"
PG_URL = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:5432/test"
REDIS_PASSWORD = "redis-pass-hygiene-secret-0007"

SECRETS = (
    TOKEN_ALICE,
    TOKEN_ANON,
    TOKEN_WRONG,
    MOCK_KEY,
    KIMI_KEY,
    GLM_KEY,
    PG_PASSWORD,
    REDIS_PASSWORD,
)
FILE_SECRETS = (MOCK_KEY, GLM_KEY)


def assert_absent(where: str, text: str) -> None:
    for value in SECRETS:
        assert value not in text, f"a secret value appears in {where}"


def write_secret(path: Path, value: str) -> str:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture(scope="module")
def mock_upstream() -> Iterator[str]:
    """``exai mock-upstream`` accepting only MOCK_KEY; yields its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exai.testing.mock_upstream",
            "--api-key",
            MOCK_KEY,
            "--models",
            "mock-fast",
            "--any-model",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
    )
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(30) or not found:
            raise RuntimeError("the mock upstream did not start")
        yield found[0]
    finally:
        proc.kill()
        proc.wait(10)
        reader.join(5)
        if proc.stderr is not None:
            proc.stderr.close()


def daemon_env(tmp_path: Path, upstream: str) -> dict[str, str]:
    return subprocess_env(
        tmp_path,
        EXAI_TOKENS=f"alice:{TOKEN_ALICE},{TOKEN_ANON}",
        EXAI_PROVIDER_MOCK_BASE_URL=upstream,
        EXAI_PROVIDER_MOCK_API_KEY_FILE=write_secret(tmp_path / "mock.key", MOCK_KEY),
        EXAI_PROVIDER_MOCK_MODELS="mock-fast",
        KIMI_API_KEY=KIMI_KEY,
        KIMI_BASE_URL=upstream,
        GLM_API_KEY_FILE=write_secret(tmp_path / "glm.key", GLM_KEY),
        GLM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        EXAI_AUDIT_LOG=str(tmp_path / "audit" / "audit.log"),
        EXAI_LOG_LEVEL="debug",
        EXAI_CALL_TIMEOUT_S="20",
    )


def run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=90, cwd=cwd
    )
    return f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"


def doctor_command() -> list[str]:
    """``exai doctor``."""
    return ["-m", "exai.cli", "doctor"]


async def exercise(url: str) -> list[str]:
    """Calls over every path that could echo a secret; the raw answers."""
    seen: list[str] = []
    async with ws(url, token=TOKEN_ALICE) as conn:
        rpc = Rpc(conn)
        for name, args in (
            ("status", {}),
            ("version", {}),
            ("listmodels", {}),
            ("chat", {"prompt": "hello", "model": "mock-fast"}),
            ("chat", {"prompt": "hello", "model": "kimi-k2-turbo-preview"}),  # 401, then fallback
            ("chat", {"prompt": "hello", "model": "glm-4.5-flash"}),  # unreachable
            ("fail", {}),
            ("nope", {}),
            ("hygiene_environ", {}),
        ):
            with trio.fail_after(30):
                seen.append(json.dumps(await rpc.call(name, args)))
        seen.append(json.dumps(await rpc.request("tools/list")))
    settings = Settings.from_env({}, env_file="", config_file="")
    try:
        async with Client(url=url, token=TOKEN_WRONG, settings=settings):
            pass
    except WebSocketError as exc:
        seen.append(f"refused: {exc!r} {exc}")
    return seen


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory, mock_upstream: str) -> dict[str, Any]:
    """Run the daemon through every path once; everything it and the CLI said."""
    tmp_path = tmp_path_factory.mktemp("hygiene")
    env = daemon_env(tmp_path, mock_upstream)
    plugins = ("--plugin", "tests.daemon_tools:register")
    plugins += ("--plugin", "tests.security.env_tools:register")
    with daemon_process(tmp_path, *plugins, env=env) as (proc, url):
        answers = trio.run(exercise, url)
        cli_env = {**env, "EXAI_URL": url, "EXAI_TOKEN": TOKEN_ALICE}
        status_cli = run(["-m", "exai.cli", "status"], cli_env, REPO)
        full = {
            **cli_env,
            "EXAI_STORAGE_URL": PG_URL,
            "EXAI_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
        }
        config_cli = run(["-m", "exai.cli", "config"], full, REPO)
        doctor_cli = run(doctor_command(), full, tmp_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return {
        "answers": answers,
        "logs": "\n".join(proc.stderr_lines),  # type: ignore[attr-defined]
        "status_cli": status_cli,
        "config_cli": config_cli,
        "doctor_cli": doctor_cli,
        "audit": tmp_path / "audit" / "audit.log",
    }


def test_the_paths_that_could_leak_were_exercised(observed):
    by_tool = [json.loads(a) for a in observed["answers"][:9]]
    assert by_tool[3]["result"]["isError"] is False  # chat through the mock with the file key
    assert "error" in by_tool[4] or by_tool[4]["result"]["isError"]  # key refused, fallback failed
    assert "error" in by_tool[5] or by_tool[5]["result"]["isError"]  # provider unreachable
    assert "call.finished" in observed["logs"]
    assert observed["config_cli"].startswith("exit 0") and "postgres:***@" in observed["config_cli"]
    assert "exai doctor" in observed["doctor_cli"] and "daemon at" in observed["doctor_cli"]
    assert observed["answers"][-1].startswith("refused:")


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("the daemon's logs (debug level)", "logs"),
        ("exai status", "status_cli"),
        ("exai config", "config_cli"),
        ("exai doctor", "doctor_cli"),
    ],
)
def test_no_secret_value_appears_in_output(observed, where, key):
    assert_absent(where, observed[key])


def test_no_secret_value_appears_in_answers_errors_or_status(observed):
    assert_absent("tool answers, errors and handshake refusals", "\n".join(observed["answers"]))


def test_file_secrets_stay_out_of_the_environment_and_children_see_none(observed):
    environ = json.loads(json.loads(observed["answers"][8])["result"]["content"][0]["text"])
    for value in FILE_SECRETS:
        assert hashlib.sha256(value.encode()).hexdigest()[:16] not in environ["value_digests"]
    child = environ["child_env"]
    assert not [k for k in child if k.startswith(("KIMI_", "GLM_", "EXAI_TOKEN"))]
    assert not [k for k in child if k.endswith(("API_KEY", "API_KEY_FILE"))]
    assert_absent("a child process's environment", json.dumps(child))


def test_no_secret_value_appears_in_the_audit_log(observed):
    audit = observed["audit"]
    assert audit.exists(), "the daemon did not write EXAI_AUDIT_LOG"
    text = audit.read_text()
    assert_absent("the audit log", text)
    records = [json.loads(line) for line in text.splitlines()]
    assert {r["client"] for r in records} == {"alice"}
    assert any(r["tool"] == "chat" and r["key_fp"] for r in records)


def test_the_audit_log_has_a_line_for_a_refused_call_too(observed):
    records = [json.loads(line) for line in observed["audit"].read_text().splitlines()]
    refused = [r for r in records if r["tool"] == "nope"]
    assert refused and refused[0]["outcome"] == "invalid_params"
    assert refused[0]["client"] == "alice"
