"""The harness itself: a live daemon answers a well-behaved client and reports on itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.adversarial.harness import live_daemon

pytestmark = pytest.mark.anyio


async def test_a_live_daemon_serves_and_reports_its_memory_and_readiness(tmp_path: Path) -> None:
    async with live_daemon(tmp_path) as daemon:
        await daemon.assert_serves()
        assert daemon.rss_bytes() > 10 * 1024 * 1024
        assert await daemon.ready()
        status = await daemon.status()
        assert status["daemon"]["version"]
        reply = await daemon.call("sleep", {"seconds": 0})
        assert reply["result"]["content"][0]["text"] == "slept"
