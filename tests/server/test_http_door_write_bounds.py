"""Every write of the HTTP door is bounded by ``EXAI_SEND_TIMEOUT_S`` — not only a call's answer
(e83bafc's ``_timed_write``) but the 202 of a notification, the 204 of a ``DELETE``, a refusal
and a ``100 Continue``: each of those was a plain ``send_all``, so a client that sent requests
and read none of the answers (its receive window full) held its connection, its task and its
connection slot for as long as it liked — found on a real socket with a client pipelining
notifications and reading nothing (1,900 of them, then the door stopped, for good).

Each test holds the daemon's write of one answer (a client that reads nothing) and checks that
the door gives up on it at the send timeout and closes the connection (MockClock: virtual time).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from exai.server.http11 import read_head
from exai.server.outbox import ProgressStream
from tests.helpers import make_settings, running_daemon
from tests.httpmcp import envelope, request_bytes

pytestmark = pytest.mark.anyio

SEND_TIMEOUT_S = 2.0
JSON_ONLY = [("Content-Type", "application/json"), ("Accept", "application/json")]


class HeldStream(trio.abc.HalfCloseableStream):
    """The daemon's side of a connection, in memory, whose writes from the ``hold_from``-th on
    never complete (a client whose receive window is full): they wait until cancelled."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, hold_from: int) -> None:
        self.inner = inner
        self.hold_from = hold_from
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        if len(self.writes) >= self.hold_from:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _message(method: str, *, id: Any = None, session: bool = False) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": {}}
    if not session:
        msg["params"]["_meta"] = envelope()
    if id is not None:
        msg["id"] = id
    return json.dumps(msg).encode()


async def _held_connection(
    d: Any, nursery: trio.Nursery, request: bytes, *, hold_from: int = 1
) -> tuple[trio.abc.Stream, HeldStream, trio.Event]:
    """Serve one in-memory connection with the daemon's HTTP door (``request`` sent on it) whose
    writes from the ``hold_from``-th on are held; the event is set when the door is done."""
    client, server = trio.testing.memory_stream_pair()
    held = HeldStream(server, hold_from)
    stream = ProgressStream(held)
    await client.send_all(request)
    head = await read_head(stream, keep_raw=False)
    assert head is not None
    done = trio.Event()

    async def serve() -> None:
        try:
            await d.http_door.serve(stream, head.conn, head.request, "127.0.0.1")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # (the listener's: a disconnect)
        finally:
            await stream.aclose()  # (as the listener does)
            done.set()

    nursery.start_soon(serve)
    return client, held, done


async def _given_up_at_the_send_timeout(d: Any, done: trio.Event) -> None:
    with trio.move_on_after(SEND_TIMEOUT_S * 20):  # (virtual time: the old code never ended)
        await done.wait()
    assert done.is_set(), "the door waited for the write past EXAI_SEND_TIMEOUT_S"
    assert d.stats.rejections["send_timeout"] == 1


_MOCK_CLOCK = pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)


@_MOCK_CLOCK
async def test_a_notifications_202_to_a_client_that_reads_nothing_is_given_up_on(tmp_path):
    settings = make_settings(tmp_path, send_timeout_s=SEND_TIMEOUT_S)
    async with running_daemon(settings) as d, trio.open_nursery() as nursery:
        request = request_bytes(d.url, _message("notifications/initialized"), headers=JSON_ONLY)
        _, held, done = await _held_connection(d, nursery, request)
        await _given_up_at_the_send_timeout(d, done)
        assert held.writes and held.writes[0].startswith(b"HTTP/1.1 202 ")


@_MOCK_CLOCK
async def test_a_refusal_to_a_client_that_reads_nothing_is_given_up_on(tmp_path):
    settings = make_settings(tmp_path, send_timeout_s=SEND_TIMEOUT_S)
    async with running_daemon(settings) as d, trio.open_nursery() as nursery:
        request = request_bytes(d.url, method="GET", headers=JSON_ONLY)
        _, held, done = await _held_connection(d, nursery, request)
        await _given_up_at_the_send_timeout(d, done)
        assert held.writes and held.writes[0].startswith(b"HTTP/1.1 405 ")


@_MOCK_CLOCK
async def test_a_100_continue_to_a_client_that_reads_nothing_is_given_up_on(tmp_path):
    settings = make_settings(tmp_path, send_timeout_s=SEND_TIMEOUT_S)
    async with running_daemon(settings) as d, trio.open_nursery() as nursery:
        body = _message("ping", id=1)
        request = request_bytes(
            d.url, headers=[*JSON_ONLY, ("Expect", "100-continue")], content_length=len(body)
        )
        _, held, done = await _held_connection(d, nursery, request)
        await _given_up_at_the_send_timeout(d, done)
        assert held.writes and held.writes[0].startswith(b"HTTP/1.1 100 ")


@_MOCK_CLOCK
async def test_a_deletes_204_to_a_client_that_reads_nothing_is_given_up_on(tmp_path):
    settings = make_settings(tmp_path, send_timeout_s=SEND_TIMEOUT_S)
    async with running_daemon(settings) as d, trio.open_nursery() as nursery:
        init = _message("initialize", id=1, session=True)
        init = json.dumps(
            {
                **json.loads(init),
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            }
        ).encode()
        client, held, done = await _held_connection(
            d, nursery, request_bytes(d.url, init, headers=JSON_ONLY), hold_from=2
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await client.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        at = answer.lower().index(b"mcp-session-id: ") + len(b"mcp-session-id: ")
        session_id = answer[at:].split(b"\r\n", 1)[0]
        delete = request_bytes(
            d.url,
            method="DELETE",
            headers=[
                ("Mcp-Session-Id", session_id.decode()),
                ("MCP-Protocol-Version", "2025-11-25"),
            ],
        )
        await client.send_all(delete)
        await _given_up_at_the_send_timeout(d, done)
        assert len(held.writes) == 2 and held.writes[1].startswith(b"HTTP/1.1 204 "), held.writes
