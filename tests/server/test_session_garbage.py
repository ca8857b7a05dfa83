"""A session that ends leaves no reference cycle: its objects are freed by reference counting
as it ends, not by the cycle collector (issue 18).

Each WebSocket session used to be a cycle (the core and the outbox held the session's bound
methods, the session held the core and the connection) and each HTTP request too (the core's
``on_call_done`` closure over the core): 70-odd and 20-odd objects, freed only by a collection
that blocks the loop — most of what the idle full collections of the peer benchmark walked and
freed (37–52 ms each on the benchmark VM, 3–11 ms without them).
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio

from exai.server.core import SessionCore
from exai.server.httpdoor import HttpConnection
from exai.server.outbox import Outbox, ProgressStream
from exai.server.session import Session
from exai.server.wsconn import ServerConnection
from tests.helpers import Rpc, make_settings, running_daemon, ws
from tests.httpmcp import ACCEPT_BOTH, envelope, raw_exchange, request_bytes

pytestmark = pytest.mark.anyio

WATCHED = (Session, SessionCore, HttpConnection, Outbox, ProgressStream, ServerConnection)


@contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage() -> Counter[str]:
    """The daemon's session objects that only the cycle collector would free, by type."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return Counter(type(o).__name__ for o in gc.garbage if isinstance(o, WATCHED))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def _no_sessions_left(daemon: object) -> None:
    with trio.fail_after(10):
        while len(daemon.sessions):  # type: ignore[attr-defined]
            await trio.sleep(0.01)


async def test_a_closed_websocket_session_is_no_cycle(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        with collector_off():
            for _ in range(3):
                async with ws(d) as conn:
                    rpc = Rpc(conn)
                    init = await rpc.request(
                        "initialize",
                        {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
                    )
                    assert "result" in init
                    reply = await rpc.call("version", meta={"progressToken": 1})
                    assert "result" in reply
            await _no_sessions_left(d)
            assert cyclic_garbage() == Counter()


async def test_a_finished_http_request_and_connection_are_no_cycle(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        headers = [("Content-Type", "application/json"), ("Accept", ACCEPT_BOTH)]
        with collector_off():
            for i in range(3):
                msg = {
                    "jsonrpc": "2.0",
                    "id": i,
                    "method": "tools/call",
                    "params": {"name": "version", "arguments": {}, "_meta": envelope()},
                }
                data = request_bytes(d.url, json.dumps(msg).encode(), headers=headers)
                status, _, body = await raw_exchange(d.url, data)
                assert status == 200, body
            await _no_sessions_left(d)
            assert cyclic_garbage() == Counter()
