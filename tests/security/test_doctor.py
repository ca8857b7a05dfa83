"""``exai doctor`` flags each problem with its fix, passes a clean setup, and never shows a secret.

Every test prepares its own temporary directory and environment; nothing reads the ambient one.
Network checks run against loopback: closed ports, a fake Redis speaking RESP, the mock upstream,
an in-process daemon, and (marked) the real PostgreSQL and Redis.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import trio.testing

from exai.cli import doctor
from exai.cli.doctor import Finding, render
from exai.config import Secret, Settings
from exai.testing import MockUpstream
from tests.helpers import free_port, make_settings, running_daemon

SHORT_TOKEN = "tok-short-secret"  # 16 characters
LONG_TOKEN = "tok-long-enough-secret-0123456789abcdef"
KEY = "sk-doctor-secret-0001"
PG_PASSWORD = "pw-doctor-secret-0002"
REDIS_PASSWORD = "redis-doctor-secret-0003"
SECRETS = (SHORT_TOKEN, LONG_TOKEN, KEY, PG_PASSWORD, REDIS_PASSWORD)


def main(argv: list[str], **kw: Any) -> int:
    """``exai doctor ARGV`` as the CLI parses it, with the test's environment, cwd and out."""
    from exai.cli.main import build_parser

    args = build_parser().parse_args(["doctor", *argv])
    return doctor.run(strict=args.strict, offline=args.offline, **kw)


def settings_of(tmp_path: Path, **env: str) -> Settings:
    base = {"EXAI_STATE_DIR": str(tmp_path / "state")}
    return Settings.from_env({**base, **env}, env_file="", config_file="")


def problems(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check and f.level != "ok"]


def assert_no_secret(findings: list[Finding]) -> None:
    text = render(findings)
    for value in SECRETS:
        assert value not in text


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# ---------------------------------------------------------------------------------------
# git


def test_an_env_file_tracked_by_git_is_an_error_with_the_fix(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / ".env").write_text(f"KIMI_API_KEY={KEY}\n")
    (tmp_path / ".env.example").write_text("KIMI_API_KEY=\n")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / ".env.production").write_text("GLM_API_KEY=x\n")
    git(tmp_path, "add", ".env", ".env.example", "deploy/.env.production")
    found = problems(doctor.check_git(tmp_path), "git")
    assert {f.level for f in found} == {"error"}
    assert sorted(f.message.split()[0] for f in found) == [".env", "deploy/.env.production"]
    assert all("git rm --cached" in f.fix and "rotate" in f.fix for f in found)
    assert_no_secret(found)


def test_an_env_file_that_git_does_not_ignore_is_a_warning(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / ".env").write_text("EXAI_PORT=1\n")
    found = problems(doctor.check_git(tmp_path), "git")
    assert [f.level for f in found] == ["warn"]
    assert ".gitignore" in found[0].fix


def test_an_ignored_env_file_and_a_tracked_example_pass_the_git_check(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text(".env\n")
    (tmp_path / ".env").write_text("EXAI_PORT=1\n")
    (tmp_path / ".env.example").write_text("KIMI_API_KEY=\n")
    git(tmp_path, "add", ".gitignore", ".env.example")
    assert problems(doctor.check_git(tmp_path), "git") == []


def test_a_directory_outside_any_repository_passes_the_git_check(tmp_path):
    assert problems(doctor.check_git(tmp_path), "git") == []


# ---------------------------------------------------------------------------------------
# secret files


def test_a_secret_file_readable_by_others_is_an_error_saying_chmod_600(tmp_path):
    key_file = private_file(tmp_path / "kimi.key", KEY, mode=0o644)
    env = {"KIMI_API_KEY_FILE": str(key_file)}
    found = problems(
        doctor.check_secret_files(settings_of(tmp_path, **env), env, None), "secret-files"
    )
    assert [f.level for f in found] == ["error"]
    assert "KIMI_API_KEY_FILE" in found[0].message and "0644" in found[0].message
    assert found[0].fix == f"chmod 600 {key_file}"
    assert_no_secret(found)


def test_a_private_secret_file_passes(tmp_path):
    key_file = private_file(tmp_path / "kimi.key", KEY)
    tokens = private_file(tmp_path / "tokens", f"alice:{LONG_TOKEN}\n")
    env = {"KIMI_API_KEY_FILE": str(key_file), "EXAI_TOKENS_FILE": str(tokens)}
    settings = settings_of(tmp_path, **env)
    assert problems(doctor.check_secret_files(settings, env, None), "secret-files") == []


def test_a_group_readable_tokens_file_and_tls_key_are_errors(tmp_path):
    tokens = private_file(tmp_path / "tokens", f"alice:{LONG_TOKEN}\n", mode=0o640)
    tls_key = private_file(tmp_path / "server.key", "not a real key", mode=0o640)
    env = {"EXAI_TOKENS_FILE": str(tokens)}
    settings = settings_of(tmp_path, **env, EXAI_TLS_CERT=str(tls_key), EXAI_TLS_KEY=str(tls_key))
    found = problems(doctor.check_secret_files(settings, env, None), "secret-files")
    assert {f.fix for f in found} == {f"chmod 600 {tokens}", f"chmod 600 {tls_key}"}
    assert all("its group" in f.message for f in found)


def test_an_env_file_holding_secrets_readable_by_others_is_an_error(tmp_path):
    env_file = private_file(tmp_path / ".env", f"GLM_API_KEY={KEY}\n", mode=0o644)
    found = problems(doctor.check_secret_files(settings_of(tmp_path), {}, env_file), "secret-files")
    assert [f.fix for f in found] == [f"chmod 600 {env_file}"]


def test_a_missing_secret_file_is_an_error(tmp_path):
    env = {"GLM_API_KEY_FILE": str(tmp_path / "absent")}
    settings = settings_of(tmp_path)  # built without the variable: it would not load
    found = problems(doctor.check_secret_files(settings, env, None), "secret-files")
    assert [f.level for f in found] == ["error"] and "cannot be read" in found[0].message


# ---------------------------------------------------------------------------------------
# tokens and bind


def test_a_sqlite_store_other_accounts_can_read_is_a_warning_saying_chmod_600(tmp_path):
    """A store made before exai created it 0600 (under umask 022: 0644, in a 0755 directory)
    is readable by every local account; the doctor said "ok"."""
    settings = settings_of(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    db, wal = state / "exai.sqlite3", state / "exai.sqlite3-wal"
    for file in (db, wal):
        file.write_bytes(b"")
        file.chmod(0o644)
    found = problems(doctor.check_sqlite(settings), "storage")
    assert [f.level for f in found] == ["warn"], found
    assert "0644" in found[0].message and "every conversation" in found[0].message
    assert found[0].fix == f"chmod 600 {db} {wal}"
    for file in (db, wal):
        file.chmod(0o600)
    assert problems(doctor.check_sqlite(settings), "storage") == []


def test_a_kept_session_signing_key_other_accounts_can_read_is_an_error_saying_chmod_600(tmp_path):
    """The key the daemon keeps in its state directory when EXAI_SESSION_SIGNING_KEY is not set
    (ff9e53f) signs every Streamable HTTP session id: an older file or one copied with its
    directory, readable by all, was in no check (the doctor said the secret files were
    private). A configured key leaves the file out of it."""
    from exai.server.mcp_sessions import STORED_KEY_FILE

    settings = settings_of(tmp_path)
    assert problems(doctor.check_secret_files(settings, {}, None), "secret-files") == []
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    key = state / STORED_KEY_FILE
    key.write_bytes(b"0" * 64 + b"\n")
    key.chmod(0o644)
    found = problems(doctor.check_secret_files(settings, {}, None), "secret-files")
    assert [f.level for f in found] == ["error"], found
    assert "session signing key" in found[0].message and "0644" in found[0].message
    assert found[0].fix == f"chmod 600 {key}"
    configured = settings_of(tmp_path, EXAI_SESSION_SIGNING_KEY="k" * 40)
    assert problems(doctor.check_secret_files(configured, {}, None), "secret-files") == []
    key.chmod(0o600)
    assert problems(doctor.check_secret_files(settings, {}, None), "secret-files") == []


def test_the_sqlite_check_reads_the_file_the_store_opens_from_a_percent_encoded_url(tmp_path):
    """``EXAI_STORAGE_URL=sqlite:////…/my%20dir/exai.sqlite3``: the store opens ``my dir``
    (exai.storage.sqlite.sqlite_path unquotes the URL's path), the doctor looked at ``my%20dir``
    — a file that is not there — and said "ok" beside a store every account could read. Its fix
    is a command a shell runs as it is (the path quoted)."""
    state = tmp_path / "my dir"
    state.mkdir()
    db = state / "exai.sqlite3"
    db.write_bytes(b"")
    db.chmod(0o644)
    url = "sqlite:///" + str(tmp_path).replace(" ", "%20") + "/my%20dir/exai.sqlite3"
    settings = settings_of(tmp_path, EXAI_STORAGE_URL=url)
    found = problems(doctor.check_sqlite(settings), "storage")
    assert [f.level for f in found] == ["warn"], found
    assert found[0].fix == f"chmod 600 '{db}'"
    db.chmod(0o600)
    assert problems(doctor.check_sqlite(settings), "storage") == []


def test_a_secret_files_chmod_fix_is_a_command_a_shell_runs_as_it_is(tmp_path):
    """``chmod 600 /x/my dir/tokens`` (the fix exai doctor and exai serve's
    config.secret_file_exposed gave) is a chmod of two files that are not it."""
    tokens = tmp_path / "my dir" / "tokens"
    tokens.parent.mkdir()
    tokens.write_text("alice:x\n")
    tokens.chmod(0o644)
    problem = doctor.secret_file_problem("EXAI_TOKENS_FILE", str(tokens))
    assert problem is not None and problem[1] == f"chmod 600 '{tokens}'"


def test_a_short_plain_token_is_an_error_naming_the_entry_never_the_value(tmp_path):
    digest = hashlib.sha256(b"whatever").hexdigest()
    settings = settings_of(
        tmp_path, EXAI_TOKENS=f"alice:{SHORT_TOKEN},bob:{LONG_TOKEN},carol:sha256:{digest}"
    )
    found = problems(doctor.check_tokens(settings), "tokens")
    assert [f.level for f in found] == ["error"]
    assert "'alice'" in found[0].message and "16 characters" in found[0].message
    assert "exai token new alice" in found[0].fix
    assert_no_secret(found)


def test_a_malformed_token_entry_is_an_error(tmp_path):
    settings = settings_of(tmp_path, EXAI_TOKENS=f"alice:{LONG_TOKEN},bob:sha256:nothex")
    found = problems(doctor.check_tokens(settings), "tokens")
    assert [f.level for f in found] == ["error"] and "entry 2" in found[0].message


def test_a_non_loopback_bind_without_tls_or_tokens_is_an_error_saying_what_it_exposes(tmp_path):
    settings = settings_of(tmp_path, EXAI_HOST="0.0.0.0")
    found = problems(doctor.check_bind(settings), "bind")
    assert [f.level for f in found] == ["error", "error"]
    assert "provider keys" in found[0].message and "EXAI_TOKENS_FILE" in found[0].fix
    assert "clear text" in found[1].message and "EXAI_TLS_CERT" in found[1].fix


def test_an_allowed_insecure_bind_is_a_warning(tmp_path):
    settings = settings_of(
        tmp_path, EXAI_HOST="0.0.0.0", EXAI_TOKENS=LONG_TOKEN, EXAI_ALLOW_INSECURE_BIND="1"
    )
    assert [f.level for f in problems(doctor.check_bind(settings), "bind")] == ["warn"]


def test_a_plain_ws_client_url_to_another_machine_is_a_warning(tmp_path):
    settings = settings_of(tmp_path, EXAI_URL="ws://10.1.2.3:8079/mcp")
    found = problems(doctor.check_bind(settings), "bind")
    assert [f.level for f in found] == ["warn"] and "wss://" in found[0].fix


@pytest.mark.parametrize(
    ("env", "flagged"),
    [
        ({"EXAI_PORT": "9123", "EXAI_URL": "ws://127.0.0.1:8079/mcp"}, "port 8079 where"),
        ({"EXAI_HOST": "10.1.2.3", "EXAI_URL": "ws://10.9.9.9:8079/mcp"}, "host 10.9.9.9"),
        ({"EXAI_URL": "wss://127.0.0.1:8079/mcp"}, "no EXAI_TLS_CERT"),
        ({"EXAI_URL": "ws://127.0.0.1:8079/"}, "the MCP door is /mcp"),
        ({"EXAI_PORT": "0"}, "EXAI_PORT=0"),
    ],
)
def test_a_client_url_that_misses_the_listener_is_flagged(tmp_path, env, flagged):
    settings = settings_of(tmp_path, **env)
    (found,) = problems(doctor.check_client_url(settings), "client-url")
    assert found.level == "warn" and flagged in found.message


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"EXAI_PORT": "9123"},  # the client side follows EXAI_PORT
        {"EXAI_PORT": "9123", "EXAI_URL": "ws://localhost:9123/mcp"},
        {"EXAI_HOST": "0.0.0.0", "EXAI_URL": "ws://127.0.0.1:8079/mcp"},
    ],
)
def test_a_client_url_that_reaches_the_listener_is_ok(tmp_path, env):
    settings = settings_of(tmp_path, **env)
    assert problems(doctor.check_client_url(settings), "client-url") == []


def test_tls_files_that_do_not_load_are_an_error(tmp_path):
    bogus = private_file(tmp_path / "x.pem", "not pem")
    settings = settings_of(tmp_path, EXAI_TLS_CERT=str(bogus), EXAI_TLS_KEY=str(bogus))
    found = problems(doctor.check_bind(settings), "bind")
    assert [f.level for f in found] == ["error"] and "do not load" in found[0].message


# ---------------------------------------------------------------------------------------
# stores


@pytest.mark.anyio
async def test_an_unreachable_postgres_is_an_error_without_its_password(tmp_path):
    url = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{free_port()}/test"
    found = await doctor.check_storage(settings_of(tmp_path, EXAI_STORAGE_URL=url))
    assert [f.level for f in found] == ["error"] and "unreachable" in found[0].message
    assert "postgres:***@127.0.0.1" in found[0].message
    assert_no_secret(found)


@pytest.mark.postgres
@pytest.mark.anyio
async def test_a_reachable_postgres_answers_select_1(tmp_path):
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    found = await doctor.check_storage(settings_of(tmp_path, EXAI_STORAGE_URL=url))
    assert [(f.level, f.message.endswith("answers SELECT 1")) for f in found] == [("ok", True)]


@pytest.mark.anyio
async def test_an_unreachable_redis_is_an_error_without_its_password(tmp_path):
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    found = await doctor.check_redis(settings_of(tmp_path, EXAI_REDIS_URL=url))
    assert [f.level for f in found] == ["error"] and "unreachable" in found[0].message
    assert_no_secret(found)


@pytest.mark.redis
@pytest.mark.anyio
async def test_the_real_redis_answers_ping_with_a_small_clock_skew(tmp_path):
    found = await doctor.check_redis(
        settings_of(tmp_path, EXAI_REDIS_URL="redis://127.0.0.1:6379/0")
    )
    assert [f.level for f in found] == ["ok"] and "clock skew" in found[0].message


class FakeRedis:
    """A Redis server on loopback: HELLO (RESP3), AUTH, SELECT, PING and TIME, with a chosen
    clock offset; anything else is answered OK."""

    def __init__(self, *, skew_s: float = 0.0, password: str | None = None, mute: bool = False):
        self.skew_s = skew_s
        self.password = password
        self.mute = mute
        self.port = 0

    async def serve(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                try:
                    buf += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                while (cmd := self._parse(buf)) is not None:
                    args, buf = cmd
                    if not self.mute:
                        await stream.send(self._answer(args))

    @staticmethod
    def _parse(buf: bytes) -> tuple[list[str], bytes] | None:
        if b"\r\n" not in buf:
            return None
        head, rest = buf.split(b"\r\n", 1)
        args = []
        for _ in range(int(head[1:])):
            if rest.count(b"\r\n") < 2:
                return None
            _len, value, rest = rest.split(b"\r\n", 2)
            args.append(value.decode())
        return args, rest

    def _answer(self, args: list[str]) -> bytes:
        cmd = args[0].upper()
        if cmd == "HELLO":  # redis-py's RESP3 handshake, with AUTH user password when given
            if "AUTH" in args and args[-1] != self.password:
                return b"-WRONGPASS invalid username-password pair\r\n"
            return b"%1\r\n+proto\r\n:3\r\n"
        if cmd == "AUTH":
            return b"+OK\r\n" if args[-1] == self.password else b"-WRONGPASS invalid password\r\n"
        if cmd == "PING":
            return b"+PONG\r\n"
        if cmd == "TIME":
            now = time.time() + self.skew_s
            sec, usec = str(int(now)).encode(), str(int(now % 1 * 1e6)).encode()
            return b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(sec), sec, len(usec), usec)
        return b"+OK\r\n"


@pytest.mark.anyio
async def test_clock_skew_against_redis_time_is_an_error(tmp_path):
    fake = FakeRedis(skew_s=3600.0)
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve)
        settings = settings_of(tmp_path, EXAI_REDIS_URL=f"redis://127.0.0.1:{fake.port}/0")
        found = await doctor.check_redis(settings)
        tg.cancel_scope.cancel()
    assert [f.level for f in found] == ["error"]
    assert "clock skew of +3600" in found[0].message and "NTP" in found[0].fix


@pytest.mark.anyio
async def test_a_refused_redis_password_is_an_error_that_does_not_repeat_it(tmp_path):
    fake = FakeRedis(password="the-right-one")
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve)
        url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{fake.port}/0"
        found = await doctor.check_redis(settings_of(tmp_path, EXAI_REDIS_URL=url))
        tg.cancel_scope.cancel()
    assert [f.level for f in found] == ["error"] and "refused the password" in found[0].message
    assert_no_secret(found)


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
@pytest.mark.anyio
async def test_a_redis_that_never_answers_is_an_error_within_the_bound(tmp_path):
    fake = FakeRedis(mute=True)
    async with anyio.create_task_group() as tg:
        await tg.start(fake.serve)
        settings = settings_of(tmp_path, EXAI_REDIS_URL=f"redis://127.0.0.1:{fake.port}/0")
        start = anyio.current_time()
        found = await doctor.check_redis(settings)
        elapsed = anyio.current_time() - start
        tg.cancel_scope.cancel()
    assert [f.level for f in found] == ["error"] and "did not answer" in found[0].message
    assert elapsed == pytest.approx(doctor.STORE_S, abs=0.01)


# ---------------------------------------------------------------------------------------
# providers and the daemon


def provider_env(base_url: str, key: str) -> dict[str, str]:
    return {
        "EXAI_PROVIDER_MOCK_BASE_URL": base_url,
        "EXAI_PROVIDER_MOCK_API_KEY": key,
        "EXAI_PROVIDER_MOCK_MODELS": "mock-fast",
    }


@pytest.mark.anyio
async def test_a_provider_that_refuses_its_key_is_an_error_saying_key_refused(tmp_path):
    async with MockUpstream(api_key="sk-the-accepted-key-0000") as mock:
        settings = settings_of(tmp_path, **provider_env(mock.base_url, KEY))
        found = problems(await doctor.check_providers(settings), "provider:mock")
    assert [f.level for f in found] == ["error"]
    assert "key refused (HTTP 401" in found[0].message
    assert "EXAI_PROVIDER_MOCK_API_KEY" in found[0].fix
    assert_no_secret(found)


@pytest.mark.anyio
async def test_a_provider_that_accepts_its_key_passes(tmp_path):
    async with MockUpstream(api_key=KEY) as mock:
        settings = settings_of(tmp_path, **provider_env(mock.base_url, KEY))
        found = await doctor.check_providers(settings)
    assert [(f.check, f.level) for f in found] == [("provider:mock", "ok")]
    assert_no_secret(found)


@pytest.mark.anyio
async def test_an_unreachable_provider_is_an_error(tmp_path):
    base = f"http://127.0.0.1:{free_port()}/v1"
    found = problems(
        await doctor.check_providers(settings_of(tmp_path, **provider_env(base, KEY))),
        "provider:mock",
    )
    assert [f.level for f in found] == ["error"] and "unreachable" in found[0].message


class OpenBreakerProviders:
    """Stands in for the provider router in a daemon's services: one breaker open."""

    def status(self) -> dict[str, Any]:
        return {
            "providers": {
                "kimi": {
                    "breaker": {"state": "open", "failure_rate": 1.0},
                    "last_error": "HTTP 503",
                },
                "glm": {"breaker": {"state": "closed", "failure_rate": 0.0}},
            }
        }


@pytest.mark.anyio
async def test_a_running_daemon_reports_each_providers_breaker_state(tmp_path):
    services = {"providers": OpenBreakerProviders()}
    async with running_daemon(make_settings(tmp_path), services=services) as daemon:
        found = await doctor.check_daemon(make_settings(tmp_path, url=daemon.url))
    by_check = {f.check: f for f in found}
    assert by_check["daemon"].level == "ok"
    assert by_check["provider:kimi"].level == "warn"
    assert "breaker for kimi is open" in by_check["provider:kimi"].message
    assert by_check["provider:glm"].level == "ok"


@pytest.mark.anyio
async def test_no_daemon_at_the_url_is_not_a_problem(tmp_path):
    settings = make_settings(tmp_path, url=f"ws://127.0.0.1:{free_port()}/mcp")
    found = await doctor.check_daemon(settings)
    assert [f.level for f in found] == ["ok"] and "no daemon" in found[0].message


@pytest.mark.anyio
async def test_a_daemon_that_answers_is_never_reported_as_absent_or_as_refusing_an_unset_token(
    tmp_path,
):
    """Two untrue lines of the daemon check: with ``EXAI_URL`` on the old op protocol's door
    (no ``/mcp``) it said "no daemon answering … (not running?)" next to a running daemon; with
    no ``EXAI_TOKEN`` set it said the daemon "refused EXAI_TOKEN"."""
    settings = make_settings(tmp_path, tokens=Secret(f"alice:{LONG_TOKEN}"))
    async with running_daemon(settings) as daemon:
        root = daemon.url.removesuffix("/mcp")
        wrong_door = await doctor.check_daemon(make_settings(tmp_path, url=root))
        no_token = await doctor.check_daemon(make_settings(tmp_path, url=daemon.url))
    assert [f.level for f in wrong_door] == ["warn"], wrong_door
    assert f"connect to {root}/mcp" in wrong_door[0].message
    assert [f.level for f in no_token] == ["warn"], no_token
    assert "EXAI_TOKEN is not set" in no_token[0].message
    assert "refused EXAI_TOKEN" not in no_token[0].message


# ---------------------------------------------------------------------------------------
# the whole report


def prepared_problems(tmp_path: Path) -> dict[str, str]:
    """A directory and environment with every problem doctor knows about."""
    git(tmp_path, "init", "-q")
    (tmp_path / ".env").write_text("EXAI_LOG_LEVEL=info\n")
    git(tmp_path, "add", ".env")
    key_file = private_file(tmp_path / "kimi.key", KEY, mode=0o644)
    return {
        "EXAI_STATE_DIR": str(tmp_path / "state"),
        "EXAI_HOST": "0.0.0.0",
        "EXAI_TOKENS": f"alice:{SHORT_TOKEN}",
        "KIMI_API_KEY_FILE": str(key_file),
        "KIMI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "EXAI_STORAGE_URL": f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:{free_port()}/test",
        "EXAI_REDIS_URL": f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
        "EXAI_URL": f"ws://127.0.0.1:{free_port()}/mcp",
        "PATH": os.environ["PATH"],
    }


def test_doctor_flags_every_prepared_problem_with_its_fix_and_exits_1(tmp_path):
    out = io.StringIO()
    code = main([], environ=prepared_problems(tmp_path), cwd=tmp_path, out=out)
    report = out.getvalue()
    assert code == 1
    for check in ("git", "secret-files", "tokens", "bind", "storage", "redis", "provider:kimi"):
        assert f"ERROR {check}:" in report, check
    assert report.count("fix: ") >= 7
    for value in SECRETS:
        assert value not in report


def test_doctor_passes_a_clean_directory_with_exit_0(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text(".env\n")
    (tmp_path / ".env.example").write_text("KIMI_API_KEY=\n")
    git(tmp_path, "add", ".gitignore", ".env.example")
    tokens = private_file(
        tmp_path / "tokens", f"laptop:sha256:{hashlib.sha256(LONG_TOKEN.encode()).hexdigest()}\n"
    )
    environ = {
        "EXAI_STATE_DIR": str(tmp_path / "state"),
        "EXAI_TOKENS_FILE": str(tokens),
        # no daemon there; the client side derives its URL from EXAI_PORT, so they agree
        "EXAI_PORT": str(free_port()),
        "PATH": os.environ["PATH"],
    }

    async def with_a_provider() -> tuple[int, str]:
        async with MockUpstream(api_key=KEY) as mock:
            key_file = private_file(tmp_path / "mock.key", KEY)
            env = {
                **environ,
                "EXAI_PROVIDER_MOCK_BASE_URL": mock.base_url,
                "EXAI_PROVIDER_MOCK_API_KEY_FILE": str(key_file),
            }
            out = io.StringIO()
            code = await anyio.to_thread.run_sync(
                lambda: main(["--strict"], environ=env, cwd=tmp_path, out=out)
            )
            return code, out.getvalue()

    code, report = anyio.run(with_a_provider, backend="trio")
    assert code == 0, report
    assert "ERROR" not in report and "WARN" not in report
    assert "everything checked is fine" in report
    assert KEY not in report


def test_a_warning_fails_only_with_strict(tmp_path):
    environ = {
        "EXAI_STATE_DIR": str(tmp_path / "state"),
        "PATH": os.environ["PATH"],
    }
    # no provider configured: a warning
    assert main(["--offline"], environ=environ, cwd=tmp_path, out=io.StringIO()) == 0
    out = io.StringIO()
    assert (
        main(
            [],
            environ={**environ, "EXAI_URL": f"ws://127.0.0.1:{free_port()}/mcp"},
            cwd=tmp_path,
            out=out,
        )
        == 0
    )
    assert "WARN  providers:" in out.getvalue()
    assert (
        main(
            ["--strict"],
            environ={**environ, "EXAI_URL": f"ws://127.0.0.1:{free_port()}/mcp"},
            cwd=tmp_path,
            out=io.StringIO(),
        )
        == 1
    )


def test_settings_that_do_not_load_exit_2_with_the_closest_name(tmp_path):
    out = io.StringIO()
    code = main(["--offline"], environ={"EXAI_MAX_INFLITE": "3"}, cwd=tmp_path, out=out)
    assert code == 2
    assert "EXAI_MAX_INFLIGHT" in out.getvalue()


def test_findings_render_each_problem_followed_by_its_fix():
    text = render(
        [
            Finding(level="ok", check="git", message="fine"),
            Finding(level="error", check="tokens", message="short", fix="make a longer one"),
        ]
    )
    lines = text.splitlines()
    assert lines[1:4] == [
        "  ok    git: fine",
        "  ERROR tokens: short",
        "         fix: make a longer one",
    ]
    assert lines[-1] == "1 error(s), 0 warning(s)"
