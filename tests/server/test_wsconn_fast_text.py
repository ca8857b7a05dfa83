"""ServerWSConnection reads a whole text frame the short way: the events are wsproto's, whatever
the bytes (issue 18)."""

from __future__ import annotations

import os
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Request,
    TextMessage,
)

from exai.server.wsconn import ServerWSConnection


def _pair(server: WSConnection) -> tuple[WSConnection, WSConnection]:
    """``server`` past its handshake, and the client that opened it."""
    client = WSConnection(ConnectionType.CLIENT)
    server.receive_data(client.send(Request(host="h", target="/mcp")))
    assert [type(e) for e in server.events()] == [Request]
    client.receive_data(server.send(AcceptConnection()))
    assert [type(e) for e in client.events()] == [AcceptConnection]
    return server, client


def _describe(event: Event) -> tuple[Any, ...]:
    if isinstance(event, Message):
        return (type(event).__name__, event.data, event.frame_finished, event.message_finished)
    if isinstance(event, CloseConnection):
        return ("close", event.code, event.reason)
    return (type(event).__name__, repr(event))


def _events(server: WSConnection, chunks: list[bytes]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for chunk in chunks:
        try:
            server.receive_data(chunk)
        except Exception as exc:  # (compared as well: both ways must raise alike)
            out.append(("raised", type(exc).__name__))
            break
        out.extend(_describe(e) for e in server.events())
    return out


def _frame(
    payload: bytes, *, first: int = 0x81, mask: bytes | None = None, length: int = -1
) -> bytes:
    """A client frame built by hand (any first byte, any length encoding)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload) if length < 0 else length
    if n < 126 and length < 0:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def _both(chunks_of: Any) -> None:
    plain, _ = _pair(WSConnection(ConnectionType.SERVER))
    fast, _ = _pair(ServerWSConnection(ConnectionType.SERVER))
    assert _events(fast, chunks_of()) == _events(plain, chunks_of())


def test_a_whole_text_frame_is_read_the_short_way() -> None:
    fast = ServerWSConnection(ConnectionType.SERVER)
    server, client = _pair(fast)
    for text in ["", "a", "é中😀" * 40, "x" * 125, "y" * 126, "z" * 4000]:
        server.receive_data(client.send(TextMessage(data=text)))
        assert fast._ready is not None  # (not given to wsproto)
        assert [_describe(e) for e in server.events()] == [("TextMessage", text, True, True)]
    # and what wsproto must read still goes to it
    server.receive_data(client.send(Ping(b"p")))
    assert [type(e) for e in server.events()] == [Ping]


messages = st.lists(
    st.one_of(
        st.text(max_size=300).map(lambda t: ("text", t)),
        st.binary(max_size=300).map(lambda b: ("raw", b)),
        st.binary(max_size=40).map(lambda b: ("bytes", b)),
        st.binary(max_size=20).map(lambda b: ("ping", b)),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=messages, splits=st.lists(st.integers(min_value=1, max_value=400), max_size=8))
def test_both_ways_give_the_same_events(items: list[tuple[str, Any]], splits: list[int]) -> None:
    _, client = _pair(WSConnection(ConnectionType.SERVER))  # (a client past its handshake)
    wire = b""
    for kind, value in items:
        if kind == "text":
            wire += client.send(TextMessage(data=value))
        elif kind == "bytes":
            wire += client.send(BytesMessage(data=value))
        elif kind == "ping":
            wire += client.send(Ping(value))
        else:  # a text frame whose payload is any bytes (invalid UTF-8 too)
            wire += _frame(value)
    # as one read per frame-ish piece, and as arbitrary reads
    cuts, at = [], 0
    for step in splits:
        if at + step >= len(wire):
            break
        cuts.append(wire[at : at + step])
        at += step
    cuts.append(wire[at:])
    _both(lambda: [wire])
    _both(lambda: list(cuts))


def test_frames_wsproto_refuses_are_refused_alike() -> None:
    cases = [
        _frame("é".encode()[:1]),  # invalid UTF-8
        _frame(b"abc", first=0xC1),  # RSV1 set
        _frame(b"abc", first=0x01),  # not FIN: a fragment, then nothing
        _frame(b"abc", first=0x83),  # reserved opcode
        _frame(b"a" * 100, length=100),  # a length in 2 bytes that fits in 1
        bytes([0x81, 0x03]) + b"abc",  # not masked
        _frame(b"\xed\xa0\x80"),  # a surrogate in UTF-8
        _frame(b"x" * 70_000),  # 64-bit length
    ]
    for frame in cases:
        _both(lambda frame=frame: [frame])
        _both(lambda frame=frame: [frame + _frame(b"after")])


def test_the_wsproto_internals_it_reads_are_there() -> None:
    server, _ = _pair(ServerWSConnection(ConnectionType.SERVER))
    conn = server.connection
    assert conn is not None
    proto = conn._proto
    assert conn._events is not None and proto.extensions == []
    assert proto._frame_decoder.header is None
    assert isinstance(proto._frame_decoder.buffer.buffer, bytearray)
    assert proto._message_decoder.opcode is None
