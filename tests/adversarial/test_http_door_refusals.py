"""Bad input at the Streamable HTTP door of a real ``exai serve`` (issue 15, must-show 4).

Each kind of bad request gets its stated status — before the body is read where the head
already says enough — while a well-behaved client (Streamable HTTP, from another loopback
address) keeps getting answers: wrong content type 415, no acceptable ``Accept`` 406, a body
over ``EXAI_MAX_FRAME_BYTES`` 413 (announced or chunked), bad JSON and batches 400, a foreign
``Origin`` 403, a forged, expired-looking or ended session id 404, two session ids 400, no
token 401; 10,000 concurrent POSTs past the connection caps each get 503 + ``Retry-After``;
an SSE reader that stops reading is cut off after ``EXAI_SEND_TIMEOUT_S`` and its bytes freed.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from exai.server.mcp_sessions import SessionSigner
from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon
from tests.httpmcp import (
    ACCEPT_BOTH,
    McpHttp,
    envelope,
    http_url,
    raw_exchange,
    request_bytes,
)

pytestmark = pytest.mark.anyio

TOKEN = "door-" + "d" * 40
JSON_HEADERS = [("Content-Type", "application/json"), ("Accept", ACCEPT_BOTH)]
AUTH = [("Authorization", f"Bearer {TOKEN}")]
MiB = 1024 * 1024
POST_BURST = Path(__file__).with_name("post_burst.py")


def _ping(**params: Any) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": envelope(), **params}}
    ).encode()


async def _well_behaved(url: str, rounds: int, served: list[int], stop: trio.Event) -> None:
    """A client on 127.0.0.2 calling ``version`` over HTTP until ``stop`` (at least ``rounds``)."""
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(transport=transport, timeout=SERVED_WITHIN_S) as client:
        mcp = McpHttp(client, url, token=TOKEN)
        await mcp.initialize()
        while served[0] < rounds or not stop.is_set():
            with trio.fail_after(SERVED_WITHIN_S):
                reply = await mcp.call("version")
            assert reply["result"]["isError"] is False, reply
            served[0] += 1
            await trio.sleep(0.05)


async def test_each_bad_request_gets_its_status_and_a_client_is_served_throughout(
    tmp_path: Path,
) -> None:
    async with live_daemon(
        tmp_path, EXAI_TOKENS=f"door:{TOKEN}", EXAI_MAX_FRAME_BYTES=str(64 * 1024)
    ) as daemon:
        url = daemon.url
        ended = McpHttp(httpx.AsyncClient(), url, token=TOKEN)
        async with ended.client:
            await ended.initialize()
            assert (
                await ended.client.delete(ended.url, headers=ended.headers())
            ).status_code == 204
        forged = SessionSigner(b"not the deployment's key" * 2, 3600).mint("door", "2025-11-25")
        big = b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"pad":"' + b"x" * 70_000 + b'"}}'
        chunked = (
            request_bytes(url, headers=[*JSON_HEADERS, *AUTH, ("Transfer-Encoding", "chunked")])
            + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (big[:40_000], big[40_000:]))
            + b"0\r\n\r\n"
        )
        cases: list[tuple[str, bytes, int]] = [
            (
                "wrong content type",
                request_bytes(
                    url,
                    _ping(),
                    headers=[("Content-Type", "text/plain"), ("Accept", ACCEPT_BOTH), *AUTH],
                ),
                415,
            ),
            (
                "missing Accept",
                request_bytes(url, _ping(), headers=[("Content-Type", "application/json"), *AUTH]),
                406,
            ),
            (
                "body over the cap (announced)",
                request_bytes(url, big, headers=[*JSON_HEADERS, *AUTH]),
                413,
            ),
            ("body over the cap (chunked)", chunked, 413),
            (
                "bad JSON",
                request_bytes(
                    url, b'{"jsonrpc":"2.0","id":1,"method":', headers=[*JSON_HEADERS, *AUTH]
                ),
                400,
            ),
            (
                "batch",
                request_bytes(
                    url, b"[" + _ping() + b"," + _ping() + b"]", headers=[*JSON_HEADERS, *AUTH]
                ),
                400,
            ),
            (
                "foreign Origin",
                request_bytes(
                    url, _ping(), headers=[*JSON_HEADERS, *AUTH, ("Origin", "https://evil.example")]
                ),
                403,
            ),
            (
                "forged session id",
                request_bytes(
                    url,
                    b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                    headers=[*JSON_HEADERS, *AUTH, ("Mcp-Session-Id", forged.id)],
                ),
                404,
            ),
            (
                "ended session id",
                request_bytes(
                    url,
                    b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
                    headers=[*JSON_HEADERS, *AUTH, ("Mcp-Session-Id", ended.session_id or "")],
                ),
                404,
            ),
            (
                "garbage session id",
                request_bytes(
                    url, b"{}", headers=[*JSON_HEADERS, *AUTH, ("Mcp-Session-Id", "\x01" * 3000)]
                ),
                404,
            ),
            (
                "two session ids",
                request_bytes(
                    url,
                    b"{}",
                    headers=[
                        *JSON_HEADERS,
                        *AUTH,
                        ("Mcp-Session-Id", "a"),
                        ("Mcp-Session-Id", "b"),
                    ],
                ),
                400,
            ),
            ("no token", request_bytes(url, _ping(), headers=JSON_HEADERS), 401),
            ("two tokens", request_bytes(url, _ping(), headers=[*JSON_HEADERS, *AUTH, *AUTH]), 400),
            (
                "wrong path",
                request_bytes(url, _ping(), headers=[*JSON_HEADERS, *AUTH]).replace(
                    b"/mcp", b"/api", 1
                ),
                404,
            ),
            (
                "GET",
                request_bytes(url, method="GET", headers=[("Accept", "text/event-stream"), *AUTH]),
                405,
            ),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
            (
                "not HTTP",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
                400,
            ),
            (
                "Content-Length and Transfer-Encoding (smuggling)",
                request_bytes(
                    url,
                    _ping(),
                    headers=[*JSON_HEADERS, *AUTH, ("Transfer-Encoding", "chunked")],
                    content_length=len(_ping()),
                ),
                400,
            ),
            (
                "80 KB of headers",
                request_bytes(
                    url, _ping(), headers=[*JSON_HEADERS, *AUTH, *[("X-Pad", "p" * 40)] * 2000]
                ),
                431,
            ),
        ]
        served = [0]
        stop = trio.Event()
        got: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_well_behaved, url, len(cases), served, stop)
            for name, data, _ in cases:
                status, headers, body = await raw_exchange(url, data)
                got[name] = status
                if status not in (405, 431) and name not in ("HTTP/2 preface", "not HTTP"):
                    assert json.loads(body), name  # every refusal says why, in JSON
                if status == 401:
                    assert headers["www-authenticate"].startswith("Bearer")
            stop.set()
        assert got == {name: status for name, _, status in cases}
        assert served[0] >= len(cases)
        await daemon.assert_serves(token=TOKEN)
        assert daemon.alive()


def _in_flight() -> int:
    """Connections the burst opens at once: 2,000 (ten times the daemon's connection cap
    here), within the kernel's SYN backlog (see post_burst.py)."""
    try:
        backlog = int(Path("/proc/sys/net/ipv4/tcp_max_syn_backlog").read_text())
    except (OSError, ValueError):
        backlog = 1024
    return max(256, min(2_000, backlog - 48))


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < want:
        pytest.skip(f"the open-file limit is below {want}")


async def test_ten_thousand_concurrent_posts_past_the_cap_each_get_503_while_a_client_is_served(
    tmp_path: Path,
) -> None:
    n, cap = 10_000, 50
    _raise_fd_limit(n + 2_000)
    async with live_daemon(
        tmp_path,
        EXAI_TOKENS=f"door:{TOKEN}",
        EXAI_MAX_CONNECTIONS="200",
        EXAI_MAX_CONNECTIONS_PER_IP=str(cap),
        EXAI_LOG_LEVEL="warning",
        # Each connection sends its whole request at once; the slowloris guard (5 s of wall
        # time from accept, tested on its own below) is not under test here, and with 200
        # handshakes at once on a loaded machine it measures the daemon's own pace.
        EXAI_HANDSHAKE_TIMEOUT_S="120",
    ) as daemon:
        parts = urlsplit(http_url(daemon.url))
        host, port = parts.hostname or "127.0.0.1", parts.port or 0
        # the first `cap` POSTs are admitted and hold their connection (a call that runs
        # until the test ends); every later one finds the address's cap full
        holders: list[trio.SocketStream] = []
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "sleep", "arguments": {"seconds": 600}, "_meta": envelope()},
            }
        ).encode()
        hold = request_bytes(daemon.url, body, headers=[*JSON_HEADERS, *AUTH])
        for _ in range(cap):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(hold)
            holders.append(stream)
        with trio.fail_after(SERVED_WITHIN_S):
            while (await daemon.metric("exai_inflight_calls")) < cap:
                await trio.sleep(0.05)
        idle_rss = daemon.rss_bytes()
        post = request_bytes(daemon.url, body, headers=[*JSON_HEADERS, *AUTH])
        served = [0]
        stop = trio.Event()
        async with trio.open_nursery() as outer:
            outer.start_soon(_well_behaved, daemon.url, 3, served, stop)
            # the burst from a process of its own (see post_burst.py), so the well-behaved
            # client's loop is not the one running ten thousand connections
            with trio.fail_after(SERVED_WITHIN_S * 8):
                burst = await trio.run_process(
                    [sys.executable, str(POST_BURST), host, str(port), str(n), str(_in_flight())],
                    stdin=post,
                    capture_stdout=True,
                    capture_stderr=True,
                )
            stop.set()
        assert burst.returncode == 0, burst.stderr.decode()[-2000:]
        statuses = json.loads(burst.stdout)
        for stream in holders:
            await trio.aclose_forcefully(stream)
        timed_out = await daemon.metric(
            "exai_connections_rejected_total", reason="handshake_timeout"
        )
        assert statuses == {"503": n}, (statuses, f"handshake timeouts: {timed_out}")
        assert served[0] >= 3
        refused = await daemon.metric(
            "exai_connections_rejected_total", reason="max_connections_per_ip"
        )
        assert refused >= n
        # the held calls are cancelled with their connections (a call running when its client's
        # FIN comes is given PEER_CLOSE_GRACE_S first: a FIN may be a half-close), and their
        # connections given back — until then a new one from 127.0.0.1 finds the address's cap
        # full (assert_serves failed so in a quiet run); nothing is left behind
        with trio.fail_after(SERVED_WITHIN_S):
            while (await daemon.metric("exai_inflight_calls")) > 0 or (
                await daemon.metric("exai_connections_open")
            ) > 0:
                await trio.sleep(0.05)
        await daemon.assert_serves(token=TOKEN)
        assert daemon.rss_bytes() - idle_rss < 64 * MiB


async def test_an_sse_reader_that_stops_reading_is_cut_off_and_its_bytes_freed(
    tmp_path: Path,
) -> None:
    async with live_daemon(
        tmp_path,
        EXAI_SEND_TIMEOUT_S="2",
        EXAI_HEARTBEAT_INTERVAL_S="0.2",
        EXAI_LOG_LEVEL="warning",
    ) as daemon:
        parts = urlsplit(http_url(daemon.url))
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 0)
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {
                    "name": "blob",
                    "arguments": {"bytes": 8 * MiB, "seconds": 0.5},
                    "_meta": {"progressToken": 1, **envelope()},
                },
            }
        ).encode()
        await stream.send_all(request_bytes(daemon.url, body, headers=JSON_HEADERS))
        # … and never reads: the SSE stream commits, then the 16 MiB answer cannot be written
        status: dict[str, Any] = {}
        with trio.fail_after(SERVED_WITHIN_S):
            while True:
                status = (await daemon.status())["daemon"]
                if status["rejections"].get("send_timeout", 0) >= 1:
                    break
                await trio.sleep(0.2)
        await daemon.assert_serves()
        with trio.fail_after(SERVED_WITHIN_S):
            while True:
                status = (await daemon.status())["daemon"]
                if status["pending"]["charged_bytes"] < 4096:
                    break
                await trio.sleep(0.2)
        await trio.aclose_forcefully(stream)
        await daemon.assert_serves()


async def test_a_json_reader_that_stops_reading_is_cut_off_and_its_bytes_freed(
    tmp_path: Path,
) -> None:
    """The same for a JSON-only client, whose answer the call's own task writes."""
    async with live_daemon(tmp_path, EXAI_SEND_TIMEOUT_S="2", EXAI_LOG_LEVEL="warning") as daemon:
        parts = urlsplit(http_url(daemon.url))
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 0)
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {
                    "name": "blob",
                    "arguments": {"bytes": 8 * MiB, "seconds": 0.5},
                    "_meta": {"progressToken": 1, **envelope()},
                },
            }
        ).encode()
        headers = [("Content-Type", "application/json"), ("Accept", "application/json")]
        await stream.send_all(request_bytes(daemon.url, body, headers=headers))
        # … and never reads: the 16 MiB answer cannot be written
        with trio.fail_after(SERVED_WITHIN_S):
            while True:
                status = (await daemon.status())["daemon"]
                if status["rejections"].get("send_timeout", 0) >= 1:
                    break
                await trio.sleep(0.2)
        assert await _connection_closed(stream)  # (after what the kernel had buffered)
        await daemon.assert_serves()
        with trio.fail_after(SERVED_WITHIN_S):
            while (await daemon.status())["daemon"]["pending"]["charged_bytes"] >= 4096:
                await trio.sleep(0.2)
        await trio.aclose_forcefully(stream)
        await daemon.assert_serves()


async def _connection_closed(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(SERVED_WITHIN_S):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_a_body_that_never_arrives_is_given_up_on(tmp_path: Path) -> None:
    async with live_daemon(tmp_path, EXAI_HANDSHAKE_TIMEOUT_S="1") as daemon:
        parts = urlsplit(http_url(daemon.url))
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 0)
        async with stream:
            head = request_bytes(daemon.url, headers=JSON_HEADERS, content_length=1000)
            await stream.send_all(head + b'{"jsonrpc"')  # … and the rest never comes
            assert await _connection_closed(stream)
        await daemon.assert_serves()
        assert (await daemon.status())["daemon"]["rejections"].get("body_timeout") == 1
