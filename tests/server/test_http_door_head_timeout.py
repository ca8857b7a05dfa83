"""A request head that began and did not come whole in time, on the MCP listener's port, over
real sockets, in-process (short ``handshake_timeout_s``; nothing here measures time), and one
over a memory stream under a mock clock.

RFC 9110 §15.5.9: such a client is answered ``408 Request Timeout`` with ``Connection: close``
(``head_timeout``), on a connection's first head (the listener's bound,
``EXAI_HANDSHAKE_TIMEOUT_S`` from the accept) and on a kept connection's later one (the door's:
the same bound from its first byte). A connection that sent nothing is closed without a word:
a new one at the handshake bound (``handshake_timeout``), a kept one at
``EXAI_HTTP_KEEPALIVE_S``. The bound is not renewed by each byte: a head trickled a byte at a
time is cut at it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing

from tests.helpers import make_settings, running_daemon
from tests.httpmcp import envelope, http_url, raw_exchange, request_bytes

pytestmark = pytest.mark.anyio

#: the start of a head, never finished
PARTIAL = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: appl"
#: a head that takes minutes to trickle a byte at a time
LONG_HEAD = b"POST /mcp HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n"


def _settings(tmp_path: Any, **kw: Any) -> Any:
    return make_settings(tmp_path, handshake_timeout_s=0.3, **kw)


def _ping(d: Any) -> bytes:
    msg = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": envelope()}}
    headers = [("Content-Type", "application/json"), ("Accept", "application/json")]
    return request_bytes(d.url, json.dumps(msg).encode(), headers=headers)


async def _connect(d: Any) -> trio.SocketStream:
    parts = urlsplit(http_url(d.url))
    return await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)


async def _read_to_end(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    data = b""
    with trio.fail_after(10):  # (a hang guard: the old door kept a kept head for 30 s)
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass  # (a reset after the answer: the linger ended with the client still sending)
    return data


async def _read_answer(stream: trio.abc.ReceiveStream) -> bytes:
    """One whole response with a Content-Length (head and body)."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += await stream.receive_some(65536)
    return data


def _assert_408(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"\r\nconnection: close" in head.lower()
    assert json.loads(body)["error"] == "head_timeout"


async def _trickle_until_answered(stream: trio.SocketStream, head: bytes) -> tuple[bytes, int]:
    """Send ``head`` a byte at a time until the daemon answers and closes: what it sent, and
    how many bytes of the head went out by then."""
    sent = 0
    answered = trio.Event()

    async def trickle() -> None:
        nonlocal sent
        while sent < len(head) and not answered.is_set():
            try:
                await stream.send_all(head[sent : sent + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            sent += 1
            await trio.sleep(0.02)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        answer = await _read_to_end(stream)
        answered.set()
    return answer, sent


async def test_a_first_head_begun_and_not_finished_in_time_is_answered_408(tmp_path):
    """The old listener closed such a connection at the handshake bound without a word; a
    connection that sent nothing still is."""
    async with running_daemon(_settings(tmp_path)) as d:
        async with await _connect(d) as stalled, await _connect(d) as silent:
            await stalled.send_all(PARTIAL)
            _assert_408(await _read_to_end(stalled))
            assert await _read_to_end(silent) == b""
        assert d.stats.rejections["head_timeout"] == 1
        assert d.stats.rejections["handshake_timeout"] == 1
        assert d.stats.rejections["session_error"] == 0
        status, _, _ = await raw_exchange(d.url, _ping(d))
        assert status == 200
        with trio.fail_after(10):
            while d.admission.open:
                await trio.sleep(0.01)


async def test_a_first_head_trickled_a_byte_at_a_time_is_cut_at_the_bound(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d:
        async with await _connect(d) as stream:
            answer, sent = await _trickle_until_answered(stream, LONG_HEAD)
        _assert_408(answer)
        assert sent < len(LONG_HEAD)  # (cut while the head was still arriving)
        assert d.stats.rejections["head_timeout"] == 1


async def test_a_kept_connections_next_head_begun_and_not_finished_in_time_is_answered_408(
    tmp_path,
):
    """The old door gave a kept connection's next head the idle connection's keep-alive bound
    (30 s here) and then closed it without a word."""
    async with running_daemon(_settings(tmp_path, http_keepalive_s=30)) as d:
        async with await _connect(d) as stream:
            await stream.send_all(_ping(d))
            assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")
            await stream.send_all(PARTIAL)
            _assert_408(await _read_to_end(stream))
        assert d.stats.rejections["head_timeout"] == 1
        assert d.stats.rejections["session_error"] == 0


async def test_a_kept_connections_next_head_trickled_a_byte_at_a_time_is_cut_at_the_bound(
    tmp_path,
):
    async with running_daemon(_settings(tmp_path, http_keepalive_s=30)) as d:
        async with await _connect(d) as stream:
            await stream.send_all(_ping(d))
            assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")
            answer, sent = await _trickle_until_answered(stream, LONG_HEAD)
        _assert_408(answer)
        assert sent < len(LONG_HEAD)
        assert d.stats.rejections["head_timeout"] == 1


async def test_an_idle_kept_connection_is_closed_without_a_word_at_the_keep_alive_bound(
    tmp_path,
):
    async with running_daemon(_settings(tmp_path, http_keepalive_s=1.0)) as d:
        async with await _connect(d) as stream:
            await stream.send_all(_ping(d))
            assert (await _read_answer(stream)).startswith(b"HTTP/1.1 200 ")
            assert await _read_to_end(stream) == b""
        assert d.stats.rejections["head_timeout"] == 0


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
@pytest.mark.parametrize("after_head", [b"", b"body"], ids=["head-only", "body-follows"])
async def test_a_malformed_head_refused_as_the_handshake_bound_ends_is_refused_once(
    tmp_path: Any, caplog: Any, after_head: bytes
) -> None:
    """A malformed first head that arrives shortly before ``handshake_timeout_s`` runs out, its
    client then keeping the connection open (or trickling): the 400 lingered within the head
    read's bound, so the bound ran out inside the refusal and the listener went on as if no
    head had come — counted a ``handshake_timeout`` too, or, with bytes after the head in
    h11's buffer, a ``head_timeout`` and a 408 that h11 refused (a second response), logged
    as a ``session.error`` at ERROR level: any client could write that line at will."""
    from exai.server.services import compose
    from exai.tools import default_registry

    daemon = compose(make_settings(tmp_path, handshake_timeout_s=5.0), default_registry())
    listener = daemon.listener
    ours, theirs = trio.testing.memory_stream_pair()
    received = bytearray()

    async def read_all() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await theirs.receive_some():
                received.extend(data)

    with caplog.at_level("INFO", logger="exai"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listener._handle_stream, ours)
            nursery.start_soon(read_all)
            await theirs.send_all(b"POST /mcp HTTP/1.1\r\nHost: x\r\n")
            await trio.sleep(4.5)  # (the bound is 5 s; the refusal may linger 1 s)
            await theirs.send_all(b"Bad Header Line\r\nContent-Length: 9\r\n\r\n" + after_head)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                for _ in range(100):  # a byte every 0.1 s: lingering is cut after 1 s
                    await trio.sleep(0.1)
                    await theirs.send_all(b"x")
    assert bytes(received).startswith(b"HTTP/1.1 400 "), bytes(received[:200])
    assert received.count(b"HTTP/1.1 ") == 1
    assert dict(listener.stats.rejections) == {"bad_request": 1}
    assert not [r for r in caplog.records if getattr(r, "event", None) == "session.error"]


def _metric(d: Any, name: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(d.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("reason") == reason:
                return sample.value
    return 0.0


async def test_a_first_head_cut_at_its_bound_is_a_refused_connection_a_kept_ones_is_not(
    tmp_path,
):
    """``exai_connections_rejected`` counts the connections refused before a session began:
    before c8484ae a first head cut at the handshake bound was counted there (as a
    ``handshake_timeout``); as a ``head_timeout`` it was counted in ``exai_rejections`` only.
    A kept connection's next head cut at its bound is a request's refusal, not a
    connection's."""
    async with running_daemon(_settings(tmp_path, http_keepalive_s=30)) as d:
        async with await _connect(d) as stalled, await _connect(d) as silent:
            await stalled.send_all(PARTIAL)
            _assert_408(await _read_to_end(stalled))
            assert await _read_to_end(silent) == b""
        assert _metric(d, "exai_connections_rejected_total", "head_timeout") == 1
        assert _metric(d, "exai_connections_rejected_total", "handshake_timeout") == 1
        assert _metric(d, "exai_rejections_total", "head_timeout") == 1
        async with await _connect(d) as kept:
            await kept.send_all(_ping(d))
            assert (await _read_answer(kept)).startswith(b"HTTP/1.1 200 ")
            await kept.send_all(PARTIAL)
            _assert_408(await _read_to_end(kept))
        assert _metric(d, "exai_rejections_total", "head_timeout") == 2
        assert _metric(d, "exai_connections_rejected_total", "head_timeout") == 1
