"""ServerWSConnection reads a whole text frame the short way: the events are wsproto's, whatever
the bytes (issue 18)."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
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
from wsproto.utilities import LocalProtocolError

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
    assert proto._parse_more.gi_frame is not None  # (a generator, not finished)


def test_a_text_frame_goes_after_the_peers_close_only_when_the_connection_allows_it() -> None:
    # (ServerConnection allows it when it leaves the peer's close to its session: the answers
    # to what came before it; otherwise wsproto's refusal, as the comparisons here expect)
    for allowed in (False, True):
        server, client = _pair(ServerWSConnection(ConnectionType.SERVER))
        server.receive_data(client.send(CloseConnection(code=1000)))
        assert [type(e) for e in server.events()] == [CloseConnection]
        server.text_after_peer_close = allowed
        if allowed:
            client.receive_data(server.send(TextMessage(data="answer")))
            assert [_describe(e) for e in client.events()] == [
                ("TextMessage", "answer", True, True)
            ]
        else:
            with pytest.raises(LocalProtocolError):
                server.send(TextMessage(data="answer"))


def test_no_frame_is_read_after_one_that_failed_to_parse() -> None:
    # wsproto's frame parser ends with the failure (its state still OPEN) and reads nothing
    # more; the short way read the next whole text frame (found by the hypothesis comparison
    # below: three empty texts, a lone continuation, an empty text)
    empty = b"\x81\x80\x00\x00\x00\x00"
    lone_continuation = b"\x80\x80\x00\x00\x00\x00"
    _both(lambda: [empty, empty, lone_continuation, empty])
    _both(lambda: [lone_continuation, _frame(b"after")])


def _any_frame(first: int, payload: bytes, mask: bytes, width: int, masked: bool) -> bytes:
    """A frame with any first byte (FIN, RSV bits, opcode), the length in the shortest form or
    a longer one (``width`` 0, 1, 2: wsproto refuses a non-minimal one), masked or not."""
    n = len(payload)
    bit = 0x80 if masked else 0
    if width == 0 and n < 126:
        head = bytes([first, bit | n])
    elif width <= 1 and n < 65536:
        head = bytes([first, bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _drive(server: WSConnection, reads: list[tuple[bytes, str]]) -> list[tuple[Any, ...]]:
    """Each ``(bytes, then)`` read as trio-websocket's reader does (``receive_data``, then every
    event), the server closing (1008) after the read's first event or sending after it, as
    ``then`` says: the events, the bytes sent and what raised, for comparison."""
    out: list[tuple[Any, ...]] = []
    for data, then in reads:
        try:
            server.receive_data(data)
            for i, event in enumerate(server.events()):
                out.append(_describe(event))
                if then == "close_after_first" and i == 0:
                    out.append(("sent", server.send(CloseConnection(code=1008))))
            if then == "send_text":
                out.append(("sent", server.send(TextMessage(data="x"))))
        except Exception as exc:  # (compared as well: both ways must raise alike)
            out.append(("raised", type(exc).__name__, str(exc)))
    return out


any_frames = st.builds(
    _any_frame,
    st.one_of(
        st.sampled_from([0x81, 0x01, 0x80, 0x82, 0x88, 0x89, 0x8A, 0xC1]), st.integers(0, 255)
    ),
    st.one_of(
        st.binary(max_size=200),
        st.text(max_size=100).map(str.encode),
        st.sampled_from([b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82", b""]),
    ),
    st.one_of(st.just(b"\0\0\0\0"), st.binary(min_size=4, max_size=4)),
    st.sampled_from([0, 0, 0, 1, 2]),
    st.sampled_from([True] * 9 + [False]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reads=st.lists(
        st.tuples(any_frames, st.sampled_from(["read", "close_after_first", "send_text"])),
        max_size=6,
    )
)
def test_any_frame_read_as_trio_websocket_reads_gives_the_events_of_wsproto(
    reads: list[tuple[bytes, str]],
) -> None:
    """Frames of any first byte, length form, mask (zero too) or none, one read each, as
    trio-websocket's reader gives them (``receive_data`` then every event), with the server
    closing (1008: a stalled writer) after a read's first event or sending between reads: the
    events, the refusals and the bytes sent are wsproto's."""

    fast, _ = _pair(ServerWSConnection(ConnectionType.SERVER))
    plain, _ = _pair(WSConnection(ConnectionType.SERVER))
    assert _drive(fast, reads) == _drive(plain, reads)


def test_several_whole_text_frames_in_one_read_are_read_the_short_way() -> None:
    # a storm's client sends its calls at once: 13–20 of them come in one 4 KiB read. Before,
    # only a read of exactly one frame went the short way; several went through wsproto.
    fast = ServerWSConnection(ConnectionType.SERVER)
    server, client = _pair(fast)
    texts = ["a", "é中😀" * 40, "", "y" * 126]
    server.receive_data(b"".join(client.send(TextMessage(data=t)) for t in texts))
    assert fast._ready is not None and len(fast._ready) == 4  # (none given to wsproto)
    expected = [("TextMessage", t, True, True) for t in texts]
    assert [_describe(e) for e in server.events()] == expected
    # whole frames, then a ping and a part of a frame: the ping and what follows are wsproto's
    wire = client.send(TextMessage(data="b")) + client.send(Ping(b"p"))
    tail = client.send(TextMessage(data="c" * 300))
    server.receive_data(wire + tail[:10])
    assert fast._ready is not None and len(fast._ready) == 1
    got = [_describe(e) for e in server.events()]
    server.receive_data(tail[10:])
    got += [_describe(e) for e in server.events()]
    plain, _ = _pair(WSConnection(ConnectionType.SERVER))
    assert got == _events(plain, [wire + tail[:10], tail[10:]])
    assert got[:2] == [("TextMessage", "b", True, True), ("Ping", repr(Ping(b"p")))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(any_frames, max_size=6),
    then=st.sampled_from(["read", "close_after_first", "send_text"]),
    cut=st.integers(min_value=0, max_value=50),
)
def test_any_frames_in_one_read_give_the_events_of_wsproto(
    frames: list[bytes], then: str, cut: int
) -> None:
    """Several frames of any kind in one read (less the last ``cut`` bytes, read next), as
    trio-websocket's reader gives them, the server closing (1008) after the first event or
    sending after the read: the events, the refusals and the bytes sent are wsproto's."""
    wire = b"".join(frames)
    reads = [wire[: len(wire) - cut], wire[len(wire) - cut :]] if cut < len(wire) else [wire]

    steps = [(data, then) for data in reads]
    fast, _ = _pair(ServerWSConnection(ConnectionType.SERVER))
    plain, _ = _pair(WSConnection(ConnectionType.SERVER))
    assert _drive(fast, steps) == _drive(plain, steps)
