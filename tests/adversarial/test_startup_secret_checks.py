"""Issues 12.3 and 12.10: what ``exai serve`` does at start with secret files and tokens.

Each test runs a real ``exai serve`` process: an empty, comment-only or unreadable secret file,
or a token that is not printable ASCII, is a start-up error (exit 2) whose message names the
variable (never the secret); a tokens file other accounts can read starts with a warning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import live_daemon
from tests.helpers import REPO, subprocess_env

pytestmark = pytest.mark.anyio

TOKEN = "t-0123456789abcdef0123456789abcdef"


async def serve_until_exit(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``exai serve``; it must exit by itself (a daemon that starts is a failure)."""
    cmd = [sys.executable, "-m", "exai.cli", "serve"]
    full_env = subprocess_env(tmp_path, **env)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd, env=full_env, cwd=str(REPO), capture_output=True, text=True, timeout=30
        )

    try:
        return await trio.to_thread.run_sync(run)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"exai serve started instead of refusing: {exc.stderr!r}") from None


@pytest.mark.parametrize(
    ("variable", "content"),
    [
        ("EXAI_TOKENS_FILE", ""),
        ("EXAI_TOKENS_FILE", "\n  \n"),
        ("EXAI_TOKENS_FILE", "# alice:sha256:…  (commented out)\n"),
        ("KIMI_API_KEY_FILE", ""),
        ("EXAI_PROVIDER_MOCK_API_KEY_FILE", "\n"),
    ],
    ids=[
        "empty-tokens",
        "blank-tokens",
        "comment-only-tokens",
        "empty-kimi-key",
        "empty-extra-key",
    ],
)
async def test_an_empty_secret_file_is_a_startup_error_naming_the_variable(
    tmp_path: Path, variable: str, content: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(content)
    secret.chmod(0o600)
    extra = {"EXAI_PROVIDER_MOCK_BASE_URL": "http://127.0.0.1:9/v1"} if "MOCK" in variable else {}
    done = await serve_until_exit(tmp_path, **{variable: str(secret)}, **extra)
    assert done.returncode == 2, done.stderr
    assert variable in done.stderr
    assert "listening" not in done.stderr


@pytest.mark.parametrize("variable", ["EXAI_TOKENS_FILE", "GLM_API_KEY_FILE"])
async def test_an_unreadable_secret_file_is_a_startup_error_naming_the_variable(
    tmp_path: Path, variable: str
) -> None:
    # a directory where a file is expected (root can read any file, so no chmod 000 here)
    done = await serve_until_exit(tmp_path, **{variable: str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert variable in done.stderr


async def test_a_token_that_is_not_printable_ascii_is_a_startup_error(tmp_path: Path) -> None:
    done = await serve_until_exit(
        tmp_path, EXAI_TOKENS="alice:" + TOKEN + ",bob:pässwort-0123456789abcdef0123456789"
    )
    assert done.returncode == 2, done.stderr
    assert "token entry 2" in done.stderr and "ASCII" in done.stderr
    assert "pässwort" not in done.stderr


def test_a_client_token_that_is_not_printable_ascii_stops_the_bridge_at_start(
    tmp_path: Path,
) -> None:
    env = subprocess_env(tmp_path, EXAI_TOKEN="tökén-0123456789abcdef0123456789")
    done = subprocess.run(
        [sys.executable, "-m", "exai.cli", "bridge"],
        env=env,
        cwd=str(REPO),
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "EXAI_TOKEN" in done.stderr and "ASCII" in done.stderr
    assert "tökén" not in done.stderr


async def test_a_tokens_file_other_accounts_can_read_is_warned_about_at_start(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    tokens.chmod(0o644)
    async with live_daemon(tmp_path, EXAI_TOKENS_FILE=str(tokens)) as daemon:
        warned = await daemon.wait_log_events("config.secret_file_exposed")
        assert [w["variable"] for w in warned] == ["EXAI_TOKENS_FILE"]
        assert "readable by group and others" in warned[0]["problem"]
        assert warned[0]["fix"] == f"chmod 600 {tokens}"
        await daemon.assert_serves(token=TOKEN)
    tokens.chmod(0o600)
    async with live_daemon(tmp_path, EXAI_TOKENS_FILE=str(tokens)) as daemon:
        await daemon.assert_serves(token=TOKEN)
        # logged after the start-up checks: once it is read, a warning would have been too
        await daemon.wait_log_events("daemon.ready")
        assert daemon.log_events("config.secret_file_exposed") == []


async def test_a_tokens_file_other_accounts_can_read_is_warned_about_on_reload(
    tmp_path: Path,
) -> None:
    """The start's warning held at start only: a tokens file made readable by every account
    (or replaced by one that is) and taken in by ``SIGHUP`` was reloaded without a word."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    tokens.chmod(0o600)
    async with live_daemon(tmp_path, EXAI_TOKENS_FILE=str(tokens)) as daemon:
        await daemon.wait_log_events("daemon.ready")
        tokens.chmod(0o644)
        os.kill(daemon.pid, signal.SIGHUP)
        await daemon.wait_log_events("config.reloaded")
        warned = await daemon.wait_log_events("config.secret_file_exposed")
        assert [w["variable"] for w in warned] == ["EXAI_TOKENS_FILE"]
        assert warned[0]["fix"] == f"chmod 600 {tokens}"
        await daemon.assert_serves(token=TOKEN)


async def test_a_tokens_file_made_readable_by_others_is_warned_about_without_a_sighup(
    tmp_path: Path,
) -> None:
    """``chmod 644`` of a watched tokens file changes neither its inode, size nor mtime — all
    the watcher looked at — so no reload read it and the exposure went unreported until some
    other change (3416611 warns on every reload). Its mode is part of what is watched now."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    tokens.chmod(0o600)
    async with live_daemon(
        tmp_path, EXAI_TOKENS_FILE=str(tokens), EXAI_SECRET_WATCH_INTERVAL_S="0.2"
    ) as daemon:
        await daemon.wait_log_events("daemon.ready")
        tokens.chmod(0o644)
        warned = await daemon.wait_log_events("config.secret_file_exposed")
        assert [w["variable"] for w in warned] == ["EXAI_TOKENS_FILE"]
        await daemon.assert_serves(token=TOKEN)
