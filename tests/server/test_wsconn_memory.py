"""Memory an idle WebSocket session keeps (issue 8: ≤ 30 KB per idle session at 10,000;
``benchmarks run connections --full``: 33.5 KB before these, 30.0 after).

Each test pins one piece an idle session no longer holds: wsproto's handshake state after the
upgrade, an outbox's queue while nothing is queued, a message bucket's waiter queue while
nobody waits (an empty ``collections.deque`` holds a block of 64 slots, ≈ 0.6 KB).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

import exai.resilience.bucket as bucket_module
import exai.server.outbox as outbox_module
from exai.resilience import TokenBucket
from exai.server.budget import Ledger, MemoryBudget
from exai.server.outbox import Outbox
from exai.server.wsconn import ServerConnection
from tests.helpers import Rpc, make_settings, running_daemon, ws

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def test_an_accepted_connection_keeps_no_handshake_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: wsproto kept the upgrade's h11 connection and event queue for the connection's
    # life (≈ 1.7 KB of the 33.5). The attribute names are wsproto's own: if an upgrade renames
    # them, this fails instead of the drop silently doing nothing.
    accepted: list[ServerConnection] = []
    accept = ServerConnection._accept

    async def recording_accept(self: ServerConnection, *args: object) -> None:
        await accept(self, *args)  # type: ignore[arg-type]
        accepted.append(self)

    monkeypatch.setattr(ServerConnection, "_accept", recording_accept)
    async with running_daemon(make_settings(tmp_path)) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        assert "result" in await rpc.request("initialize", {"protocolVersion": "2025-06-18"})
        assert "result" in await rpc.request("ping")  # (the connection works on)
        [server] = accepted
        handshake = server._wsproto.handshake
        assert hasattr(handshake, "_h11_connection") and handshake._h11_connection is None
        assert hasattr(handshake, "_events") and handshake._events == ()


async def test_an_outbox_holds_a_queue_only_while_something_is_queued() -> None:
    ledger = Ledger(64, 1 << 20, MemoryBudget(1 << 30))
    outbox = Outbox(8, 1 << 20, ledger)
    assert outbox._queue is outbox_module._NOTHING_QUEUED
    await outbox.put("one")
    await outbox.put("two")
    assert outbox._queue is not outbox_module._NOTHING_QUEUED
    assert await outbox.get() == "one"
    outbox.written()
    assert await outbox.get() == "two"
    outbox.written()
    assert outbox._queue is outbox_module._NOTHING_QUEUED and len(outbox) == 0
    assert len(outbox_module._NOTHING_QUEUED) == 0  # (the shared one is never written to)
    await outbox.put("three")
    outbox.close(drop=True)
    assert outbox._queue is outbox_module._NOTHING_QUEUED and ledger.nbytes == 0


async def test_a_bucket_holds_a_waiter_queue_only_once_someone_waits() -> None:
    buckets = [TokenBucket(1000.0, 1.0) for _ in range(2)]
    assert all(b._waiters is bucket_module._NOBODY_WAITS for b in buckets)
    await buckets[0].acquire()
    assert buckets[0]._waiters is bucket_module._NOBODY_WAITS  # (passed without waiting)
    with trio.fail_after(10):
        await buckets[0].acquire()  # (empty: waits for a token)
    assert buckets[0]._waiters is not bucket_module._NOBODY_WAITS
    assert buckets[1]._waiters is bucket_module._NOBODY_WAITS
    assert len(bucket_module._NOBODY_WAITS) == 0
    assert sys.getsizeof(bucket_module._NOBODY_WAITS) > 500  # (what each bucket saves)
