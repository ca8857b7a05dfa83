"""Finding the ``id`` of a JSON-RPC message that cannot be read as a whole.

A message refused before it is decoded (a stdio line over the size cap, text that is not JSON,
nesting past the limit, ``NaN``) used to be answered with ``"id": null``: no client can match
that answer to its request, so it waits for its own timeout, or forever. :func:`recover_id` looks
for the request's id with a **bounded** scan, so the error can carry it:

* the first :data:`ID_SCAN_BYTES` are tokenised (strings, numbers, brackets) while tracking
  nesting, and an ``"id"`` member of the top-level object is taken when its value is a string or
  an integer (the official Python SDK writes ``{"jsonrpc":"2.0","id":…,"method":…}``);
* the last :data:`ID_SCAN_BYTES` are matched for an ``"id"`` member followed only by scalar
  members up to the brace that closes the top-level object (the TypeScript SDK writes
  ``{…,"params":{…},"jsonrpc":"2.0","id":…}``).

The work is proportional to the windows, never to the message: a 4 MiB line costs the same as
a 10 KiB one. Text that is not JSON at all simply yields ``None`` (then ``null`` is the only honest
answer, as JSON-RPC says).

Sans-IO: bytes in, an id out.
"""

from __future__ import annotations

import json
import re
from typing import Final

__all__ = ["ID_SCAN_BYTES", "MAX_ID_BYTES", "recover_id", "recover_id_from_ends"]

#: Bytes looked at at each end of the message: enough for the envelope members around any id
#: a client sends, small enough that a refused frame costs the scan about a millisecond.
ID_SCAN_BYTES: Final = 4096
#: Longest id taken (as encoded JSON), the daemon's own limit on ids.
MAX_ID_BYTES: Final = 256

_TOKEN: Final = re.compile(
    rb'[ \t\r\n]*(?:("(?:[^"\\]|\\.)*")|([{}\[\]:,])|(-?[0-9][0-9.eE+-]*|true|false|null))',
    re.DOTALL,
)
_WS: Final = rb"[ \t\r\n]*"
_STR: Final = rb'"(?:[^"\\]|\\.)*"'
_SCALAR: Final = rb"(?:" + _STR + rb"|-?[0-9][0-9.eE+-]*|true|false|null)"
# "id": value, then only scalar members up to the brace that closes the top-level object
_TAIL_ID: Final = re.compile(
    rb"[,{]" + _WS + rb'"id"' + _WS + rb":" + _WS + rb"(-?[0-9]+|" + _STR + rb")"
    + rb"(?:" + _WS + rb"," + _WS + _STR + _WS + rb":" + _WS + _SCALAR + rb")*"
    + _WS + rb"\}" + _WS + rb"\Z",
    re.DOTALL,
)  # fmt: skip


def recover_id(text: str | bytes, *, max_id_bytes: int = MAX_ID_BYTES) -> str | int | None:
    """The id of the JSON-RPC request ``text`` (one message that failed to decode), or ``None``.

    Only a string or an integer id of at most ``max_id_bytes`` bytes is returned: anything else
    could not have been a valid id either.
    """
    n = ID_SCAN_BYTES
    if isinstance(text, str):
        head = text[:n].encode("utf-8", "surrogatepass")
        tail = text[-n:].encode("utf-8", "surrogatepass") if len(text) > n else b""
    else:
        head = bytes(text[:n])
        tail = bytes(text[-n:]) if len(text) > n else b""
    return recover_id_from_ends(head, tail, max_id_bytes=max_id_bytes)


def recover_id_from_ends(
    head: bytes, tail: bytes, *, max_id_bytes: int = MAX_ID_BYTES
) -> str | int | None:
    """Like :func:`recover_id`, given only the first and the last bytes of the message (what a
    reader that discarded the middle of an oversized line still holds). ``tail`` may be empty
    when ``head`` is the whole message."""
    found = _scan_head(head[:ID_SCAN_BYTES])
    if found is None:
        m = _TAIL_ID.search((tail or head)[-ID_SCAN_BYTES:])
        found = m.group(1) if m else None
    if found is None or len(found) > max_id_bytes:
        return None
    try:
        value = json.loads(found)
    except ValueError:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value


def _scan_head(head: bytes) -> bytes | None:
    """The raw value of a top-level ``"id"`` member found in ``head``, or ``None``."""
    pos = 0
    depth = 0
    key: bytes | None = None  # the member name just read at depth 1 (waiting for ':')
    want_value = False  # after ``"id":`` at depth 1
    expect_key = False  # at depth 1, after '{' or ','
    while pos < len(head):
        m = _TOKEN.match(head, pos)
        if m is None or m.end() == pos:
            return None  # not JSON, or the window ends inside a token
        pos = m.end()
        string, punct, scalar = m.group(1), m.group(2), m.group(3)
        if want_value:
            if string is not None or scalar is not None:
                return string if string is not None else scalar
            return None  # an object or array: not a valid id
        if punct in (b"{", b"["):
            depth += 1
            expect_key = depth == 1 and punct == b"{"
            if depth == 1 and punct == b"[":
                return None  # a batch
        elif punct in (b"}", b"]"):
            depth -= 1
            if depth <= 0:
                return None
        elif punct == b",":
            expect_key = depth == 1
        elif punct == b":":
            want_value = depth == 1 and key == b'"id"'
            key = None
        elif string is not None and depth == 1 and expect_key:
            key, expect_key = string, False
        elif depth == 0:
            return None  # a top-level scalar
    return None
