"""HTTP/1.1 for the provider client, sans-IO: request bytes out, response head and body in.

:func:`request_bytes` writes a request head; :class:`ResponseReader` reads one response from the
bytes a connection delivers: its head (informational 1xx heads first), then its body framed by
``Transfer-Encoding: chunked``, ``Content-Length`` or the connection's end, and whether the
connection may carry another request. It does no I/O: :mod:`exai.providers.transport` moves the
bytes, the tests feed it anything.

Why not h11 (issue 18): h11 makes an event object and runs its state machine for every chunk
of a body (an SSE answer is a dozen chunks), and validates every request header through its
regexes on each send; under load that was a quarter of the provider client's CPU. This reader
parses a chunked body in a loop of ``bytes.find`` and slices and returns every body byte a read
delivered at once. What it accepts and rejects is h11's (0.16), held by differential tests that
feed both the same bytes split anywhere (``tests/providers/test_wire.py``): the grammar of the
status line and header fields (obsolete line folding included), ``Content-Length`` (equal
repeats only), ``Transfer-Encoding`` (``chunked`` only, once), chunk-size lines (extensions
ignored), the CRLF after each chunk, trailers, ``Connection: close`` and HTTP/1.0 ending
keep-alive, 204 / 304 / 1xx without a body, a body cut short by the connection's end.

One difference, on purpose: bytes after the end of a response (nothing was asked for them) make
the connection not reusable here; h11 would keep them for the next response.

Bounds: a head (or a chunk-size line, or the trailers) longer than ``max_head_bytes`` without
its end is an error, like h11's ``max_incomplete_event_size``; body bytes are handed out as they
arrive, so the caller's byte bounds see every read.
"""

from __future__ import annotations

import re

__all__ = ["Head", "ProtocolError", "ResponseReader", "check_header", "request_bytes"]


class ProtocolError(Exception):
    """The bytes are not an HTTP/1.1 response this reader accepts (or a request header is not
    one that may be sent)."""


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_CONTENT = rb"[^\x00\s]+(?:[ \t]+[^\x00\s]+)*"
_HEADER_RE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_CONTENT + rb")?[ \t]*")
_STATUS_RE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*))?")
_CHUNK_RE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*")
_BLANK_RE = re.compile(rb"\n\r?\n")
_NAME_RE = re.compile(_TOKEN)
_VALUE_RE = re.compile(rb"(?:" + _FIELD_CONTENT + rb")?")
_TARGET_RE = re.compile(rb"[\x21-\x7e]+")
_DIGITS_RE = re.compile(rb"[0-9]{1,20}")
_WS = b" \t"

# framing of the body being read
_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _CLOSE, _DONE = range(7)


def check_header(name: bytes, value: bytes) -> None:
    """Raise :class:`ProtocolError` unless ``name: value`` may be sent (h11's rules: a token,
    a value without line breaks, NUL or surrounding whitespace)."""
    if _NAME_RE.fullmatch(name) is None:
        raise ProtocolError(f"illegal header name {name!r}")
    if _VALUE_RE.fullmatch(value) is None:
        raise ProtocolError(f"illegal header value {value!r}")


def request_bytes(
    method: bytes, target: bytes, headers: bytes, extra: list[tuple[bytes, bytes]]
) -> bytes:
    """A request head: ``headers`` is already-checked ``name: value\\r\\n`` lines (the pool's
    own, built once, ``Host`` among them); ``extra`` are checked here, and a ``Host`` among
    them is refused as h11 refuses a second one. ``target`` must be printable ASCII."""
    if _TARGET_RE.fullmatch(target) is None:
        raise ProtocolError(f"illegal request target {target!r}")
    parts = [method, b" ", target, b" HTTP/1.1\r\n", headers]
    for name, value in extra:
        check_header(name, value)
        if name.lower() == b"host":
            raise ProtocolError("a request names Host: the pool writes its own (one Host only)")
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class Head:
    """A response head: status, HTTP version, reason, headers (names lower-case, in order)."""

    __slots__ = ("headers", "http_version", "reason", "status_code")

    def __init__(
        self,
        status_code: int,
        http_version: bytes,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.status_code = status_code
        self.http_version = http_version
        self.reason = reason
        self.headers = headers


def _header_lines(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines → (lower-case name, value); obsolete folding joins a line starting with
    whitespace to the one before it (with one space), as h11 does."""
    folded: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not folded:
                raise ProtocolError("continuation line at start of headers")
            folded[-1] = folded[-1] + b" " + line.lstrip(_WS)
        else:
            folded.append(line)
    out = []
    for line in folded:
        m = _HEADER_RE.fullmatch(line)
        if m is None:
            raise ProtocolError(f"illegal header line: {line!r}")
        out.append((m.group(1).lower(), m.group(2) or b""))
    return out


def _split_lines(block: bytes) -> list[bytes]:
    """A head's bytes (blank line included) → its lines, without line ends."""
    lines = block.split(b"\n")
    out = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    # the block ends in "\n\r?\n": the last two elements are the blank line and ""
    del out[-2:]
    return out


def _fields(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bool, bool]:
    """The framing fields, checked as h11 checks them: (Content-Length, chunked, close)."""
    length: bytes | None = None
    chunked = False
    close = False
    for name, value in headers:
        if name == b"content-length":
            values = {v.strip() for v in value.split(b",")}
            if len(values) != 1:
                raise ProtocolError("conflicting Content-Length headers")
            v = values.pop()
            if _DIGITS_RE.fullmatch(v) is None:
                raise ProtocolError("bad Content-Length")
            if length is not None and length != v:
                raise ProtocolError("conflicting Content-Length headers")
            length = v
        elif name == b"transfer-encoding":
            if chunked:
                raise ProtocolError("multiple Transfer-Encoding headers")
            if value.lower() != b"chunked":
                raise ProtocolError("only Transfer-Encoding: chunked is supported")
            chunked = True
        elif name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
            close = True
    return length, chunked, close


class ResponseReader:
    """One response on one connection: :meth:`feed` it bytes (``b""`` at the connection's end),
    take the head with :meth:`head`, then the body with :meth:`body` until :attr:`done`.

    Args:
        max_head_bytes: the longest head, chunk-size line or trailer block accepted.
    """

    __slots__ = (
        "_buf",
        "_framing",
        "_left",
        "_max_head",
        "_scanned",
        "done",
        "eof",
        "keep_alive",
    )

    def __init__(self, max_head_bytes: int) -> None:
        self._buf = b""
        self._max_head = max_head_bytes
        self._framing = -1  # head not read yet
        self._left = 0
        # how far into ``_buf`` the pending search for a head's or trailers' end has looked:
        # a head trickled a byte at a time is searched once, not once per read (100 KiB in
        # 1-byte reads: 3.6 s of CPU re-searching, against h11's 0.26 s)
        self._scanned = 0
        #: the response ended (body read to its end)
        self.done = False
        #: the connection's end was fed
        self.eof = False
        #: the server lets the connection carry another request (valid once done)
        self.keep_alive = True

    @property
    def leftover(self) -> bool:
        """Bytes arrived past the end of the response."""
        return bool(self._buf)

    def feed(self, data: bytes) -> None:
        """Bytes read from the connection; ``b""`` means the connection ended."""
        if not data:
            self.eof = True
        elif self._buf:
            self._buf += data
        else:
            self._buf = data

    # -- the head -----------------------------------------------------------------------
    def head(self) -> Head | None:
        """The next head (a 1xx one, or the response's), ``None`` until it has all arrived.

        Raises:
            ProtocolError: not an HTTP/1.x head we accept, too long, or the connection ended.
        """
        buf = self._buf
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":
            raise ProtocolError("no response line received")
        m = _BLANK_RE.search(buf, self._scanned)
        if m is None:
            self._scanned = max(0, len(buf) - 2)  # (an end may straddle the next read)
            if len(buf) > self._max_head:
                raise ProtocolError(f"a response head longer than {self._max_head} bytes")
            if self.eof:
                raise ProtocolError("the connection ended before the response head")
            return None
        end = m.end()
        self._scanned = 0
        block, self._buf = buf[:end], buf[end:]
        lines = _split_lines(block)
        status = _STATUS_RE.fullmatch(lines[0])
        if status is None:
            raise ProtocolError(f"illegal status line: {lines[0]!r}")
        code = int(status.group(2))
        version = status.group(1)
        head = Head(code, version, status.group(3) or b"", _header_lines(lines[1:]))
        self._framing_of(head)
        return head

    def _framing_of(self, head: Head) -> None:
        length, chunked, close = _fields(head.headers)
        code = head.status_code
        if code < 200:
            if code < 100:
                raise ProtocolError(f"illegal status code {code}")
            if code == 101:
                raise ProtocolError("a 101 (switching protocols) nobody asked for")
            return  # informational: no body; the response's head follows
        self.keep_alive = not close and head.http_version >= b"1.1"
        if code in (204, 304):
            self._framing, self._left = _LENGTH, 0
        elif chunked:
            self._framing, self._left = _CHUNK_SIZE, 0
        elif length is not None:
            self._framing, self._left = _LENGTH, int(length)
        else:
            self._framing = _CLOSE
            self.keep_alive = False
        if self._framing == _LENGTH and self._left == 0:
            self._framing = _DONE
            self.done = True

    # -- the body -----------------------------------------------------------------------
    def body(self) -> bytes:
        """Every body byte that can be taken now (``b""``: read more, unless :attr:`done`).

        Raises:
            ProtocolError: bad chunked framing, a line too long, or the connection ended inside
                the body.
        """
        framing = self._framing
        buf = self._buf
        if framing == _LENGTH:
            left = self._left
            if len(buf) >= left:
                out, self._buf = buf[:left], buf[left:]
                self._left = 0
                self._framing = _DONE
                self.done = True
                return out
            self._buf = b""
            self._left = left - len(buf)
            if self.eof:
                raise ProtocolError(
                    "the connection ended inside the body "
                    f"({self._left} of its Content-Length bytes missing)"
                )
            return buf
        if framing == _CLOSE:
            self._buf = b""
            if self.eof:
                self._framing = _DONE
                self.done = True
            return buf
        if framing == _DONE:
            return b""
        if framing < 0:
            raise RuntimeError("the body is read after the head")
        return self._chunked()

    def _chunked(self) -> bytes:
        buf = self._buf
        pos = 0
        n = len(buf)
        out: list[bytes] = []
        framing = self._framing
        left = self._left
        while True:
            if framing == _CHUNK_DATA:
                take = min(left, n - pos)
                if take:
                    out.append(buf[pos : pos + take])
                    pos += take
                    left -= take
                if left:
                    break
                framing = _CHUNK_CRLF
                left = 2
            if framing == _CHUNK_CRLF:
                have = buf[pos : pos + left]
                if have != b"\r\n"[2 - left : 2 - left + len(have)]:
                    raise ProtocolError(f"malformed chunk footer: {have!r}")
                pos += len(have)
                left -= len(have)
                if left:
                    break
                framing = _CHUNK_SIZE
            if framing == _CHUNK_SIZE:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if n - pos > self._max_head:
                        raise ProtocolError("a chunk-size line that does not end")
                    break
                m = _CHUNK_RE.fullmatch(buf, pos, nl)
                if m is None:
                    raise ProtocolError(f"illegal chunk header: {buf[pos : nl + 2]!r}")
                left = int(m.group(1), 16)
                pos = nl + 2
                framing = _CHUNK_DATA if left else _TRAILER
            if framing == _TRAILER:
                rest = buf[pos:]
                if rest[:1] == b"\n":
                    pos += 1
                elif rest[:2] == b"\r\n":
                    pos += 2
                else:
                    m = _BLANK_RE.search(rest, self._scanned)
                    if m is None:
                        self._scanned = max(0, len(rest) - 2)  # (rest is _buf from here)
                        if len(rest) > self._max_head:
                            raise ProtocolError("trailers that do not end")
                        break
                    self._scanned = 0
                    _fields(_header_lines(_split_lines(rest[: m.end()])))  # checked, dropped
                    pos += m.end()
                framing = _DONE
                self.done = True
                break
        self._framing = framing
        self._left = left
        self._buf = buf[pos:] if pos else buf
        if self.eof and not self.done and not out:
            raise ProtocolError("the connection ended inside the body (incomplete chunked read)")
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)
