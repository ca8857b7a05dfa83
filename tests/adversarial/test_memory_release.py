"""Issue 11.3: after a memory spike the daemon admits work again by itself.

Before: with ``EXAI_MEMORY_LIMIT_BYTES`` set low, one spike stopped admission, and since a
Python heap rarely gives memory back, RSS never fell below the low watermark: the daemon
refused everything until restarted. Now admission is decided on the memory exai accounts for
(pending requests and unwritten answers), and RSS is a backstop that sheds caches and stops
new work only while something is pending.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.adversarial.harness import SERVED_WITHIN_S, LiveDaemon, live_daemon
from tests.helpers import raw_upgrade, ws_frame

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def test_admission_stops_during_a_memory_spike_and_resumes_without_a_restart(
    tmp_path: Path,
) -> None:
    # the idle size of a daemon like the one under test, to put its limit just above it
    async with live_daemon(tmp_path / "probe", EXAI_LOG_LEVEL="warning") as probe:
        await probe.call("blob", {"bytes": MiB})
        await probe.assert_serves()
        idle = probe.rss_bytes()
    # idle sits between the watermarks (0.8 and 0.9 of the limit): a spike crosses the high
    # one, and RSS can never fall back under the low one
    limit = int(idle / 0.85)
    async with live_daemon(
        tmp_path,
        EXAI_MEMORY_LIMIT_BYTES=str(limit),
        EXAI_MEMORY_CHECK_INTERVAL_S="0.2",
        EXAI_RESULT_CACHE_MAX_BYTES=str(MiB),
        EXAI_SEND_TIMEOUT_S="60",
        EXAI_SESSION_RATE_PER_S="1000",
        EXAI_SESSION_BURST="1000",
        EXAI_LOG_LEVEL="warning",
    ) as daemon:
        await daemon.assert_serves()
        # the spike: calls with large answers on a connection that does not read them yet
        stream, status, _, _ = await raw_upgrade("127.0.0.1", _port(daemon.url))
        assert status == 101
        await stream.send_all(
            b"".join(
                ws_frame(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": i,
                            "method": "tools/call",
                            "params": {"name": "blob", "arguments": {"bytes": 2 * MiB}},
                        }
                    ).encode()
                )
                for i in range(40)
            )
        )
        with trio.fail_after(SERVED_WITHIN_S):
            while await _attempt(daemon) == "served":
                await trio.sleep(0.1)
        assert not await daemon.ready()
        # the spike ends: the client goes away with its answers unread
        await trio.aclose_forcefully(stream)
        with trio.fail_after(SERVED_WITHIN_S):
            while await _attempt(daemon) == "overloaded":
                await trio.sleep(0.2)
        # the same process serves again (no restart), and says it is ready
        await daemon.assert_serves()
        assert await daemon.ready()


async def _attempt(daemon: LiveDaemon) -> str:
    """A well-behaved call: "served", or "overloaded" (refused call or 503 connection)."""
    try:
        reply = await daemon.call("version")
    except ConnectionRejected as exc:
        assert exc.status_code == 503
        return "overloaded"
    except ConnectionClosed as exc:  # its frames did not fit the budget: try again later
        assert exc.reason.code == 1013
        return "overloaded"
    if "result" in reply:
        return "served"
    assert reply["error"]["data"]["reason"] == "overloaded", reply
    return "overloaded"
