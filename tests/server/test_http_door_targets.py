"""Request targets on the MCP listener's port (exai/server/http11.py ``route_path``), over
real sockets, in-process.

RFC 9112 §3.2.2: a server MUST accept the absolute-form (``POST http://host:port/mcp``), and an
origin server MUST then ignore ``Host`` and take the target's authority instead. exai routes by
neither, and judges the authority as it judges a ``Host`` (DNS rebinding: a foreign one is 421,
docs/security.md "Host"). So an absolute-form request is answered exactly as the origin-form
request whose ``Host`` is the target's authority — whatever its own ``Host`` says — on a first
request (read by h11 in the
listener) and on a kept connection's later ones (read by the plain reader, or by h11).
``CONNECT host:port`` and ``OPTIONS *`` route nowhere: 404, the connection closed.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import h11
import pytest
import trio

from tests.helpers import make_settings, raw_upgrade, running_daemon
from tests.httpmcp import envelope, http_url

pytestmark = pytest.mark.anyio

_PING = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": envelope()}}
).encode()


def _request(
    target: str,
    host: str,
    *extra: tuple[str, str],
    body: bytes = _PING,
    chunked: bool = False,
) -> bytes:
    """A 2026-07-28 ``ping`` POSTed to ``target`` with ``Host: host``, written by hand."""
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: application/json",
        *(f"{k}: {v}" for k, v in extra),
    ]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        lines.append(f"Content-Length: {len(body)}")
        framed = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + framed


Answer = tuple[int, dict[str, str], bytes]


async def _exchange(d: Any, requests: list[bytes]) -> tuple[list[Answer], bool]:
    """Send each request on one connection, the next once the last was answered: the answers
    (status, headers by lower-case name, body) and whether the daemon then closed the
    connection. h11 reads the answers as a client (a framing error fails the test)."""
    parts = urlsplit(http_url(d.url))
    stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
    client = h11.Connection(h11.CLIENT)
    answers: list[Answer] = []
    closed = False
    async with stream:
        with trio.fail_after(10):
            for data in requests:
                if client.our_state is not h11.IDLE:
                    break  # (the last answer closed the connection)
                # the request went out as written; h11 is told of one so that it reads the answer
                client.send(h11.Request(method="POST", target="/", headers=[("Host", "x")]))
                client.send(h11.EndOfMessage())
                await stream.send_all(data)
                status, headers, body = 0, {}, b""
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                        headers = {k.decode(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    else:
                        assert isinstance(event, h11.EndOfMessage), event
                        break
                answers.append((status, headers, body))
                if client.their_state is h11.DONE and client.our_state is h11.DONE:
                    client.start_next_cycle()
            if client.our_state is not h11.IDLE:  # the daemon said Connection: close
                closed = await stream.receive_some(65536) == b""
    return answers, closed


def _port(d: Any) -> int:
    return urlsplit(http_url(d.url)).port or 80


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        ("127.0.0.1:{port}", "127.0.0.1:{port}"),  # the daemon's own, agreeing with Host
        ("localhost:{port}", "evil.example"),  # the daemon's own; Host disagrees
        ("evil.example", "127.0.0.1:{port}"),  # a foreign authority; Host is the daemon's
        ("evil.example:8080", "evil.example:8080"),
    ],
)
@pytest.mark.parametrize(
    ("origin", "status"),
    [(None, 200), ("http://localhost:6274", 200), ("http://evil.example", 403)],
)
async def test_an_absolute_form_target_is_answered_as_the_origin_form_with_its_authority_as_host(
    tmp_path, authority, host, origin, status
):
    """The old door compared the whole target with ``/mcp``: 404 for every absolute-form
    request. Now the target's authority stands for the request, not ``Host``; a foreign one is
    judged as a foreign ``Host`` is (421 on a daemon bound to loopback, before ``Origin``), and
    a browser's foreign ``Origin`` is refused (403) whichever form the target takes."""
    async with running_daemon(make_settings(tmp_path)) as d:
        authority, host = authority.format(port=_port(d)), host.format(port=_port(d))
        if authority.startswith("evil.example"):
            status = 421
        extra = [("Origin", origin)] if origin is not None else []
        absolute, _ = await _exchange(d, [_request(f"http://{authority}/mcp", host, *extra)])
        origin_form, _ = await _exchange(d, [_request("/mcp", authority, *extra)])
        assert absolute[0][0] == origin_form[0][0] == status, (absolute, origin_form)
        if status == 200:
            assert json.loads(absolute[0][2]) == json.loads(origin_form[0][2])
        else:
            error = "forbidden_host" if status == 421 else "forbidden_origin"
            assert json.loads(absolute[0][2])["error"] == error
        assert d.stats.rejections["session_error"] == 0


async def test_absolute_form_targets_are_routed_by_their_path_by_both_request_readers(tmp_path):
    """On one kept connection: a first request (the listener's h11), plain later ones (read
    without h11: any case of scheme, a query, an IPv6 literal), and a chunked one (h11 again)
    are each served; an absolute-form target with another path is 404, as its origin-form."""
    async with running_daemon(make_settings(tmp_path)) as d:
        port = _port(d)
        answers, closed = await _exchange(
            d,
            [
                _request(f"http://127.0.0.1:{port}/mcp", "x"),
                _request(f"HTTP://localhost:{port}/mcp?a=1", "x"),
                _request(f"https://[::1]:{port}/mcp", "x"),
                _request(f"http://127.0.0.1:{port}/mcp", "x", chunked=True),
                _request(f"http://127.0.0.1:{port}/mcp", "x"),
            ],
        )
        assert [a[0] for a in answers] == [200] * 5, answers
        assert not closed
        for target in (f"http://127.0.0.1:{port}/other", f"http://127.0.0.1:{port}"):
            answers, closed = await _exchange(
                d, [_request("/mcp", "localhost"), _request(target, "x")]
            )
            assert [a[0] for a in answers] == [200, 404], (target, answers)
            assert json.loads(answers[1][2])["error"] == "not_found"
            assert closed
        assert d.stats.rejections["session_error"] == 0


@pytest.mark.parametrize(
    "target", ["http:///mcp", "http://alice:secret@127.0.0.1/mcp", "http://:8079/mcp"]
)
async def test_an_absolute_form_target_without_a_host_or_with_user_info_is_400(tmp_path, target):
    """RFC 9110 §4.2.1: a recipient MUST reject an http URI with an empty host; §4.2.4: user
    info is treated as an error (it hides the authority). First request and kept alike."""
    async with running_daemon(make_settings(tmp_path)) as d:
        for requests in (
            [_request(target, "x")],
            [_request("/mcp", "localhost"), _request(target, "x")],
        ):
            answers, closed = await _exchange(d, requests)
            assert [a[0] for a in answers][-1] == 400, answers
            assert json.loads(answers[-1][2])["error"] == "bad_request"
            assert closed


@pytest.mark.parametrize(
    "head",
    [b"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n"],
    ids=["authority-form", "asterisk-form"],
)
async def test_authority_and_asterisk_form_targets_are_404_and_the_connection_closed(
    tmp_path, head
):
    """What they were before absolute-form was read: routed nowhere, a JSON 404 with
    ``Connection: close``, on a first request and on a kept connection (CONNECT is h11's
    there: the plain reader leaves it, h11 waits for the tunnel to be granted or refused)."""
    async with running_daemon(make_settings(tmp_path)) as d:
        request = head.replace(b"{port}", str(_port(d)).encode()) + (
            b"Host: localhost\r\nContent-Length: 0\r\n\r\n"
        )
        for requests in ([request], [_request("/mcp", "localhost"), request]):
            answers, closed = await _exchange(d, requests)
            status, headers, body = answers[-1]
            assert status == 404, answers
            assert headers.get("connection") == "close"
            assert json.loads(body)["error"] == "not_found"
            assert closed
        assert d.stats.rejections["session_error"] == 0


async def test_a_websocket_upgrade_to_an_absolute_form_target_is_routed_by_its_path(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        port = _port(d)
        cases = [
            (f"http://127.0.0.1:{port}/mcp", 101),
            ("http://evil.example/mcp?x=1", 421),  # (a foreign authority: as a foreign Host)
            (f"http://127.0.0.1:{port}", 101),  # the empty path is "/": the op protocol's door
            (f"http://127.0.0.1:{port}/elsewhere", 404),
            ("http://u@127.0.0.1/mcp", 400),
        ]
        for path, expected in cases:
            stream, status, _, _ = await raw_upgrade("127.0.0.1", port, path=path)
            await trio.aclose_forcefully(stream)
            assert status == expected, path
        assert d.stats.rejections["session_error"] == 0
