"""What an operator does to a real ``exai serve`` that broke it (each test failed on the code
before its fix): SIGHUP after the config file was overwritten with bytes that are not UTF-8.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, LiveDaemon, live_daemon

pytestmark = pytest.mark.anyio


async def _wait_event(daemon: LiveDaemon, name: str, count: int) -> None:
    with trio.fail_after(SERVED_WITHIN_S):
        while len(daemon.log_events(name)) < count:
            assert daemon.alive(), "the daemon died:\n" + "\n".join(daemon.stderr_lines[-30:])
            await trio.sleep(0.05)


@pytest.mark.parametrize("broken", ["config", "dotenv"])
async def test_sighup_with_a_config_file_that_is_not_utf8_keeps_the_daemon_and_its_settings(
    tmp_path: Path, broken: str
) -> None:
    """A config file caught half-copied (or overwritten with anything not UTF-8), then SIGHUP:
    the reload is refused and logged, the daemon serves on with its settings — it used to die
    of the UnicodeDecodeError — and the next good file is applied."""
    config = tmp_path / "exai.toml"
    config.write_text("max_inflight = 32\n")
    dotenv = tmp_path / "exai.env"
    dotenv.write_text("EXAI_MAX_INFLIGHT=32\n")
    async with live_daemon(tmp_path, EXAI_CONFIG=str(config), EXAI_ENV_FILE=str(dotenv)) as daemon:
        await daemon.assert_serves()
        target = config if broken == "config" else dotenv
        target.write_bytes(b"max_inflight = 1\n\xff\xfe not text \x00\n")
        os.kill(daemon.pid, signal.SIGHUP)
        await _wait_event(daemon, "config.reload_failed", 1)
        failed = daemon.log_events("config.reload_failed")[0]
        assert "UTF-8" in failed["reason"], failed
        await daemon.assert_serves()
        target.write_text("max_inflight = 16\n" if broken == "config" else "EXAI_MAX_INFLIGHT=16\n")
        os.kill(daemon.pid, signal.SIGHUP)
        await _wait_event(daemon, "config.reloaded", 1)
        await daemon.assert_serves()
