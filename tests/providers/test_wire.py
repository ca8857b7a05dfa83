"""The provider client's HTTP/1.1 reader against h11: the same bytes, split anywhere, must give
the same heads, body and keep-alive verdict, or both an error."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exai.providers import wire
from exai.providers.wire import ProtocolError, ResponseReader, check_header, request_bytes

MAX_HEAD = 4096
_FRAMING_NAMES = {b"content-length", b"transfer-encoding"}


def _with_h11(chunks: list[bytes]) -> Any:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    headers = [("Host", "a"), ("Content-Length", "0")]
    request = h11.Request(method="POST", target="/x", headers=headers)
    conn.send(request)
    conn.send(h11.EndOfMessage())
    heads: list[Any] = []
    body = bytearray()
    try:
        for chunk in [*chunks, b""]:
            conn.receive_data(chunk)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    break
                if isinstance(ev, h11.ConnectionClosed):
                    return "error"
                if isinstance(ev, (h11.InformationalResponse, h11.Response)):
                    heads.append((ev.status_code, _plain(list(ev.headers))))
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    # (a body ended by the connection's end leaves nothing to reuse; bytes
                    # past the response make ours not reusable, on purpose)
                    reusable = (
                        chunk != b""
                        and not conn.trailing_data[0]
                        and conn.our_state is h11.DONE
                        and conn.their_state is h11.DONE
                    )
                    return heads, bytes(body), reusable
    except h11.ProtocolError:
        return "error"
    return "error"


def _plain(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    # (h11 rewrites the framing headers: its normalised values, a repeat dropped; their
    # meaning is compared through the body and the keep-alive verdict)
    return [(n, v) for n, v in headers if n not in _FRAMING_NAMES]


def _with_reader(chunks: list[bytes]) -> Any:
    r = ResponseReader(MAX_HEAD)
    heads: list[Any] = []
    body = bytearray()
    final = False
    try:
        for chunk in [*chunks, b""]:
            r.feed(chunk)
            while not final:
                head = r.head()
                if head is None:
                    break
                heads.append((head.status_code, _plain(head.headers)))
                final = head.status_code >= 200
            while final:
                data = r.body()
                body += data
                if r.done:
                    return heads, bytes(body), r.keep_alive and not r.leftover
                if not data:
                    break
    except ProtocolError:
        return "error"
    return "error"


EOLS = st.sampled_from([b"\r\n", b"\n"])
HEADER_LINES = st.sampled_from(
    [
        b"Content-Type: text/event-stream",
        b"content-type:application/json",
        b"X-Odd:   spaced   value  ",
        b"X-Empty:",
        b"X-Tab:\tv\t",
        b"Connection: close",
        b"Connection: Keep-Alive, Close",
        b"connection: keep-alive",
        b"X-Folded: a",
        b"  folded continuation",
        b"\tfolded tab",
        b"bad header line",
        b"Bad Name: v",
        b"X-Nul: a\x00b",
        b"X-Obs: caf\xc3\xa9 \x80",
        b"X-Ctl: a\x01b",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: CHUNKED",
        b"Content-Length: abc",
        b"Content-Length: 3, 4",
        b"Content-Length: 99999999999999999999999",
    ]
)
STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200 ",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/2.0 200 OK",
        b"HTTP/1.1 099 Odd",
        b"HTTP/1.1 101 Switching",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200 OK\x00",
        b"http/1.1 200 OK",
        b"ICY 200 OK",
    ]
)
INFORMATIONAL = st.sampled_from(
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]
)


@st.composite
def responses(draw: Any) -> bytes:
    eol = draw(EOLS)
    out = b"".join(draw(st.lists(INFORMATIONAL, max_size=3)))
    if draw(st.booleans()):
        out = draw(st.sampled_from([b"\r\n", b"\n", b" HTTP/1.1 200 OK\r\n"])) + out
    status = draw(STATUS_LINES) if draw(st.integers(0, 3)) == 0 else b"HTTP/1.1 200 OK"
    headers = draw(st.lists(HEADER_LINES, max_size=4)) if draw(st.booleans()) else []
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["chunked", "length", "close", "both", "length2"]))
    if framing in ("chunked", "both"):
        headers.append(b"Transfer-Encoding: chunked")
        pieces = []
        rest = body
        while rest:
            n = draw(st.integers(1, max(1, len(rest))))
            size = draw(st.sampled_from(["%x", "%X", "%04x"])) % n
            ext = draw(st.sampled_from(["", ";a=b", ";x", " ", ';q="1;2"']))
            pieces.append(size.encode() + ext.encode() + b"\r\n" + rest[:n] + b"\r\n")
            rest = rest[n:]
        trailer = draw(st.sampled_from([b"", b"X-Trailer: t\r\n", b"bad trailer\r\n"]))
        encoded = b"".join(pieces) + b"0\r\n" + trailer + b"\r\n"
        if draw(st.integers(0, 9)) == 0 and pieces:  # a broken chunk footer
            encoded = encoded.replace(b"\r\n", b"\rX", 2)
        if framing == "both":
            headers.append(b"Content-Length: %d" % len(body))
    elif framing == "length":
        headers.append(b"Content-Length: %d" % (len(body) + draw(st.sampled_from([0, 0, 5]))))
        encoded = body
    elif framing == "length2":
        headers += [b"Content-Length: %d" % len(body), b"content-length:  %d" % len(body)]
        encoded = body
    else:
        encoded = body
    head = eol.join([status, *headers]) + eol + eol
    out += head + encoded
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(responses(), st.lists(st.integers(0, 10_000), max_size=8), st.integers(0, 10))
def test_reader_agrees_with_h11_on_any_response_split_anywhere(
    data: bytes, cuts: list[int], truncate: int
) -> None:
    if truncate == 0:  # the connection ends somewhere inside
        data = data[: cuts[0] % (len(data) + 1)] if cuts else data[: len(data) // 2]
    chunks = _split(data, cuts)
    assert _with_reader(chunks) == _with_h11(chunks)


def test_a_sse_body_in_one_read_is_one_piece() -> None:
    r = ResponseReader(MAX_HEAD)
    events = b"".join(b'data: {"n": %d}\n\n' % i for i in range(11)) + b"data: [DONE]\n\n"
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events.split(b"\n\n")[:-1])
    r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire + b"0\r\n\r\n")
    head = r.head()
    assert head is not None and head.status_code == 200
    piece = r.body()
    assert piece == b"".join(e for e in events.split(b"\n\n")[:-1])
    assert r.done and r.keep_alive and not r.leftover


def test_bytes_after_the_response_make_the_connection_not_reusable() -> None:
    r = ResponseReader(MAX_HEAD)
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokJUNK")
    assert r.head() is not None
    assert r.body() == b"ok"
    assert r.done and r.leftover


def test_a_head_that_never_ends_is_an_error_past_the_bound() -> None:
    r = ResponseReader(MAX_HEAD)
    r.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD)
    with pytest.raises(ProtocolError, match="longer than"):
        r.head()


def test_a_chunk_size_line_that_never_ends_is_an_error_past_the_bound() -> None:
    r = ResponseReader(MAX_HEAD)
    r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"x" * MAX_HEAD)
    assert r.head() is not None
    with pytest.raises(ProtocolError, match="chunk-size"):
        r.body()


@given(
    st.binary(max_size=12),
    st.binary(max_size=12),
)
def test_request_headers_are_checked_as_h11_checks_them(name: bytes, value: bytes) -> None:
    try:
        h11.Request(method="GET", target="/", headers=[("Host", "a"), (name, value)])
        h11_ok = True
    except h11.LocalProtocolError:
        h11_ok = False
    try:
        check_header(name, value)
        ours = True
    except ProtocolError:
        ours = False
    # h11 also rejects framing headers it cannot send; we never send those from a caller.
    # A second Host is refused by h11 for being a second one: request_bytes refuses it (below)
    if name.lower() not in _FRAMING_NAMES | {b"host"}:
        assert ours == h11_ok


@pytest.mark.parametrize("name", [b"host", b"Host", b"HOST"])
@pytest.mark.parametrize("value", [b"", b"a", b"other:1"])
def test_a_second_host_header_is_refused_as_h11_refuses_it(name: bytes, value: bytes) -> None:
    # seen as a flaky failure of the differential test above (hypothesis found Host: "")
    with pytest.raises(h11.LocalProtocolError):
        h11.Request(method="GET", target="/", headers=[("Host", "a"), (name, value)])
    with pytest.raises(ProtocolError, match="Host"):
        request_bytes(b"GET", b"/", b"host: a\r\n", [(name, value)])


def test_request_bytes_are_what_h11_writes() -> None:
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"host", b"a:1"), (b"user-agent", b"exai"), (b"content-length", b"2")]
    want = conn.send(h11.Request(method="POST", target="/v1/x", headers=headers))
    fixed = b"".join(n + b": " + v + b"\r\n" for n, v in headers[:2])
    got = request_bytes(b"POST", b"/v1/x", fixed, [(b"content-length", b"2")])
    assert got == want


def test_a_request_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ProtocolError):
        request_bytes(b"GET", b"/", b"", [(b"x", b"a\r\nInjected: 1")])


class _CountingSearch:
    """Stands in for a compiled pattern and counts the bytes each ``search`` looks at."""

    def __init__(self, pattern: Any) -> None:
        self.pattern = pattern
        self.looked = 0

    def search(self, buf: bytes, pos: int = 0) -> Any:
        self.looked += len(buf) - pos
        return self.pattern.search(buf, pos)


def _trickled_head(n_headers: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(n_headers))


@pytest.mark.parametrize("where", ["head", "trailers"])
def test_a_head_or_trailers_trickled_a_byte_at_a_time_are_searched_once(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # an odd upstream sending its head one byte per read made every read search the whole
    # buffer again: 100 KiB cost 3.6 s of CPU (h11: 0.26 s). Searched once, the bytes looked
    # at stay within a small multiple of the bytes received.
    counter = _CountingSearch(wire._BLANK_RE)
    monkeypatch.setattr(wire, "_BLANK_RE", counter)
    block = b"".join(b"x-t%d: v\r\n" % i for i in range(300))
    r = ResponseReader(MAX_HEAD)
    if where == "head":
        data = _trickled_head(300) + b"\r\n"
        for i in range(len(data)):
            r.feed(data[i : i + 1])
            head = r.head()
        assert head is not None and head.status_code == 200
    else:
        r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n")
        assert r.head() is not None
        assert r.body() == b"ok"
        data = block + b"\r\n"
        for i in range(len(data)):
            r.feed(data[i : i + 1])
            r.body()
        assert r.done
    assert counter.looked <= 4 * len(data)
