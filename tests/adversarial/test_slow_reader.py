"""Issue 11.1: a client that sends calls with large answers and never reads them.

Before: each request started a responder task before any slot, answers waited without bound
in the session's queue, and the writer waited forever: one such client drove the daemon to
13 GB. Now a session holds at most ``EXAI_SESSION_MAX_PENDING`` requests and
``EXAI_SESSION_MAX_PENDING_BYTES`` bytes not yet answered (the rest are refused at once with
``overloaded``), and a writer that makes no progress for ``EXAI_SEND_TIMEOUT_S`` closes the
connection with 1008 and frees what it held.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, LiveDaemon, live_daemon
from tests.helpers import raw_upgrade, ws_frame

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
ANSWER_BYTES = 512 * 1024
CALLS = 100


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def _wait_status(daemon: LiveDaemon, predicate, what: str) -> dict:  # type: ignore[no-untyped-def]
    status: dict = {}
    with trio.move_on_after(SERVED_WITHIN_S):
        while True:
            status = (await daemon.status())["daemon"]
            if predicate(status):
                return status
            await trio.sleep(0.2)
    raise AssertionError(f"{what}: {json.dumps(status)[:3000]}")


async def _sample_peak(daemon: LiveDaemon, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], daemon.rss_bytes())
        await trio.sleep(0.05)


async def test_a_client_that_never_reads_is_closed_and_frees_its_memory(tmp_path: Path) -> None:
    async with live_daemon(
        tmp_path,
        EXAI_SEND_TIMEOUT_S="2",
        EXAI_SESSION_MAX_PENDING_BYTES=str(8 * MiB),
        EXAI_RESULT_CACHE_MAX_BYTES=str(8 * MiB),
        EXAI_SESSION_RATE_PER_S="1000",
        EXAI_SESSION_BURST="1000",
        EXAI_LOG_LEVEL="warning",
    ) as daemon:
        # warm up what a call of this size allocates once, then take the idle figure
        await daemon.call("blob", {"bytes": ANSWER_BYTES})
        await daemon.assert_serves()
        idle = daemon.rss_bytes()
        peak = [idle]
        async with trio.open_nursery() as sampler:
            sampler.start_soon(_sample_peak, daemon, peak)
            stream, status, _, _ = await raw_upgrade("127.0.0.1", _port(daemon.url))
            assert status == 101
            frames = b"".join(
                ws_frame(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": i,
                            "method": "tools/call",
                            "params": {"name": "blob", "arguments": {"bytes": ANSWER_BYTES}},
                        }
                    ).encode()
                )
                for i in range(CALLS)
            )
            await stream.send_all(frames)  # … and never reads a byte
            await daemon.assert_serves()  # a well-behaved client is served meanwhile
            st = await _wait_status(
                daemon,
                lambda s: s["rejections"].get("send_timeout", 0) >= 1,
                "the connection that never reads was never closed",
            )
            # the attacker's requests beyond its pending bound were refused at once
            assert st["rejections"].get("overloaded", 0) >= 1
            await daemon.assert_serves()
            # everything it held was given back
            st = await _wait_status(
                daemon,
                # (the status call asking is itself pending: a few hundred bytes)
                lambda s: s["pending"]["charged_bytes"] < 4096 and s["connections"]["open"] <= 1,
                "the closed connection's charges were not given back",
            )
            await trio.aclose_forcefully(stream)
            sampler.cancel_scope.cancel()
        # far from the 100 × 512 KiB (× 2 copies, and again in the result store) it asked for
        assert peak[0] - idle < 64 * MiB, f"peak grew by {(peak[0] - idle) / MiB:.0f} MiB"
        assert st["stored_results_bytes"] <= 8 * MiB
        await daemon.assert_serves()
        settled = daemon.rss_bytes()
        assert settled - idle < 8 * MiB + 24 * MiB, f"settled {(settled - idle) / MiB:.0f} MiB up"
