"""The bounds of issue 11 at unit level: result store bytes, the outbox, the ledger and the
daemon budget, the memory backstop, and the writer's send deadline."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import threading
from typing import Any
from unittest.mock import ANY

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from exai.server.budget import Ledger, MemoryBudget
from exai.server.calls import CallRegistry, Finished
from exai.server.compact import approx_size, compact, expand
from exai.server.outbox import Outbox, ProgressStream
from exai.server.overload import MemoryReading
from exai.tools.base import ToolResult
from tests.daemon_tools import BLOB
from tests.helpers import (
    Rpc,
    make_settings,
    raw_upgrade,
    registry_with,
    running_daemon,
    ws,
    ws_frame,
)

pytestmark = pytest.mark.anyio

KiB = 1024


def chat_like(body: str, footer: str = "model: m") -> dict[str, Any]:
    """A payload shaped like chat's: the answer in the text and in structuredContent."""
    result = ToolResult(text=body.rstrip() + "\n\n---\n" + footer, structured={"content": body})
    return {"result": result.to_mcp()}


def registry(**kw: Any) -> CallRegistry:
    kw.setdefault("ttl_s", 600.0)
    kw.setdefault("max_entries", 10_000)
    kw.setdefault("max_bytes", 1 << 30)
    return CallRegistry(orphan_grace_s=30.0, **kw)


# ------------------------------------------------------------------------ the result store


def test_a_chat_answer_is_stored_with_its_text_once() -> None:
    payload = chat_like("x" * 100 * KiB + "  \n")

    stored = compact(payload)

    assert approx_size(payload) > 200 * KiB
    assert approx_size(stored) < 110 * KiB
    assert expand(stored) == payload


def test_a_consensus_like_answer_with_several_long_strings_is_stored_once_each() -> None:
    a, b = "a" * 5 * KiB, "b" * 7 * KiB
    text = f"## one\n{a}\n## two\n{b}\n---\nfooter"
    payload = {
        "result": {
            "content": [{"type": "text", "text": text}],
            "isError": False,
            "structuredContent": {"consultations": [{"content": a}, {"content": b}]},
        }
    }

    stored = compact(payload)

    assert approx_size(stored) < approx_size(payload) - 11 * KiB
    assert expand(stored) == payload


@given(
    body=st.text(min_size=0, max_size=3000),
    before=st.text(max_size=20),
    after=st.text(max_size=20),
)
def test_compact_then_expand_gives_the_payload_back(body: str, before: str, after: str) -> None:
    payload = {
        "result": {
            "content": [{"type": "text", "text": before + body.rstrip() + after}],
            "isError": False,
            "structuredContent": {"content": body, "n": 1},
        }
    }

    assert expand(compact(payload)) == payload


async def test_the_store_keeps_its_byte_budget_oldest_first() -> None:
    calls = registry(max_bytes=300 * KiB)
    sizes = [calls.store(f"k{i}", "d", chat_like(str(i) * 100 * KiB)) for i in range(5)]

    assert all(100 * KiB < s < 110 * KiB for s in sizes)
    assert calls.nbytes <= 300 * KiB
    assert [calls.finished(f"k{i}") is None for i in range(5)] == [True, True, True, False, False]
    assert calls.evicted == 3


async def test_an_answer_larger_than_the_whole_budget_is_not_kept() -> None:
    calls = registry(max_bytes=50 * KiB)
    calls.store("small", "d", chat_like("s"))

    calls.store("big", "d", chat_like("b" * 100 * KiB))

    assert calls.finished("big") is None and calls.too_large == 1
    assert calls.finished("small") is not None


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
async def test_a_stored_answer_comes_back_with_its_digest_and_expires() -> None:
    calls = registry(ttl_s=10.0)
    calls.store("k", "digest-1", chat_like("y" * 2 * KiB))

    found = calls.finished("k")
    assert found is not None and found.digest == "digest-1"
    assert found.payload == chat_like("y" * 2 * KiB)
    await trio.sleep(11)
    assert calls.finished("k") is None and calls.nbytes == 0


@pytest.mark.anyio(False)
def test_stored_answers_are_nothing_for_the_cycle_collector_to_walk() -> None:
    # Every dict and list a stored answer keeps is walked by every full collection, which
    # blocks the loop: 10,000 answers kept for ten minutes were most of what the idle full
    # collections of the peer benchmark walked (issue 18). Kept pickled, an answer is one bytes
    # object (its entry tuple, holding no tracked object, is untracked by the next collection).
    # (Not an async test: the collections below would be stalls of its loop. The registry
    # reads trio's clock, so the test runs in a trio run on a thread of its own.)
    async def main() -> None:
        calls = registry()
        gc.collect()
        before = len(gc.get_objects())
        for i in range(1000):
            calls.store(f"k{i}", "d", chat_like(f"answer {i} " * 10))
            calls.store(f"long{i}", "d", chat_like(f"{i}" * 2 * KiB))  # (compacted: a _Spliced)
        gc.collect()
        assert len(gc.get_objects()) - before < 100
        # ... and each comes back as it was given
        assert calls.finished("k7") == Finished("d", chat_like("answer 7 " * 10), ANY)
        assert calls.finished("long7") == Finished("d", chat_like("7" * 2 * KiB), ANY)

    failed: list[BaseException] = []

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # (re-raised below, on the test's thread)
            failed.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


async def test_an_answer_that_cannot_be_pickled_is_kept_as_it_is() -> None:
    calls = registry()
    odd = {"result": {"content": [], "structuredContent": {"lock": threading.Lock()}}}
    calls.store("k", "d", odd)
    found = calls.finished("k")
    assert found is not None and found.payload == odd


async def test_shrinking_under_memory_pressure_keeps_at_most_the_fraction_asked() -> None:
    calls = registry(max_bytes=1000 * KiB)
    for i in range(8):
        calls.store(f"k{i}", "d", chat_like(str(i) * 100 * KiB))

    calls.shrink(0.5)

    assert calls.nbytes <= 500 * KiB and len(calls) == 4


# ------------------------------------------------------------------------ ledger and budget


def test_a_ledger_refuses_past_its_count_and_its_bytes() -> None:
    ledger = Ledger(max_count=2, max_bytes=600, budget=MemoryBudget(limit_bytes=10_000))

    assert ledger.refusal(100) is None
    ledger.admit(100)
    assert "EXAI_SESSION_MAX_PENDING_BYTES=600" in (ledger.refusal(550) or "")
    ledger.admit(400)
    assert "EXAI_SESSION_MAX_PENDING=2" in (ledger.refusal(1) or "")
    ledger.done(100)
    assert ledger.refusal(1) is None


def test_the_daemon_budget_keeps_a_reserve_for_sessions_that_hold_little() -> None:
    mib = 1024 * 1024
    budget = MemoryBudget(limit_bytes=4 * mib)  # and a reserve of 1 MiB for light sessions
    heavy = Ledger(max_count=10, max_bytes=64 * mib, budget=budget)
    for _ in range(2):
        assert heavy.refusal(2 * mib) is None
        heavy.admit(2 * mib)

    # the limit is reached: a session holding a lot is refused …
    assert "EXAI_MAX_PENDING_BYTES" in (heavy.refusal(KiB) or "")
    assert not budget.full
    # … sessions holding little are still admitted, from the reserve
    light = [Ledger(max_count=10, max_bytes=64 * mib, budget=budget) for _ in range(3)]
    for ledger in light[:2]:
        assert ledger.refusal(512 * KiB) is None
        ledger.admit(512 * KiB)
    assert budget.light_bytes == mib and budget.heavy_bytes == 4 * mib
    # the reserve is used up: the budget is full, everything is refused
    assert light[2].refusal(512 * KiB) is not None
    assert budget.full

    light[0].release_all()  # the reserve drains below 80 %: admitting again
    assert not budget.full
    assert light[2].refusal(512 * KiB) is None


def test_a_session_moves_between_the_pools_as_it_crosses_the_threshold() -> None:
    mib = 1024 * 1024
    budget = MemoryBudget(limit_bytes=64 * mib)
    ledger = Ledger(max_count=10, max_bytes=64 * mib, budget=budget)
    ledger.admit(KiB)
    assert budget.light_bytes == KiB

    ledger.add(2 * mib)  # its answer arrives: now it holds a lot
    assert budget.light_bytes == 0 and budget.heavy_bytes == 2 * mib + KiB

    ledger.done(2 * mib)  # written: light again
    assert budget.light_bytes == KiB == budget.charged_bytes
    ledger.release_all()
    assert budget.charged_bytes == 0 == budget.light_bytes


def test_a_lone_request_larger_than_the_session_bytes_is_still_admitted() -> None:
    ledger = Ledger(max_count=4, max_bytes=100, budget=MemoryBudget(10_000))

    assert ledger.refusal(5000) is None


# ------------------------------------------------------------------------ outbox


async def test_the_outbox_bounds_count_and_bytes_and_drops_only_advisory_messages() -> None:
    budget = MemoryBudget(1 << 20)
    ledger = Ledger(max_count=8, max_bytes=1 << 20, budget=budget)
    box = Outbox(max_count=3, max_bytes=100, ledger=ledger)

    assert box.put_nowait("a" * 200)  # alone, a message larger than the bound goes in
    assert not box.put_nowait("b")  # then nothing fits until it is written
    assert ledger.nbytes == 200 == budget.charged_bytes

    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def must_deliver() -> None:
            await box.put("c" * 50)
            done.set()

        nursery.start_soon(must_deliver)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()  # waits for room
        assert await box.get() == "a" * 200
        box.written()
        await done.wait()
    assert ledger.nbytes == 50

    box.close(drop=True)
    assert ledger.nbytes == 0 == budget.charged_bytes
    with pytest.raises(trio.ClosedResourceError):
        await box.put("d")


def test_a_progress_message_that_cannot_be_queued_is_never_encoded(tmp_path) -> None:
    """Progress into a full outbox is dropped before it is encoded (issue 18: the encoding was
    the cost, the drop came after it), and counted as before."""
    from exai.server.auth import Identity
    from exai.server.core import SessionCore
    from exai.server.services import compose
    from exai.tools import default_registry

    encoded: list[dict[str, Any]] = []

    def encode(msg: dict[str, Any]) -> str:
        encoded.append(msg)
        return "x" * 10

    settings = make_settings(tmp_path, session_max_pending_bytes=20)
    daemon = compose(settings, default_registry())

    async def close(code: int, reason: str) -> None:
        pass

    core = SessionCore(
        daemon.sessions.shared, settings, "127.0.0.1", Identity("anonymous", b""), close=close,
        encode=encode,
    )  # fmt: skip
    core.send_progress({"n": 1})
    core.send_progress({"n": 2})  # 20 bytes queued: full
    core.send_progress({"n": 3})
    assert [m["n"] for m in encoded] == [1, 2]
    assert len(core.outbox) == 2
    assert daemon.stats.progress_dropped == 1
    core.outbox.close(drop=True)
    assert core.outbox.full()


async def test_a_progress_stream_reports_progress_per_chunk_that_more_follow() -> None:
    """Progress renews a writer's deadline for what is left to write: after each 64 KiB chunk
    but the last of a write (so none for a write of one chunk)."""
    left, right = trio.testing.memory_stream_pair()
    stream = ProgressStream(left)
    seen: list[int] = []
    stream.on_progress = lambda: seen.append(1)

    async with trio.open_nursery() as nursery:

        async def drain() -> None:
            got = 0
            while got < 264 * KiB:
                got += len(await right.receive_some())

        nursery.start_soon(drain)
        await stream.send_all(b"x" * 200 * KiB)
        assert len(seen) == 3  # 4 chunks of at most 64 KiB
        await stream.send_all(b"x" * 64 * KiB)
        assert len(seen) == 3


# ------------------------------------------------------------------------ memory backstop


class FakeMemory:
    def __init__(self, used: int, limit: int = 1000) -> None:
        self.used = used
        self.limit = limit

    async def __call__(self) -> MemoryReading:
        return MemoryReading(self.used, self.limit, "fake")


async def test_high_rss_with_nothing_pending_does_not_keep_the_daemon_refusing(tmp_path):
    """A heap that never shrinks must not stop admission forever (the bug of issue 11.3)."""
    async with running_daemon(make_settings(tmp_path)) as d, ws(d) as conn:
        assert d.memory is not None
        d.memory.reader = FakeMemory(950)  # above the high watermark, and it stays there
        await d.memory.check()
        assert d.overloaded_reason is None  # nothing pending: caches shed, still admitting
        assert d.memory.sheds == 1
        assert (await Rpc(conn).call("version"))["result"]["isError"] is False


async def test_a_known_memory_limit_sizes_the_pending_budget(tmp_path):
    mib = 1024 * 1024
    settings = make_settings(
        tmp_path,
        result_cache_max_bytes=8 * mib,
        thread_cache_max_bytes=4 * mib,
        max_frame_bytes=mib,
    )
    async with running_daemon(settings) as d:
        assert d.memory is not None
        d.memory._planned = False
        d.memory.reader = FakeMemory(100 * mib, limit=200 * mib)
        await d.memory.check()
        # 0.9 × 200 MiB − 100 MiB at start − 8 MiB of result store − 4 MiB of thread cache
        assert d.budget.limit_bytes == 180 * mib - 100 * mib - 8 * mib - 4 * mib


# ------------------------------------------------------------------------ the writer


async def test_a_peer_that_stops_reading_is_closed_once_the_writer_makes_no_progress(tmp_path):
    settings = make_settings(
        tmp_path, send_timeout_s=0.5, session_rate_per_s=10_000, session_burst=10_000
    )
    async with running_daemon(settings) as d, ws(d) as bystander:
        async with ws(d) as reader:
            # a stuck TCP window: the peer's socket is never read
            big = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            with contextlib.suppress(ConnectionClosed):  # (closed by the daemon meanwhile)
                for _ in range(3000):
                    await Rpc(reader).send(big)
            with trio.fail_after(20):
                while d.stats.rejections.get("send_timeout", 0) == 0:
                    await trio.sleep(0.05)
            # Now read what is left: the client's own reader task may still be blocked putting
            # an answer into its full message queue, and leaving the block would wait for it
            # forever (trio-websocket's close does not close that queue; seen hanging under load).
            with trio.fail_after(20), contextlib.suppress(ConnectionClosed):
                while True:
                    await reader.get_message()
        with trio.fail_after(20):
            while d.admission.open > 1:
                await trio.sleep(0.05)
        assert d.budget.charged_bytes < 4096
        assert (await Rpc(bystander).request("ping"))["result"] == {}


async def _refused_with_1013(d: Any, bystander: Any, padding: str) -> None:
    """A ping carrying ``padding`` on a new connection is closed with 1013, what it was charged
    is given back, and ``bystander`` is still answered."""
    async with ws(d) as big:
        with contextlib.suppress(ConnectionClosed):
            await big.send_message('{"jsonrpc":"2.0","id":1,"method":"ping","x":"' + padding + '"}')
            await big.get_message()
        assert big.closed is not None and big.closed.code == 1013
    with trio.fail_after(10):
        while d.budget.charged_bytes > 4096:
            await trio.sleep(0.01)
    assert (await Rpc(bystander).request("ping"))["result"] == {}


async def test_frames_past_the_daemon_budget_close_their_connection_with_1013(tmp_path):
    mib = 1024 * 1024
    settings = make_settings(tmp_path, max_pending_bytes=mib, max_frame_bytes=4 * mib)
    async with running_daemon(settings) as d, ws(d) as bystander:
        await _refused_with_1013(d, bystander, "y" * 2 * mib)


async def test_a_frame_is_charged_its_utf8_bytes_not_its_characters(tmp_path):
    """300 K four-byte characters are 1.2 MB: past a 1 MiB budget (trio-websocket counts
    300 K); what a session's non-ASCII messages were charged is given back in full."""
    mib = 1024 * 1024
    settings = make_settings(tmp_path, max_pending_bytes=mib, max_frame_bytes=4 * mib)
    async with running_daemon(settings) as d, ws(d) as bystander:
        async with ws(d) as talker:
            for i in range(20):
                await talker.send_message(
                    json.dumps(
                        {"jsonrpc": "2.0", "id": i, "method": "ping", "x": "é中\U0001f600" * 1000},
                        ensure_ascii=False,
                    )
                )
                assert json.loads(await talker.get_message())["id"] == i
            assert d.budget.charged_bytes < 4096
        await _refused_with_1013(d, bystander, "\U0001f600" * 300_000)


# ------------------------------------------------------------------ direct writes (issue 18)


def _outbox() -> Outbox:
    return Outbox(8, 1 << 20, Ledger(100, 1 << 20, MemoryBudget(1 << 30)))


async def test_a_direct_put_is_written_by_its_own_task_and_what_queues_meanwhile_follows() -> None:
    outbox = _outbox()
    written: list[str] = []
    release = trio.Event()

    async def direct(text: str) -> None:
        written.append(f"direct:{text}")
        await release.wait()

    async def writer() -> None:
        while True:
            try:
                text = await outbox.get()
            except trio.EndOfChannel:
                return
            written.append(f"writer:{text}")
            outbox.written()

    outbox.direct = direct
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(functools.partial(outbox.put, "a", direct=True))
        await trio.testing.wait_all_tasks_blocked()
        assert written == ["direct:a"] and len(outbox) == 1  # still queued, still charged
        outbox.put_nowait("b")  # a progress message while the answer is being written
        await outbox.put("c", direct=True)  # something is queued: no direct write
        await trio.testing.wait_all_tasks_blocked()
        assert written == ["direct:a"]  # the writer leaves the queue alone meanwhile
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        outbox.close(drop=False)
    assert written == ["direct:a", "writer:b", "writer:c"]
    assert outbox.ledger.nbytes == 0


async def test_a_put_without_direct_is_handed_to_the_writer() -> None:
    outbox = _outbox()

    async def direct(text: str) -> None:
        raise AssertionError("not a direct put")

    outbox.direct = direct
    await outbox.put("a")
    assert await outbox.get() == "a"


async def test_dropping_the_queue_during_a_direct_write_refunds_everything_once() -> None:
    outbox = _outbox()

    async def direct(text: str) -> None:
        outbox.close(drop=True)  # the session is torn down meanwhile
        await trio.lowlevel.checkpoint()

    outbox.direct = direct
    await outbox.put("abc", direct=True)
    assert outbox.ledger.nbytes == 0 and len(outbox) == 0


# (the 6 MiB answer — it must outgrow loopback's socket buffers — was one step of ≈ 93 ms
# and needed a 0.3 s stall threshold until it was encoded and written in pieces:
# exai.server.pieces, tests/server/test_large_answers.py)
async def test_a_peer_that_reads_no_answer_is_closed_by_the_direct_write_deadline(tmp_path):
    # one call whose answer is far larger than the socket buffers, on a connection that never
    # reads: the responder writes it itself (nothing else queued), and must give up with 1008
    settings = make_settings(
        tmp_path, send_timeout_s=0.5, session_rate_per_s=10_000, session_burst=10_000
    )
    async with running_daemon(settings, registry_with(BLOB)) as d, ws(d) as bystander:
        stream, status, _, _ = await raw_upgrade("127.0.0.1", _port(d.url))
        assert status == 101
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "blob", "arguments": {"bytes": 6 * 1024 * KiB}},
        }
        await stream.send_all(ws_frame(json.dumps(call).encode()))
        with trio.fail_after(30):
            while d.stats.rejections.get("send_timeout", 0) == 0:
                await trio.sleep(0.05)
        with trio.fail_after(20):
            while d.admission.open > 1:
                await trio.sleep(0.05)
        await stream.aclose()
        assert (await Rpc(bystander).request("ping"))["result"] == {}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])
