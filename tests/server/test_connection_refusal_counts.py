"""How the refusals of connections are counted (13c3d9a: ``exai_connections_rejected`` counts
every connection refused before a session began, ``exai_rejections`` every refusal), over real
sockets, in-process.

Found by the attack on 13c3d9a:

* a connection refused by the local caps (``max_connections``, ``max_connections_per_ip``,
  counted by :class:`~exai.server.admission.Admission`) was in ``exai_connections_rejected``
  but not in ``exai_rejections`` — which README says counts every refusal, and which has the
  deployment-wide cap's (Redis) refusal of the same kind;
* a WebSocket upgrade the WebSocket library refuses itself (no ``Sec-WebSocket-Key``, a version
  other than 13: it answers 400/426 and closes) was counted as a ``handshake_timeout`` — a
  connection that sent nothing — and only once the handshake bound had passed, the connection's
  task held that long for a client answered at once.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from tests.helpers import make_settings, running_daemon
from tests.httpmcp import http_url

pytestmark = pytest.mark.anyio

KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


def _metric(d: Any, name: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(d.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


async def _connect(d: Any) -> trio.SocketStream:
    parts = urlsplit(http_url(d.url))
    return await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)


async def _read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    with trio.fail_after(10):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


def _upgrade(*lines: bytes) -> bytes:
    return (
        b"GET /mcp HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + b"".join(lines)
        + b"\r\n"
    )


@pytest.mark.parametrize("cap", ["max_connections", "max_connections_per_ip"])
@pytest.mark.parametrize("door", ["http", "websocket"])
async def test_a_connection_over_a_local_cap_is_counted_in_both_metrics(tmp_path, cap, door):
    async with running_daemon(make_settings(tmp_path, **{cap: 1})) as d:
        async with await _connect(d) as held:
            await held.send_all(_upgrade(KEY, b"Sec-WebSocket-Version: 13\r\n"))
            with trio.fail_after(10):
                assert (await held.receive_some(65536)).startswith(b"HTTP/1.1 101 ")
            async with await _connect(d) as refused:
                if door == "http":
                    await refused.send_all(b"GET /mcp HTTP/1.1\r\nHost: localhost\r\n\r\n")
                else:
                    await refused.send_all(_upgrade(KEY, b"Sec-WebSocket-Version: 13\r\n"))
                answer = await _read_to_end(refused)
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert _metric(d, "exai_connections_rejected_total", cap) == 1
        assert _metric(d, "exai_rejections_total", cap) == 1


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        ((b"Sec-WebSocket-Version: 13\r\n",), b"400"),  # no key
        ((KEY, b"Sec-WebSocket-Version: 99\r\n"), b"426"),  # a version it does not speak
    ],
    ids=["no-key", "version-99"],
)
async def test_an_upgrade_the_websocket_library_refuses_is_a_bad_request_counted_at_once(
    tmp_path, lines, status
):
    # (a handshake bound no test waits for: the refusal is counted when it is made)
    async with running_daemon(make_settings(tmp_path, handshake_timeout_s=600.0)) as d:
        async with await _connect(d) as stream:
            await stream.send_all(_upgrade(*lines))
            answer = await _read_to_end(stream)
        assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:200]
        with trio.fail_after(10):
            while not d.stats.connections_rejected:
                await trio.sleep(0.01)
        assert dict(d.stats.connections_rejected) == {"bad_request": 1}
        assert dict(d.stats.rejections) == {"bad_request": 1}
        assert _metric(d, "exai_connections_rejected_total", "bad_request") == 1
        assert d.admission.open == 0
