"""HTTP/1.1 helpers of the MCP listener (exai/server/http11.py), without sockets.

A whole response the HTTP door writes without h11 must be the bytes h11 writes for it, and the
next request on the connection must be read as h11 would have read it after its own response.
"""

from __future__ import annotations

import h11
import pytest
import trio

from exai.server.http11 import next_cycle, send_response, whole_response

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


@pytest.mark.parametrize(
    "request_bytes", [_post(extra=b"Connection: close\r\n"), _post(version=b"1.0")]
)
def test_a_request_that_asks_to_close_leaves_its_state_short_of_done(request_bytes):
    """What the door's ``_closing`` reads to answer with ``Connection: close`` (h11 would add
    it to such a request's response itself; the door builds its responses without h11)."""
    assert _read_request(request_bytes).their_state is h11.MUST_CLOSE
    assert _read_request(_post()).their_state is h11.DONE


def test_the_next_cycle_reads_the_request_sent_ahead_and_then_the_peers_end():
    conn = _read_request(_post(b'{"a":1}') + _post(b'{"b":2}')[:30])
    nxt = next_cycle(conn)
    assert nxt.next_event() is h11.NEED_DATA  # (half a request so far)
    nxt.receive_data(_post(b'{"b":2}')[30:])
    request = nxt.next_event()
    assert isinstance(request, h11.Request) and request.method == b"POST"
    assert nxt.next_event() == h11.Data(data=b'{"b":2}')
    assert isinstance(nxt.next_event(), h11.EndOfMessage)

    conn = _read_request(_post())
    conn.receive_data(b"")  # the peer closed after its request
    assert isinstance(next_cycle(conn).next_event(), h11.ConnectionClosed)
