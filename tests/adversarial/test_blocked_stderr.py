"""Issue 11.7: no blocking call on the event loop — here, a log line on a full pipe.

Before: logging wrote to stderr synchronously on the event loop (two lines per call at INFO).
When whatever reads the daemon's stderr (a terminal, a supervisor, a pipe) stops reading, the
pipe fills and the next write blocks the loop: every client freezes. Now records go through a
bounded queue to a writer thread; a full queue drops and counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon

pytestmark = pytest.mark.anyio

#: calls whose log lines (about 250 bytes each) far exceed a 64 KiB pipe buffer
CALLS = 600


async def test_a_daemon_whose_stderr_nobody_reads_keeps_serving(tmp_path: Path) -> None:
    async with live_daemon(
        tmp_path,
        EXAI_LOG_LEVEL="info",
        EXAI_SESSION_RATE_PER_S="100000",
        EXAI_SESSION_BURST="100000",
    ) as daemon:
        await daemon.assert_serves()
        daemon.pause_stderr()
        async with daemon.client() as rpc:
            with trio.fail_after(SERVED_WITHIN_S):
                for i in range(CALLS):
                    reply = await rpc.call("version", id=i)
                    assert reply["result"]["isError"] is False
        await daemon.assert_serves()
        daemon.resume_stderr()
        # nothing was lost: the queued lines come out once the pipe is read again
        with trio.fail_after(SERVED_WITHIN_S):
            while len(daemon.log_events("call.finished")) < CALLS:
                await trio.sleep(0.1)
