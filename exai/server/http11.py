"""HTTP/1.1 on the MCP listener, with h11: reading a request head, sending a whole response.

The listener reads the head of a connection's first request here (:func:`read_first_head`,
which the admin listener reads its one request's with too) before it
knows which door the connection is for: a WebSocket upgrade goes to the WebSocket door (the
bytes read so far are replayed into it, see :attr:`Head.raw`), anything else to the Streamable
HTTP door, which keeps using the same :class:`h11.Connection`.

Bounds: a head larger than :data:`MAX_HEAD_BYTES` is a protocol error (431); the caller bounds
the time (``handshake_timeout_s``). The HTTP door's whole responses are written without h11
(:func:`whole_response`, the bytes h11 writes for them, tested against it; the next request is
read with a fresh h11 state holding the bytes read past the last one):
h11's checks of headers the door makes itself and its state machine cost ten times the rest of
building a response. So are an SSE stream's head and chunks on a kept plain request
(:func:`chunked_head`, :func:`chunk`). One request is parsed by hand, and only when h11 would read
it the same way: :func:`parse_plain_request` takes a plain HTTP/1.1 request that is all there
(the common keep-alive case) and leaves everything else — every framing rule that is not one
``Content-Length``, every bound, every refusal — to h11, which the tests hold it against.

The caller's time bound on a head (the listener's from the accept, the HTTP door's from a kept
connection's next head's first byte) ends in 408 when some of the head came
(:data:`HEAD_TIMEOUT_MESSAGE`); a connection that sent nothing is closed without a word.

Empty lines before a request line (a stray CRLF after a body, RFC 9112 §2.2: a server SHOULD
ignore at least one) are skipped (:func:`skip_empty_lines`), as many as :data:`MAX_HEAD_BYTES`
allows with the head; h11 refuses them ("no request line received"). Skipped, they are no part
of a head: a connection that sent only those sent nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from http import HTTPStatus

import attrs
import h11
import trio

from exai.server.outbox import ProgressStream

__all__ = [
    "HEAD_TIMEOUT_MESSAGE",
    "LAST_CHUNK",
    "MAX_HEAD_BYTES",
    "PLAIN_HEAD_BYTES",
    "SERVED_VERSIONS",
    "FirstHead",
    "Head",
    "PlainRequest",
    "chunk",
    "chunked_head",
    "header",
    "header_values",
    "is_websocket_upgrade",
    "json_body",
    "parse_plain_request",
    "read_first_head",
    "read_head",
    "reason_phrase",
    "route_path",
    "send_response",
    "skip_empty_lines",
    "whole_response",
]

#: the largest request head accepted (request line and headers)
MAX_HEAD_BYTES = 64 * 1024
#: the message of a 408 ``head_timeout``: a head began but did not come whole in time (the
#: listener's bound on a first head, the HTTP door's on a kept connection's later ones)
HEAD_TIMEOUT_MESSAGE = "the request head did not arrive within EXAI_HANDSHAKE_TIMEOUT_S"
#: the HTTP versions served (h11 reads any ``HTTP/1.x``, and the HTTP/2 preface as a head of
#: ``HTTP/2.0``): any other is refused with 505, on every request of a connection
SERVED_VERSIONS = (b"1.0", b"1.1")
_READ = 64 * 1024


@attrs.define(eq=False)
class Head:
    """A request head read from a connection.

    Attributes:
        conn: the h11 state of the connection (it holds any bytes read past the head).
        request: the request line and headers.
        raw: every byte read from the stream so far (what a WebSocket door must re-read).
    """

    conn: h11.Connection
    request: h11.Request
    raw: bytes


async def read_head(
    stream: trio.abc.ReceiveStream,
    conn: h11.Connection | None = None,
    *,
    keep_raw: bool = True,
    wait_first: bool = False,
) -> Head | None:
    """Read the next request head, or ``None`` when the peer closed before sending one.

    Args:
        stream: the connection.
        conn: its h11 state (a new server-side one for a fresh connection).
        keep_raw: keep the bytes read (a fresh connection's first head may be a WebSocket
            upgrade, which the WebSocket door reads again).
        wait_first: the next bytes are not expected yet (a kept connection just answered):
            on a :class:`~exai.server.outbox.ProgressStream`, wait until the socket is
            readable before reading (``ProgressStream.receive_when_readable``).

    Raises:
        h11.RemoteProtocolError: not HTTP/1.x, or a head over :data:`MAX_HEAD_BYTES` (its
            ``error_status_hint`` says 400 or 431).
    """
    if conn is None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    skipped = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if wait_first and type(stream) is ProgressStream:
                data = await stream.receive_when_readable(_READ)
            else:
                data = await stream.receive_some(_READ)
            if data[:1] in _EMPTY_LINE_START and not conn.trailing_data[0]:
                # (before the request line: RFC 9112 §2.2; kept out of raw, which a WebSocket
                # door's h11 reads again)
                data, n = await skip_empty_lines(stream, bytes(data))
                skipped += n
            if keep_raw:
                raw += data
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            # (h11 bounds a head while it is incomplete; one that arrived whole in a large read
            # is measured here, with the empty lines skipped before it)
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size + skipped > MAX_HEAD_BYTES:
                raise h11.RemoteProtocolError(
                    f"the request head is larger than {MAX_HEAD_BYTES} bytes", 431
                )
            return Head(conn=conn, request=event, raw=bytes(raw))
        return None  # ConnectionClosed (or PAUSED, which a fresh cycle never is)


@attrs.frozen
class FirstHead:
    """What reading a connection's first request head within a bound came to
    (:func:`read_first_head`).

    Attributes:
        head: the head; ``None`` when none came.
        reason: why none came — ``"bad_request"`` (malformed: 400, or 431 for its size),
            ``"head_timeout"`` (it began and did not come whole in time: 408),
            ``"handshake_timeout"`` (nothing came in time: closed without a word); ``None``
            with a head, or when the peer closed first.
        status: the refusal's status (``0``: no answer, close without a word).
        message: the refusal's message.
    """

    head: Head | None = None
    reason: str | None = None
    status: int = 0
    message: str = ""


async def read_first_head(
    stream: trio.abc.ReceiveStream,
    conn: h11.Connection,
    timeout_s: float,
    *,
    keep_raw: bool = True,
    timeout_message: str = HEAD_TIMEOUT_MESSAGE,
) -> FirstHead:
    """Read a connection's first request head (:func:`read_head`) within ``timeout_s`` of now:
    the head, or why none came and how to refuse it — the MCP listener's and the admin
    listener's one rule. A head that began and did not come whole in time is answered 408
    (RFC 9110 §15.5.9) with ``timeout_message``; a connection that sent nothing (empty lines
    before a request line are nothing) is closed without a word; a malformed one is 400/431.

    The caller answers a refusal (``status``) itself, on ``conn``, after this returns: outside
    the bound (a refusal that lingered within it was taken for a head timeout and answered
    twice).
    """
    malformed: h11.RemoteProtocolError | None = None
    head: Head | None = None
    with trio.move_on_after(timeout_s) as bound:
        try:
            head = await read_head(stream, conn, keep_raw=keep_raw)
        except h11.RemoteProtocolError as exc:
            malformed = exc
    if malformed is not None:
        return FirstHead(
            reason="bad_request",
            status=malformed.error_status_hint,
            message=f"malformed HTTP request: {malformed}",
        )
    if head is not None:
        return FirstHead(head=head)
    if not bound.cancelled_caught:
        return FirstHead()  # (the peer closed before a request)
    if conn.trailing_data[0]:
        return FirstHead(reason="head_timeout", status=408, message=timeout_message)
    return FirstHead(reason="handshake_timeout")


#: what an empty line begins with (CRLF; h11 reads a bare LF as a line's end too)
_EMPTY_LINE_START = (b"\r", b"\n")


def _empty_lines(data: bytes) -> int:
    """How many bytes of empty lines (``\\r?\\n`` each) ``data`` begins with: its run of CR and
    LF up to its first CR not followed by LF. (``bytes.lstrip`` and ``find``, ≈ 3 µs per KiB:
    the regular expression ``(?:\\r?\\n)*`` took 9 µs per KiB of CRLF and 16 of LF, and a flood
    of empty lines was the cheapest way to make a listener work: see
    ``tests/server/test_empty_lines_scan.py``.)"""
    run = len(data) - len(data.lstrip(b"\r\n"))
    if not run:
        return 0
    stop = data.find(b"\r\r", 0, run)  # (a CR followed by a CR: not an empty line's)
    if stop < 0:
        stop = run
    if data[stop - 1 : stop] == b"\r":  # (the run ends in a CR: not followed by LF here)
        stop -= 1
    return stop


async def skip_empty_lines(stream: trio.abc.ReceiveStream, data: bytes) -> tuple[bytes, int]:
    """``data``, the first bytes of a request, without the empty lines before its request line
    (RFC 9112 §2.2: a server SHOULD ignore at least one; h11 refuses any), reading on from
    ``stream`` while nothing else came; and how many bytes were skipped. The bytes returned
    begin a request line (or are what h11 refuses), or are ``b""``: the peer closed.

    Raises:
        h11.RemoteProtocolError: more than :data:`MAX_HEAD_BYTES` of empty lines (431: they
            count towards the head's bound).
    """
    skipped = 0
    while True:
        n = _empty_lines(data)
        if n:
            skipped += n
            data = data[n:]
        if skipped > MAX_HEAD_BYTES:
            raise h11.RemoteProtocolError(
                f"more than {MAX_HEAD_BYTES} bytes of empty lines before the request line", 431
            )
        if data and data != b"\r":  # (a lone CR: the rest of its line is still coming)
            return data, skipped
        more = await stream.receive_some(_READ)
        if not more:
            return data, skipped
        data += more


# RFC 9112 §3.2.2's absolute-form with an http(s) scheme (any case): its authority, then its path
# and query (a fragment is no part of a request target: such a target routes nowhere)
_ABSOLUTE_FORM = re.compile(r"(?i:https?)://([^/?#]*)([^#]*)")
# RFC 3986's authority with a host (RFC 9110 §4.2.1) and no user info (§4.2.4): an IP literal or
# a reg-name, then an optional port
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]+)(?::[0-9]*)?")


def route_path(target: str) -> str:
    """The path a request target names, its query dropped: what the listener's doors route by.

    * origin-form: ``/mcp?x=1`` → ``/mcp``;
    * absolute-form with an ``http`` or ``https`` scheme (any case): ``http://127.0.0.1:8079/mcp?x=1``
      → ``/mcp``, an empty path being ``/``. RFC 9112 §3.2.2: a server MUST accept this form,
      and the target's authority, not ``Host``, then says which host the request is for
      (:func:`request_host`). exai routes by neither (one host per listener), so here the
      authority is only checked to be one;
    * anything else — ``CONNECT``'s authority-form ``host:port``, ``OPTIONS``' ``*``, another
      scheme — is returned as it is: a path no door serves (404).

    Raises:
        ValueError: an absolute-form target whose authority has no host, carries user info or
            is not ``host[:port]`` (RFC 9110 §4.2.1: a recipient MUST reject an empty host;
            §4.2.4: user info SHOULD be treated as an error): the caller answers 400.
    """
    if target[:1] == "/":
        return target.split("?", 1)[0]
    form = _ABSOLUTE_FORM.fullmatch(target)
    if form is None:
        return target
    if _AUTHORITY.fullmatch(form[1]) is None:
        raise ValueError(
            f"the request target's authority {form[1][:100]!r} is not a host[:port]"
        )
    return form[2].split("?", 1)[0] or "/"


def request_host(target: str, hosts: list[str]) -> tuple[str | None, bool]:
    """The host a request names and whether it names more than one ``Host``: an absolute-form
    target's authority (RFC 9112 §3.2.2: it stands for ``Host``, which is then ignored), else
    its ``Host`` header (``None``: none). What :mod:`exai.server.origins` judges."""
    if target[:1] != "/":
        form = _ABSOLUTE_FORM.fullmatch(target)
        if form is not None:
            return form[1], False
    return (hosts[0] if hosts else None), len(hosts) > 1


def header_values(request: h11.Request, name: bytes) -> list[str]:
    """Every value of header ``name`` (lower-case bytes), in order (h11 lower-cases names)."""
    return [v.decode("latin-1") for k, v in request.headers if k == name]


def header(request: h11.Request, name: bytes) -> str | None:
    """The first value of header ``name``, or ``None``."""
    for k, v in request.headers:
        if k == name:
            return v.decode("latin-1")
    return None


def is_websocket_upgrade(request: h11.Request) -> bool:
    """Whether the request asks to upgrade to WebSocket (``Upgrade: websocket``)."""
    return any(
        "websocket" in (t.strip().lower() for t in v.split(","))
        for v in header_values(request, b"upgrade")
    )


_PHRASES = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (``b""`` for an unknown one)."""
    return _PHRASES.get(status, b"")


def json_body(reason: str, message: str, **extra: object) -> bytes:
    """The JSON body of a refusal before any JSON-RPC: ``{"error": reason, "message": …}``."""
    return json.dumps({"error": reason, "message": message, **extra}).encode()


#: After an answer on a connection that then closes, the rest of the request (a refused POST's
#: body, still arriving) is read and dropped for at most this long, at most
#: :data:`LINGER_BYTES` of it (see :func:`linger`) — or, for a body refused for its declared
#: ``Content-Length`` (413), the rest of that length, at most :data:`LINGER_MAX_BYTES` (as for
#: a body refused part-way, whose rest is of no known length).
LINGER_S = 1.0
LINGER_BYTES = 1 << 20
LINGER_MAX_BYTES = 64 << 20


async def linger(stream: trio.abc.HalfCloseableStream, max_bytes: int = LINGER_BYTES) -> None:
    """Say we are done (FIN) and read what the client is still sending, within bounds.

    Closing a socket whose input was not all read makes the kernel send a reset instead of a
    FIN, and a reset makes the client's kernel drop the answer it had not read yet: a refused
    request got no answer at all (under load, 5 % of a burst of refused POSTs). The caller
    closes the stream afterwards; a client that neither stops sending nor closes is cut off
    after :data:`LINGER_S` or ``max_bytes``.
    """
    try:
        with trio.move_on_after(LINGER_S):
            await stream.send_eof()
            left = max_bytes
            while left > 0:
                data = await stream.receive_some(64 * 1024)
                if not data:
                    return
                left -= len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def whole_response(
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes = b"",
    *,
    close: bool = False,
    length: int | None = None,
) -> bytes:
    """A whole response (``Content-Length`` set, but on a 204; ``Connection: close`` with
    ``close``) to a ``POST`` whose body was read: the bytes h11 writes for it, built without h11.

    The caller keeps h11's rules itself: one response per request (h11's state is left
    behind, the next request is read with a fresh one, or by :func:`parse_plain_request`),
    ``close`` whenever h11 would
    close (the request's own state is not ``DONE``: ``Connection: close`` or HTTP/1.0), and
    header values of its own making (h11 would refuse a CR or LF). Why: h11 validates and
    normalises each response's headers twice and runs its state machine for the head, the body
    and its end — ≈ 15 µs a response against ≈ 1.5 µs with a fresh state for the next request
    (issue 18; benchmarks/README.md, part 7). With ``length``, the head of a body of that
    length the caller writes after it (a large answer, in pieces: ``body`` is left out).
    """
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b""))]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1")))
    if status != 204:  # (RFC 9110 §8.6: a 204 carries no Content-Length)
        lines.append(b"Content-Length: %d\r\n" % (len(body) if length is None else length))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


def chunked_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    """The head of a chunked response (an SSE stream) to a plain HTTP/1.1 request the
    connection keeps (:func:`parse_plain_request`): the bytes h11 writes for it, built without
    h11 (the headers are the caller's own, ``Transfer-Encoding: chunked`` last). Its body is
    :func:`chunk` after :func:`chunk`, then :data:`LAST_CHUNK`."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b""))]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1")))
    lines.append(b"Transfer-Encoding: chunked\r\n\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body, as h11 writes it (nothing for no data)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


#: the end of a chunked body without trailers, as h11 writes it
LAST_CHUNK = b"0\r\n\r\n"


async def send_response(
    stream: trio.abc.SendStream,
    conn: h11.Connection,
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes = b"",
    *,
    close: bool = False,
    head_request: bool = False,
) -> None:
    """Send a whole response (``Content-Length`` set, but on a 204 — RFC 9110 §8.6 forbids it
    there; ``Connection: close`` with ``close``).

    With ``head_request`` (the request was ``HEAD``) only the head is sent: h11 refuses a body
    then, and a refusal with one never reached its client.

    Raises:
        trio.BrokenResourceError / trio.ClosedResourceError: the peer went away.
        h11.LocalProtocolError: the connection cannot carry a response now.
    """
    hs = [(k, v) for k, v in headers]
    if status != 204:  # (RFC 9110 §8.6: a 204 carries no Content-Length)
        hs.append(("Content-Length", str(len(body))))
    if close:
        hs.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=hs, reason=reason_phrase(status)))
    if body and not head_request and conn.our_state is h11.SEND_BODY:  # (none for 204, 304)
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


# ---------------------------------------------------------------- the plain request
#: the largest head :func:`parse_plain_request` takes (a larger one is h11's, bounded by
#: :data:`MAX_HEAD_BYTES`)
PLAIN_HEAD_BYTES = 16 * 1024
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
# h11's request line (``_abnf.request_line``) with the version fixed at 1.1
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
# h11's header field (``_abnf.header_field``: a value of visible bytes, spaces and tabs between
# optional whitespace) without the control bytes h11 lets through; the value is stripped after
_FIELD = rb"(" + _TOKEN + rb"):([\t\x20-\x7e\x80-\xff]*)\r\n"
_FIELD_LINE = re.compile(_FIELD)
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_DIGITS = re.compile(r"[0-9]{1,18}")
#: headers that change how h11 frames or follows a request: such a request is h11's
_NOT_PLAIN = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"connection"))


class PlainRequest:
    """A request :func:`parse_plain_request` read whole: the attributes of an
    :class:`h11.Request` (``method``, ``target``, ``headers`` as (lower-case name, value)
    pairs, ``http_version``), its body, and ``raw``, the bytes it was read from (head and
    body): what a fresh h11 state is fed when the door needs one for this request
    (:meth:`h11_state`)."""

    __slots__ = ("body", "fields", "headers", "method", "raw", "target")

    http_version = b"1.1"

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        fields: dict[bytes, list[str]],
        body: bytes,
        raw: bytes,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        #: the headers by name, each value decoded as latin-1, in order
        self.fields = fields
        self.body = body
        self.raw = raw

    def h11_state(self) -> h11.Connection:
        """A fresh h11 server state that has read this request to its end (to send a
        response h11 writes: a refusal, an SSE stream)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        conn.receive_data(self.raw)
        while True:
            event = conn.next_event()
            if type(event) is h11.EndOfMessage:
                return conn
            if not isinstance(event, h11.Request | h11.Data):  # (the tests rule this out)
                raise h11.LocalProtocolError(f"a plain request read as {event!r} by h11")


def parse_plain_request(data: bytes) -> tuple[PlainRequest, int] | None:
    """The request at the start of ``data`` when it is a plain one and all there — with the
    offset where it ends — else ``None``, and the caller gives ``data`` to h11.

    Plain: an HTTP/1.1 request line and header lines that h11's own grammar accepts (minus the
    control bytes, obsolete line folding and bare LF it tolerates), a head under
    :data:`PLAIN_HEAD_BYTES`, exactly one ``Host``, exactly one ``Content-Length`` (digits) whose
    body is all in ``data``, none of ``Transfer-Encoding``, ``Expect``, ``Upgrade``,
    ``Connection``, and a method other than ``CONNECT`` (after which h11 waits for the tunnel to be
    granted or refused). The target is h11's (origin-, absolute-, authority- or asterisk-form alike:
    the door reads it, :func:`route_path`). For such bytes h11 gives the same request, body and
    leftover bytes, and leaves the connection kept (``their_state`` ``DONE``):
    ``tests/server/test_http11.py`` checks this against h11 on the same bytes. Everything else —
    chunked bodies, conflicting or missing lengths, a head or body still arriving, anything
    malformed — is h11's to read (or refuse), as before. Why: h11 reads a request with its body in ≈
    20 µs, this in ≈ 4 µs (issue 18; benchmarks/README.md, part 10).
    """
    end = data.find(b"\r\n\r\n", 0, PLAIN_HEAD_BYTES)
    if end < 0:
        return None
    first = data.find(b"\r\n", 0, end + 2)
    line = _REQUEST_LINE.fullmatch(data, 0, first)
    if line is None or line[1] == b"CONNECT":
        return None
    # every header line h11's grammar (one match over the lines), then each one's name and value
    if _FIELDS.fullmatch(data, first + 2, end + 2) is None:
        return None
    pairs = _FIELD_LINE.findall(data, first + 2, end + 2)
    headers: list[tuple[bytes, bytes]] = []
    fields: dict[bytes, list[str]] = {}
    for name, value in pairs:
        name = name.lower()
        value = value.strip(b" \t")
        headers.append((name, value))
        found = fields.get(name)
        if found is None:
            fields[name] = [value.decode("latin-1")]
        else:
            found.append(value.decode("latin-1"))
    length = fields.get(b"content-length")
    hosts = fields.get(b"host")
    if (
        length is None
        or len(length) != 1
        or _DIGITS.fullmatch(length[0]) is None
        or hosts is None
        or len(hosts) != 1
        or not _NOT_PLAIN.isdisjoint(fields)
    ):
        return None
    stop = end + 4 + int(length[0])
    if len(data) < stop:
        return None
    return (
        PlainRequest(line[1], line[2], headers, fields, data[end + 4 : stop], data[:stop]),
        stop,
    )
