"""exai.server.pieces: a large message encoded in pieces is the bytes the one-call encoder
writes (``protocol.encode``, then UTF-8), for every awkward string and piece boundary."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from exai.server import pieces
from exai.server import protocol as p
from exai.server.pieces import LONG_CHARS, PIECE_CHARS, STEP_BYTES, encode_pieces

#: one character of each kind an encoder may treat apart: ASCII, JSON's escapes and control
#: characters, two-, three- and four-byte UTF-8 (an astral one is one code point but two
#: UTF-16 units in an ASCII escape), the separators JavaScript minds, lone surrogates
AWKWARD = [
    "a",
    '"',
    "\\",
    "/",
    "\x00",
    "\x1f",
    "\x7f",
    "\n",
    "é",
    "ε",
    "\u2028",
    "\U0001f600",
    "\ud800",
    "\udfff",
]
#: lengths around the thresholds and piece boundaries
EDGES = [
    LONG_CHARS - 1,
    LONG_CHARS,
    LONG_CHARS + 1,
    PIECE_CHARS - 1,
    PIECE_CHARS,
    PIECE_CHARS + 1,
    2 * PIECE_CHARS,
    2 * PIECE_CHARS + 1,
]


def _old(msg: dict[str, Any]) -> bytes:
    return p.encode(msg).encode("utf-8")


def _new(msg: dict[str, Any]) -> pieces.Pieces:
    return trio.run(encode_pieces, msg)


def _answer(text: str, structured: Any = None, **extra: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": False}
    if structured is not None:
        result["structuredContent"] = structured
    return {"jsonrpc": "2.0", "id": 7, "result": {**result, **extra}}


def _runs() -> st.SearchStrategy[str]:
    """Strings of runs of awkward characters, a run's length often at an edge."""
    run = st.tuples(
        st.sampled_from(AWKWARD),
        st.one_of(st.integers(1, 40), st.sampled_from(EDGES), st.integers(1, 3 * PIECE_CHARS)),
    )
    return st.lists(run, min_size=1, max_size=4).map(lambda rs: "".join(c * n for c, n in rs))


@settings(max_examples=60, deadline=None)
@given(text=_runs(), other=_runs(), head=st.text(max_size=20))
def test_pieces_are_the_one_call_encoding(text: str, other: str, head: str) -> None:
    msg = _answer(head + text, {"content": text, "more": [other, 1, None, 2.5, {"k": other}]})
    got = _new(msg)
    want = _old(msg)
    assert b"".join(got.parts) == want
    assert got.nbytes == len(want) == len(got)


@pytest.mark.parametrize("length", EDGES)
@pytest.mark.parametrize("char", AWKWARD)
def test_a_string_at_each_edge_is_encoded_as_before(length: int, char: str) -> None:
    msg = _answer(char * length)
    assert b"".join(_new(msg).parts) == _old(msg)


def test_each_piece_is_bounded_and_a_small_message_is_one() -> None:
    msg = _answer("ε" * (3 * STEP_BYTES), {"content": "x" * (5 * STEP_BYTES)})
    got = _new(msg)
    assert len(got.parts) > 4
    # (a piece may pass STEP_BYTES by one encoded string's piece at most)
    assert max(map(len, got.parts)) <= STEP_BYTES + 6 * PIECE_CHARS + 2
    assert _new(_answer("short")).parts == [_old(_answer("short"))]


def test_what_msgspec_refuses_is_encoded_as_the_standard_library_would() -> None:
    # an integer past 64 bits (msgspec refuses it) beside a long string: the whole message
    # takes the standard library's way, as protocol.encode does
    msg = _answer("ü" * (PIECE_CHARS + 3), {"n": 2**70, "s": "\U0001f600" * LONG_CHARS})
    assert b"".join(_new(msg).parts) == _old(msg)
    # a lone surrogate anywhere makes the whole text ASCII escapes
    msg = _answer("ü" * (PIECE_CHARS + 3), {"n": "\udc00"})
    assert b"".join(_new(msg).parts) == _old(msg) and _old(msg).isascii()


def test_a_string_equal_to_a_placeholder_falls_back_to_one_call(monkeypatch) -> None:
    monkeypatch.setattr(pieces.secrets, "token_hex", lambda n: "f" * (2 * n))
    placeholder = f"\x00exai-piece:{'f' * 16}:0\x00"
    msg = _answer("a" * (LONG_CHARS + 1), {"tricky": placeholder})
    got = _new(msg)
    assert got.parts == [_old(msg)]


def test_an_unencodable_answer_becomes_the_same_error_as_before() -> None:
    msg = _answer("a" * (LONG_CHARS + 1), {"ratio": float("nan")})
    with pytest.raises(ValueError):
        _new(msg)
    assert trio.run(pieces.encode_reply_pieces, msg) == p.encode_reply(msg)
    notification = {"jsonrpc": "2.0", "method": "x", "params": {"a": "b" * LONG_CHARS, "n": {1}}}
    assert trio.run(pieces.encode_reply_pieces, notification) is None


@pytest.mark.anyio
async def test_encoding_checkpoints_between_pieces() -> None:
    # another task runs between the pieces: the encoder yields
    msg = _answer("ε" * (4 * STEP_BYTES))
    ran = 0

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        got = await encode_pieces(msg)
        nursery.cancel_scope.cancel()
    assert ran >= len(got.parts) - 1 > 2
