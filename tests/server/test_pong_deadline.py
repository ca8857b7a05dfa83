"""A peer that sends WebSocket pings and reads nothing is closed at the send deadline.

Found by the attack pass on the writer that runs only while something is queued (6421846); it is
older than that. trio-websocket's reader writes each pong itself, with no deadline: once the
peer's unread pongs filled the socket's buffer, the connection's reader waited in a pong's
write for ever — it read nothing more, no writer ran (nothing was queued for one), and the
session was never closed (1008 is for a peer that stops reading, and ``send_timeout_s`` bounds
every other write). Seen with ``send_timeout_s`` = 1: 1,100-1,300 pings of 125 bytes, then the
session still open 15 s later, the kernel holding its unread pongs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.helpers import Rpc, make_settings, raw_upgrade, running_daemon, ws, ws_frame

pytestmark = pytest.mark.anyio


async def _connect(url: str) -> trio.SocketStream:
    """A WebSocket client over a TCP socket with a small receive buffer, its upgrade answered."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    stream, status, _, rest = await raw_upgrade(host, int(port), rcvbuf=4096)
    assert status == 101 and rest == b""
    return stream


async def test_a_peer_that_pings_and_reads_nothing_is_closed_at_the_send_deadline(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, send_timeout_s=0.5)
    async with running_daemon(settings) as d, ws(d) as bystander:
        stream = await _connect(d.url)
        ping = ws_frame(b"p" * 125, opcode=0x9)
        with trio.fail_after(30):
            while len(d.sessions) < 2:
                await trio.sleep(0.01)
        # pings until the daemon stops reading them (its pongs fill the socket's buffers)
        sent = 0
        with trio.fail_after(60):
            while True:
                with trio.move_on_after(1.0) as blocked:
                    try:
                        await stream.send_all(ping)
                    except trio.BrokenResourceError:
                        break  # (closed by the daemon meanwhile)
                if blocked.cancelled_caught:
                    break
                sent += 1
        assert sent > 0
        with trio.fail_after(20):
            while d.stats.rejections.get("send_timeout", 0) == 0 or len(d.sessions) > 1:
                await trio.sleep(0.05)
        await stream.aclose()
        assert (await Rpc(bystander).request("ping"))["result"] == {}
    assert d.budget.charged_bytes == 0
