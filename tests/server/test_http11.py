"""HTTP/1.1 helpers of the MCP listener (exai/server/http11.py), without sockets.

A whole response the HTTP door writes without h11 must be the bytes h11 writes for it, and the
next request on the connection must be read as h11 would have read it after its own response.
"""

from __future__ import annotations

import random

import h11
import pytest
import trio

from exai.server.http11 import (
    LAST_CHUNK,
    MAX_HEAD_BYTES,
    PLAIN_HEAD_BYTES,
    chunk,
    chunked_head,
    parse_plain_request,
    route_path,
    send_response,
    whole_response,
)

BODY = b'{"jsonrpc":"2.0","id":1,"result":{}}'


def _read_request(data: bytes) -> h11.Connection:
    """A server-side h11 state that has read one POST to its end (and holds what follows)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    return conn


def _post(body: bytes = b"{}", *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST /mcp HTTP/"
        + version
        + b"\r\nHost: x\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


class _Recorder(trio.abc.SendStream):
    def __init__(self) -> None:
        self.data = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.data += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _h11_bytes(status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> bytes:
    conn = _read_request(_post())
    out = _Recorder()
    trio.run(lambda: send_response(out, conn, status, headers, body, close=close))
    return out.data


@pytest.mark.parametrize("status", [200, 202, 204, 400, 404, 406, 413, 503])
@pytest.mark.parametrize("close", [False, True])
@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Content-Type", "application/json")],
        [("Content-Type", "application/json"), ("Mcp-Session-Id", "v1.abc_DEF-123.sig")],
        [("Content-Type", "application/json"), ("Retry-After", "1")],
    ],
)
def test_a_whole_response_is_the_bytes_h11_writes_for_it(status, close, headers):
    body = b"" if status == 204 else BODY
    assert whole_response(status, headers, body, close=close) == _h11_bytes(
        status, headers, body, close
    )


@pytest.mark.parametrize("close", [False, True])
def test_a_204_carries_no_content_length(close):
    """RFC 9110 §8.6: a server MUST NOT send Content-Length in a 204 (the door's answer to
    DELETE; both writers sent ``Content-Length: 0``, found by the attack on part 7)."""
    for data in (whole_response(204, [], close=close), _h11_bytes(204, [], b"", close)):
        assert b"content-length" not in data.lower(), data
        assert data.startswith(b"HTTP/1.1 204 ") and data.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    "request_bytes", [_post(extra=b"Connection: close\r\n"), _post(version=b"1.0")]
)
def test_a_request_that_asks_to_close_leaves_its_state_short_of_done(request_bytes):
    """What the door's ``_closing`` reads to answer with ``Connection: close`` (h11 would add
    it to such a request's response itself; the door builds its responses without h11)."""
    assert _read_request(request_bytes).their_state is h11.MUST_CLOSE
    assert _read_request(_post()).their_state is h11.DONE


# ---------------------------------------------------------------- the plain request reader
_BODY = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"chat"}}'


def _mcp_post(body: bytes = _BODY, *, head: bytes | None = None) -> bytes:
    """A request as the peer benchmark's client and the MCP SDKs send it."""
    if head is None:
        head = (
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nAuthorization: Bearer abc.DEF_123\r\n"
            b"Accept: application/json, text/event-stream\r\n"
            b"MCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: chat\r\n"
            % len(body)
        )
    return head + b"\r\n" + body


def _h11_reads(data: bytes) -> object:
    """What h11 makes of ``data`` as a server: the request, its body, the bytes left and the
    client's state once it is read; ``"incomplete"``; or ``"error"``."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    conn.receive_data(data)
    parts = []
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return "incomplete"
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                parts.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return "incomplete"
    except h11.RemoteProtocolError:
        return "error"
    rest, _ = conn.trailing_data
    return (
        request.method,
        request.target,
        list(request.headers),
        request.http_version,
        b"".join(parts),
        bytes(rest),
        conn.their_state,
    )


def _agrees_with_h11(data: bytes) -> bool:
    """Whether the plain reader took ``data`` (and then that h11 reads the same from it)."""
    parsed = parse_plain_request(data)
    if parsed is None:
        return False
    request, stop = parsed
    assert _h11_reads(data) == (
        request.method,
        request.target,
        request.headers,
        request.http_version,
        request.body,
        data[stop:],
        h11.DONE,
    ), data
    assert request.fields == {
        name: [v.decode("latin-1") for k, v in request.headers if k == name]
        for name, _ in request.headers
    }
    assert request.raw == data[:stop]
    state = request.h11_state()  # (what a refusal or an SSE stream is written with)
    assert state.their_state is h11.DONE and state.our_state is h11.SEND_RESPONSE
    return True


@pytest.mark.parametrize(
    "data",
    [
        _mcp_post(),
        _mcp_post(b""),
        _mcp_post() + _mcp_post()[:40],  # a pipelined request's start behind it
        _mcp_post() + _mcp_post(),
        b"DELETE /mcp HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nMcp-Session-Id: v1.a.b\r\n\r\n",
        b"POST /mcp?x=1 HTTP/1.1\r\nHost:x\r\nContent-Length:007\r\nX-Empty:\r\n"
        b"X-Pad: \t a  b \t\r\n\r\nabcdefg",
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: \xe9\xff\r\n\r\n{}",
        b"GET /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nAccept: a\r\nAccept: b\r\n\r\n",
        # the request target's other forms: h11's grammar, the door's to read (route_path)
        _mcp_post().replace(b"POST /mcp ", b"POST http://127.0.0.1:8765/mcp ", 1),
        _mcp_post().replace(b"POST /mcp ", b"POST HTTPS://[::1]/mcp?a=1 ", 1),
        _mcp_post().replace(b"POST /mcp ", b"POST http://evil.example ", 1),
        _mcp_post().replace(b"POST /mcp ", b"POST http:///mcp ", 1),
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_the_plain_reader_reads_a_plain_request_as_h11_does(data):
    assert _agrees_with_h11(data)


@pytest.mark.parametrize(
    ("data", "h11_says"),
    [
        # framing: h11 frames these (or refuses them) by rules the plain reader does not take on
        (
            _mcp_post(
                head=b"POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Length: 2"
            ),
            "incomplete",
        ),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n",
            "request",
        ),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
            "request",
        ),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            "error",
        ),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}", "request"),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}", "error"),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 0x2\r\n\r\n{}", "error"),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "error",
        ),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\n\r\n", "request"),  # no length: a body of 0
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{}", "incomplete"),
        (_mcp_post()[:60], "incomplete"),
        # the connection's fate: h11 would close, switch, or wait for a 100 Continue
        (b"POST /mcp HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "request"),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
            "request",
        ),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            "request",
        ),
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
            "request",
        ),
        (
            b"GET /mcp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Content-Length: 0\r\n\r\n",
            "request",
        ),
        # CONNECT: h11 then waits for the tunnel to be granted or refused (MIGHT_SWITCH_PROTOCOL,
        # not DONE); the plain reader took it as a kept request
        (b"CONNECT 127.0.0.1:8765 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "request"),
        # the head's grammar
        (b"POST /mcp HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "error"),  # no Host
        (b"POST http://h/mcp HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "error"),  # no Host
        (b"POST http://h/m\x80 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST http://h /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\nContent-Length: 2\r\n\r\n{}", "request"),
        (b"POST /mcp HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}", "request"),  # bare LF
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nX: a\n\r\nContent-Length: 2\r\n\r\n{}", "request"),
        (b"POST /mcp HTTP/1.1\r\nHost : x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /mcp HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\nContent-Length: 2\r\n\r\n{}", "request"),
        (b"\r\nPOST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST  /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /mcp http/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /m\x80 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "error"),
        (b"POST /mcp HTTP/2.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", "request"),
        # a head too large for the plain reader is h11's (bounded by MAX_HEAD_BYTES)
        (
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX: "
            + b"a" * PLAIN_HEAD_BYTES
            + b"\r\n\r\n{}",
            "request",
        ),
    ],
)
def test_the_plain_reader_leaves_everything_else_to_h11(data, h11_says):
    """``h11_says``: what h11 makes of the same bytes ("request": one it reads to its end,
    with a framing or a connection state the plain reader does not take on)."""
    assert parse_plain_request(data) is None
    reading = _h11_reads(data)
    assert (reading if isinstance(reading, str) else "request") == h11_says


def test_a_request_cut_anywhere_is_not_plain_until_it_is_all_there():
    data = _mcp_post()
    for cut in range(len(data)):
        assert parse_plain_request(data[:cut]) is None, cut
    assert _agrees_with_h11(data)


_MUTATIONS = b"\r\n \t:,;0123456789aAzZ/\x00\x01\x7f\x80\xff-"


def test_the_plain_reader_agrees_with_h11_on_mutated_requests():
    """Random edits of plain requests (bytes that matter to the grammar and the framing): every
    one the plain reader takes, h11 reads the same, to the byte."""
    rng = random.Random(18)
    seeds = [
        _mcp_post(),
        _mcp_post() + _mcp_post(b"{}"),
        _mcp_post().replace(b"POST /mcp ", b"POST http://127.0.0.1:8765/mcp?a=1 ", 1),
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX: a b\r\n\r\n0123456789ab",
    ]
    taken = 0
    for _ in range(6000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            byte = _MUTATIONS[rng.randrange(len(_MUTATIONS))]
            edit = rng.randrange(3)
            if edit == 0:
                data[at] = byte
            elif edit == 1:
                data.insert(at, byte)
            else:
                del data[at]
        taken += _agrees_with_h11(bytes(data))
    assert taken > 1000  # (the edits that leave a plain request: a body byte, a value's)


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/mcp", "/mcp"),
        ("/mcp?x=1&y=/mcp", "/mcp"),
        ("/", "/"),
        ("http://127.0.0.1:8079/mcp", "/mcp"),
        ("HTTP://localhost/mcp?x=1", "/mcp"),
        ("https://[::1]:8079/mcp", "/mcp"),
        ("http://evil.example:80/mcp", "/mcp"),  # (any authority: exai judges none, nor Host)
        ("http://127.0.0.1:8079", "/"),  # an empty path is "/" (RFC 9110 §4.2.3)
        ("http://127.0.0.1:8079?x=1", "/"),
        ("http://h/mcp/", "/mcp/"),
        # routed nowhere (404), as before absolute-form was read
        ("127.0.0.1:8079", "127.0.0.1:8079"),  # authority-form (CONNECT)
        ("*", "*"),  # asterisk-form (OPTIONS)
        ("ftp://h/mcp", "ftp://h/mcp"),
        ("http://h/mcp#f", "http://h/mcp#f"),  # (a fragment is no part of a target)
        ("mcp", "mcp"),
    ],
)
def test_a_target_routes_by_its_path_in_origin_and_absolute_form(target, path):
    assert route_path(target) == path


@pytest.mark.parametrize(
    "target",
    [
        "http:///mcp",
        "http://:8079/mcp",
        "http://alice@127.0.0.1/mcp",
        "http://alice:pw@127.0.0.1:8079/mcp",
        "http://h:port/mcp",
        "http://h h/mcp",
        "https://[::1/mcp",
    ],
)
def test_an_absolute_form_target_without_a_host_or_with_user_info_is_refused(target):
    """RFC 9110 §4.2.1 (an empty host MUST be rejected), §4.2.4 (user info is an error)."""
    with pytest.raises(ValueError, match="authority"):
        route_path(target)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache, no-transform"),
            ("X-Accel-Buffering", "no"),
        ],
    ],
)
@pytest.mark.parametrize(
    "chunks", [[], [b""], [b"event: message\ndata: {}\n\n"], [b"a", b"", b"b" * 300]]
)
def test_a_chunked_response_to_a_plain_request_is_the_bytes_h11_writes(headers, chunks):
    parsed = parse_plain_request(_mcp_post())
    assert parsed is not None
    conn = parsed[0].h11_state()
    expected = conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
    expected += b"".join(conn.send(h11.Data(data=c)) for c in chunks)
    expected += conn.send(h11.EndOfMessage())
    assert conn.our_state is h11.DONE
    assert chunked_head(200, headers) + b"".join(map(chunk, chunks)) + LAST_CHUNK == expected
