"""A large message encoded, and written, in bounded pieces: no loop step grows with its size.

Encoding a message is one C call (msgspec) that holds the GIL throughout — a worker thread
would not help, the loop would wait for the GIL — and writing it as one WebSocket frame or
HTTP body copies it whole several times: a 16 MiB answer was one step of ≈ 0.4 s (issue 18:
no loop stall over 50 ms). :func:`encode_pieces` writes the same bytes as
:func:`exai.server.protocol.encode` (then UTF-8), but encodes each long string
(over :data:`LONG_CHARS`) on its own, :data:`PIECE_CHARS` characters at a time, with a
checkpoint after every :data:`STEP_BYTES` of output; the rest of the message (its skeleton,
each long string replaced by a placeholder) is one call, as before. The doors write a
:class:`Pieces` piece by piece (:func:`exai.server.outbox.send_pieces`), each write a step
of its own.

JSON escapes a string one code point at a time (both encoders, in every mode), so a string
encoded piece by piece is the string encoded whole; the mode (msgspec; the standard library;
its ASCII escapes when a lone surrogate makes the text unencodable as UTF-8) is the one the
whole message gets from :func:`~exai.server.protocol.encode`. Only for answers over
:data:`exai.server.core.LARGE_ANSWER_BYTES`: a small one is encoded as before, in one call.

What is not pieced: a skeleton that is itself large (a message made of very many short
strings or numbers: no tool of exai answers such a thing).
"""

from __future__ import annotations

import json
import json.encoder
import secrets
from collections.abc import Callable
from typing import Any, Final

import trio

from exai.server import protocol as p

__all__ = [
    "LONG_CHARS",
    "PIECE_CHARS",
    "STEP_BYTES",
    "Pieces",
    "Text",
    "encode_pieces",
    "encode_reply_pieces",
    "utf8",
]

#: a string longer than this is encoded apart from the message's skeleton, in pieces
LONG_CHARS: Final = 16 * 1024
#: characters of a long string encoded by one call (≤ 4 bytes each: ≈ 0.5 ms of CPU at most)
PIECE_CHARS: Final = 64 * 1024
#: output between two checkpoints while a message is encoded (≈ 1-2 ms of CPU)
STEP_BYTES: Final = 256 * 1024


class Pieces:
    """A message's UTF-8 bytes as pieces of at most ≈ :data:`STEP_BYTES` (the outbox counts
    it by :attr:`nbytes`, as it counts a ``str`` by its length)."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.nbytes = sum(map(len, parts))

    def __len__(self) -> int:
        return self.nbytes

    def text(self) -> str:
        """The message as one ``str`` (one step: for a writer that cannot take pieces)."""
        return b"".join(self.parts).decode("utf-8")


#: what the outbox holds and a door writes: a message's text, or a large one's pieces
Text = str | Pieces


def utf8(text: str | Pieces) -> bytes | Pieces:
    """What a door writes for ``text``: its UTF-8 bytes, or the pieces as they are."""
    return text if isinstance(text, Pieces) else text.encode("utf-8")


class _Collision(Exception):
    """A placeholder was found elsewhere in the skeleton (a string equal to it)."""


def _swap(node: Any, long: list[str], token: str) -> Any:
    """``node`` with every exact ``str`` longer than :data:`LONG_CHARS` replaced by a
    placeholder (``token`` and its index); containers holding none are the same objects."""
    t = type(node)
    if t is str:
        if len(node) > LONG_CHARS:
            long.append(node)
            return f"{token}{len(long) - 1}\x00"
        return node
    if t is dict:
        out = None
        for key, value in node.items():
            new = _swap(value, long, token)
            if new is not value:
                if out is None:
                    out = dict(node)
                out[key] = new
        return node if out is None else out
    if t is list or t is tuple:
        items = None
        for i, value in enumerate(node):
            new = _swap(value, long, token)
            if new is not value:
                if items is None:
                    items = list(node)
                items[i] = new
        if items is None:
            return node
        return items if t is list else tuple(items)
    return node


_Mode = tuple[Callable[[Any], bytes], Callable[[str], bytes]]


def _stdlib(ascii: bool) -> _Mode:
    quote = json.encoder.encode_basestring_ascii if ascii else json.encoder.encode_basestring

    def whole(value: Any) -> bytes:
        text = json.dumps(value, ensure_ascii=ascii, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")

    def string(value: str) -> bytes:
        return quote(value).encode("utf-8")

    return whole, string


_FAST: Final[_Mode] = (p._FAST_ENCODE, p._FAST_ENCODE)
_STDLIB: Final = _stdlib(False)
_ASCII: Final = _stdlib(True)


async def _encode(skeleton: Any, long: list[str], token: str, mode: _Mode) -> list[bytes]:
    whole, string = mode
    skel = whole(skeleton)
    marks = []
    for i in range(len(long)):
        mark = whole(f"{token}{i}\x00")
        at = skel.find(mark)
        if at < 0 or skel.find(mark, at + 1) >= 0:
            raise _Collision
        marks.append((at, len(mark)))
    parts: list[bytes] = []
    buf = bytearray()
    pos = 0
    for (at, size), value in zip(marks, long, strict=True):
        if at < pos:
            raise _Collision  # (out of order: cannot happen, dicts keep their order)
        buf += skel[pos:at]
        for start in range(0, len(value), PIECE_CHARS):
            piece = string(value[start : start + PIECE_CHARS])
            if start:
                buf += memoryview(piece)[1:-1]
            else:
                buf += memoryview(piece)[:-1]
            if len(buf) >= STEP_BYTES:
                parts.append(bytes(buf))
                buf.clear()
                await trio.lowlevel.checkpoint()
        buf += b'"'
        pos = at + size
    buf += skel[pos:]
    parts.append(bytes(buf))
    return parts


async def encode_pieces(msg: dict[str, Any]) -> Pieces:
    """:func:`exai.server.protocol.encode` of ``msg`` as UTF-8 bytes, in pieces, with a
    checkpoint after every :data:`STEP_BYTES` (see the module docstring).

    Raises:
        ValueError: as :func:`~exai.server.protocol.encode` (NaN, an infinity; TypeError:
            not JSON-serialisable).
    """
    await trio.lowlevel.checkpoint()  # (not in the step that made the answer)
    long: list[str] = []
    token = f"\x00exai-piece:{secrets.token_hex(8)}:"
    try:
        skeleton = _swap(msg, long, token)
    except RecursionError:
        long = []
    if not long:
        return Pieces([p.encode(msg).encode("utf-8")])
    try:
        if p._plain_json(msg):
            try:
                return Pieces(await _encode(skeleton, long, token, _FAST))
            except (TypeError, ValueError, OverflowError, RecursionError):
                pass  # (what msgspec refuses: as protocol.encode, the standard library's)
        try:
            return Pieces(await _encode(skeleton, long, token, _STDLIB))
        except UnicodeEncodeError:
            return Pieces(await _encode(skeleton, long, token, _ASCII))
    except _Collision:
        return Pieces([p.encode(msg).encode("utf-8")])


async def encode_reply_pieces(msg: dict[str, Any]) -> str | Pieces | None:
    """:func:`exai.server.protocol.encode_reply` in pieces (:func:`encode_pieces`): a
    message that cannot be encoded becomes the error for its id (a small ``str``)."""
    try:
        return await encode_pieces(msg)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        return p.unencodable_reply(msg, exc)
