"""Per-identity and per-address limits hold for the deployment behind HAProxy, not per daemon.

Three daemons, one Redis: a limit of N is N in all — never 3 × N. Per-address limits count the
client's address, which HAProxy passes in ``X-Forwarded-For`` (``option forwardfor``) and the
daemons believe because the balancer is in ``EXAI_TRUSTED_PROXIES``. Clients come from distinct
loopback addresses (127.0.0.2, 127.0.0.3, …: Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
import trio

from tests.helpers import Rpc, ws
from tests.scaleout.cluster import Cluster
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

PLUGIN = ("--plugin", "tests.daemon_tools:register")
ALICE = "tok-alice-0123456789abcdef"


async def _upgrade_from(
    cluster: Cluster, source: str, *extra: str
) -> tuple[trio.SocketStream, int, bytes]:
    """A WebSocket upgrade through the balancer from the loopback address ``source``: the
    stream (kept open: it holds the connection's slot), the status and the body's start."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", cluster.lb.port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    head = [
        "GET /mcp HTTP/1.1",
        f"Host: 127.0.0.1:{cluster.lb.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: mcp",
        *extra,
    ]
    await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    status = int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else 0
    if status != 101:  # a refusal has a body
        with trio.move_on_after(5):
            while b"}" not in buf and (chunk := await stream.receive_some(4096)):
                buf += chunk
    return stream, status, buf.partition(b"\r\n\r\n")[2]


async def test_connections_per_address_are_capped_for_the_deployment_not_per_daemon(
    cluster_factory: ClusterFactory,
) -> None:
    async with cluster_factory(
        EXAI_MAX_CONNECTIONS_PER_IP=2, EXAI_TRUSTED_PROXIES="127.0.0.1"
    ) as cluster:
        with trio.fail_after(60):
            held = [await _upgrade_from(cluster, "127.0.0.2") for _ in range(2)]
            assert [status for _, status, _ in held] == [101, 101]
            # the third from the same client is refused, whichever daemon it lands on — and a
            # header the client wrote itself does not make it someone else
            for extra in ((), ("X-Forwarded-For: 127.0.0.99",)):
                stream, status, body = await _upgrade_from(cluster, "127.0.0.2", *extra)
                await stream.aclose()
                assert status == 503 and b"across the deployment" in body, body
            # another client is not affected
            other, status, _ = await _upgrade_from(cluster, "127.0.0.3")
            assert status == 101
            await other.aclose()
            # a closed connection gives its slot back to the deployment
            await held[0][0].aclose()
            while True:
                stream, status, _ = await _upgrade_from(cluster, "127.0.0.2")
                await stream.aclose()
                if status == 101:
                    break
                await trio.sleep(0.05)  # the close reaches the daemon, then Redis
            await held[1][0].aclose()
        # the daemons saw the client's address, not the balancer's
        per_ip = [(await d.status())["daemon"]["connections"] for d in cluster.daemons]
    assert sum(c["rejected"].get("max_connections_per_ip", 0) for c in per_ip) >= 2, per_ip


async def test_calls_in_flight_per_identity_are_capped_for_the_deployment(
    cluster_factory: ClusterFactory,
) -> None:
    async with cluster_factory(
        argv=PLUGIN,
        EXAI_TOKENS=f"alice:{ALICE}",
        EXAI_IDENTITY_MAX_INFLIGHT=2,
        EXAI_SLOT_WAIT_S=0.3,
    ) as cluster:
        replies: dict[int, Any] = {}
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                # one session straight to each daemon: each sees a single call of alice's
                for i, d in enumerate(cluster.daemons):

                    async def call(i: int = i, url: str = d.url) -> None:
                        async with ws(url, token=ALICE) as conn:
                            replies[i] = await Rpc(conn).call("sleep", {"seconds": 3})

                    nursery.start_soon(call)
                    await trio.sleep(0.3)  # in order: the third arrives while two run
    outcomes = [
        "ok" if "result" in r else r["error"]["data"]["reason"] for _, r in sorted(replies.items())
    ]
    assert outcomes == ["ok", "ok", "overloaded"], replies
    assert "across the deployment" in replies[2]["error"]["message"]


async def test_messages_per_identity_are_limited_for_the_deployment(
    cluster_factory: ClusterFactory,
) -> None:
    rate, burst = 2.0, 10
    async with cluster_factory(
        EXAI_TOKENS=f"alice:{ALICE}", EXAI_IDENTITY_RATE_PER_S=rate, EXAI_IDENTITY_BURST=burst
    ) as cluster:
        answers: list[dict[str, Any]] = []
        t0 = trio.current_time()
        with trio.fail_after(60):
            for d in cluster.daemons:  # ten messages to each daemon: thirty in all
                async with ws(d.url, token=ALICE) as conn:
                    for i in range(10):
                        await conn.send_message(
                            json.dumps({"jsonrpc": "2.0", "id": i, "method": "ping"})
                        )
                    for _ in range(10):
                        answers.append(json.loads(await conn.get_message()))
        elapsed = trio.current_time() - t0
    ok = sum(1 for a in answers if "result" in a)
    refused = [a for a in answers if "error" in a]
    assert all(a["error"]["data"]["reason"] == "rate_limited" for a in refused)
    # the burst and what refilled meanwhile — not 10 on each of the three daemons
    assert burst <= ok <= burst + rate * elapsed + 1, (ok, elapsed)
