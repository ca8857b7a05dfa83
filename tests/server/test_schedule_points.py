"""How often a call's task yields to the scheduler (issue 18, concurrency 1).

At concurrency 1 nothing is shared between calls, and every time the loop puts a task aside and
resumes it costs CPU on the benchmark VM (a scheduler round, often a sleep and a wake-up of the
whole loop). So a call's responder yields only where it must wait for something — its upstream's
bytes, the store thread's answer — never merely because a primitive checkpoints: a free provider
slot is taken at once, a call already finished is not waited for, and a small answer is handed
to the non-blocking socket instead of through trio-websocket's lock and a socket send that both
yield. These tests count the responder's task steps with a trio instrument (no clocks), and
check that the socket path gives the same bytes, in order, when the socket takes only part of
them. The same holds for the tasks around it: the connection's reader resumes only for its
socket, the session's writer only for what is queued, and no cancel scope is entered for a wait
that does not happen (a free slot, an answer the socket takes at once).
"""

from __future__ import annotations

import collections
import json
import math
import os
import select
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from exai.providers import ProviderRouter
from exai.resilience.retry import RetryBudget
from exai.server.app import Daemon
from exai.server.outbox import CHUNK_BYTES, ProgressStream
from exai.server.wsconn import ServerConnection, accept_request
from exai.storage.service import ConversationService
from exai.testing import MockUpstream
from exai.tools import default_registry
from tests.daemon_tools import BLOB
from tests.helpers import Rpc, make_settings, running_daemon, ws, ws_frame
from tests.httpmcp import ACCEPT_BOTH, envelope, http_url, sse_messages
from tests.providers.conftest import provider_settings

pytestmark = pytest.mark.anyio

RESPONDER = "SessionCore._respond_call"


def _woken_by_io() -> bool:
    """Whether the task being rescheduled now was woken by the I/O manager (its socket, the
    store's eventfd became ready) — a wait that has to be there — rather than by a checkpoint,
    a lock or an event (called from the instrument's ``task_scheduled``)."""
    frame: Any = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "process_events" and "trio" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _innermost(task: trio.lowlevel.Task) -> str:
    """Where ``task`` is suspended (its last three coroutine frames)."""
    coro: Any = task.coro
    names = []
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        names.append(coro.cr_frame.f_code.co_name)
        coro = getattr(coro, "cr_await", None)
    return " > ".join(names[-3:])


class _Steps(trio.abc.Instrument):
    """Counts the steps of the responder tasks: every step (``resumed``), the first one of each
    task (``started``), and by where the task was suspended, those it was resumed for by
    anything but the I/O manager (``avoidable``)."""

    def __init__(self) -> None:
        self.tasks: set[trio.lowlevel.Task] = set()
        self.by_io: dict[trio.lowlevel.Task, bool] = {}
        self.resumed = 0
        self.avoidable: collections.Counter[str] = collections.Counter()
        self.started = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if RESPONDER in task.name:
            self.by_io[task] = _woken_by_io()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if RESPONDER not in task.name:
            return
        self.resumed += 1
        by_io = self.by_io.pop(task, False)
        if task not in self.tasks:
            self.tasks.add(task)
            self.started += 1
        elif not by_io:
            self.avoidable[_innermost(task)] += 1


@asynccontextmanager
async def _chat_daemon(
    tmp_path: Path, upstream: MockUpstream | None = None
) -> AsyncIterator[Daemon]:
    """A daemon in this trio run with the SQLite conversation store and ``chat`` over one mock
    upstream (``upstream``, or a new one)."""
    async with AsyncExitStack() as upstreams:
        if upstream is None:
            upstream = await upstreams.enter_async_context(MockUpstream(models=("mock-a",)))
        settings = make_settings(
            tmp_path,
            providers=(provider_settings("a", upstream.base_url, None, ("mock-a",)),),
            fast_models=("mock-a",),
            quality_models=("mock-a",),
            default_model="auto",
            # The round pacer makes a call's start wait once the scheduler round has run 10 ms
            # of real time: a round the OS cut short by putting the process off the CPU (a busy
            # machine, the suite's other worker) did, and the wait was counted as a step or a
            # scope (seen on a loaded machine: resumed 21 == 20, {2, 4} == {2}). At concurrency
            # 1 a round stays short; these tests count what the code does, not the machine.
            round_budget_s=math.inf,
        )
        async with AsyncExitStack() as stack:
            router = ProviderRouter(
                settings,
                attempts=1,
                initial_backoff_s=0.01,
                retry_budget=RetryBudget(ratio=1.0, min_retries_per_s=10),
            )
            services: dict[str, Any] = {
                "providers": await stack.enter_async_context(router),
                "conversations": await stack.enter_async_context(
                    ConversationService.open(settings)
                ),
            }
            registry = default_registry()
            registry.register(BLOB)
            yield await stack.enter_async_context(running_daemon(settings, registry, services))


CALLS = 20


async def _count(call: Callable[[], Awaitable[dict[str, Any]]]) -> _Steps:
    for _ in range(3):  # warm up: connections to the upstream and the store are open
        assert "result" in await call()
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        for _ in range(CALLS):
            res = await call()
            assert res["result"]["isError"] is False, res
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert steps.started == CALLS
    return steps


async def _ws_steps(tmp_path: Path, tool: str, arguments: dict[str, Any]) -> _Steps:
    async with _chat_daemon(tmp_path) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        return await _count(lambda: rpc.call(tool, arguments))


async def _http_steps(tmp_path: Path, tool: str, arguments: dict[str, Any]) -> _Steps:
    """Over the Streamable HTTP door, stateless, a JSON answer (``Accept: application/json``)."""
    async with _chat_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=60) as client:
        url = http_url(daemon.url)
        params = {"name": tool, "arguments": arguments, "_meta": envelope()}
        msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}

        async def call() -> dict[str, Any]:
            response = await client.post(url, json=msg, headers={"Accept": "application/json"})
            assert response.headers["content-type"].startswith("application/json")
            answer: dict[str, Any] = response.json()
            return answer

        return await _count(call)


async def test_a_chat_call_s_responder_yields_only_to_wait_for_its_upstream_and_store(
    tmp_path: Path,
) -> None:
    # Before: 4 more resumptions per call — the provider's slot (CapacityLimiter.acquire), the
    # finished call's event, trio-websocket's stream lock and the socket send.
    steps = await _ws_steps(tmp_path, "chat", {"prompt": "hello", "model": "mock-a"})

    assert dict(steps.avoidable) == {}


async def test_a_version_call_is_answered_in_one_step_of_its_responder(tmp_path: Path) -> None:
    # Before: 4 steps per call (its start, the finished call's event, the stream lock, the send).
    steps = await _ws_steps(tmp_path, "version", {})

    assert steps.resumed == CALLS
    assert dict(steps.avoidable) == {}


async def test_over_the_http_door_a_chat_call_s_responder_yields_only_for_io_and_its_answer(
    tmp_path: Path,
) -> None:
    # Before: 2 more resumptions per call (the provider's slot, the finished call's event), and
    # until part 13b one more for the answer's socket send. (Handing the answer to the socket at
    # once was first measured on an earlier VM as saving no CPU and making the p50 at
    # concurrency 1 worse, 2.04 -> 2.28 ms; on part 13b's VM, every write of the door handed
    # over at once: CPU per call 0.966 (http1) / 0.958 (httpstream1), p50 1.98 -> 1.93 ms and
    # 2.34 -> 2.26: benchmarks/README.md, part 13b.)
    steps = await _http_steps(tmp_path, "chat", {"prompt": "hello", "model": "mock-a"})

    assert dict(steps.avoidable) == {}


async def test_a_large_answer_is_encoded_in_steps_of_its_own(tmp_path: Path) -> None:
    # Making a 6 MiB answer and encoding it take tens of milliseconds each; in one step they
    # made a 219 ms stall under load (the suite's stall fixture). It is encoded in a step of
    # its own, in pieces with a checkpoint between (exai.server.pieces: ≈ 2 MiB of JSON here,
    # a checkpoint every 256 KiB).
    steps = await _ws_steps(tmp_path, "blob", {"bytes": 1024 * 1024})

    assert steps.avoidable["encode_pieces > checkpoint > cancel_shielded_checkpoint"] == CALLS
    assert steps.avoidable["_encode > checkpoint > cancel_shielded_checkpoint"] >= 4 * CALLS


# ------------------------------------------------------------------ the direct socket write


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@asynccontextmanager
async def _ws_pair(
    buffer_bytes: int | None = None,
) -> AsyncIterator[tuple[ServerConnection, ProgressStream, trio.SocketStream]]:
    """A server connection over a :class:`ProgressStream` on loopback TCP (as the listener
    makes it) and the raw client end, its upgrade done; ``buffer_bytes`` makes both socket
    buffers small, so a peer that does not read soon leaves a write only part taken."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    sock = trio.socket.socket()
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    await sock.connect(("127.0.0.1", port))
    client = trio.SocketStream(sock)
    raw = await listener.accept()
    await listener.aclose()
    if buffer_bytes:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    stream = ProgressStream(raw)
    async with trio.open_nursery() as nursery:
        await client.send_all(UPGRADE)
        request = await accept_request(nursery, stream, max_message_size=1 << 20)
        server = await request.accept()
        assert isinstance(server, ServerConnection)
        head = b""
        while b"\r\n\r\n" not in head:
            head += await client.receive_some(4096)
        assert head.startswith(b"HTTP/1.1 101") and head.endswith(b"\r\n\r\n")
        try:
            yield server, stream, client
        finally:
            nursery.cancel_scope.cancel()
            # shielded: a close that checkpoints in the cancelled nursery raised Cancelled, which
            # replaced whatever the test's block raised — a failed assertion passed silently
            with trio.CancelScope(shield=True):
                await client.aclose()
                await raw.aclose()


async def _read_text_frames(client: trio.SocketStream, count: int) -> list[str]:
    """``count`` unmasked text frames from the server, each whole (FIN set)."""
    buf = bytearray()
    texts: list[str] = []
    while len(texts) < count:
        chunk = await client.receive_some(1 << 16)
        assert chunk, "the server closed the connection"
        buf += chunk
        while len(buf) >= 2:
            assert buf[0] == 0x81  # FIN, text
            n, at = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                break
            texts.append(buf[at : at + n].decode())
            del buf[: at + n]
    return texts


@contextmanager
def _no_yield() -> Iterator[None]:
    """Fails if the block yields to the scheduler (its task's step ends inside it). A check for
    cancellation that finds none is no yield (``trio.testing.assert_no_checkpoints`` counts it:
    with it, this file's first direct-write test failed, unseen, from the day it was written)."""
    task = trio.lowlevel.current_task()
    ended: list[trio.lowlevel.Task] = []

    class _StepEnds(trio.abc.Instrument):
        def after_task_step(self, t: trio.lowlevel.Task) -> None:
            if t is task:
                ended.append(t)

    instrument = _StepEnds()
    trio.lowlevel.add_instrument(instrument)
    try:
        yield
    finally:
        trio.lowlevel.remove_instrument(instrument)
    assert not ended, "the block yielded to the scheduler"


async def test_a_small_answer_is_handed_to_the_socket_without_yielding() -> None:
    async with _ws_pair() as (server, stream, client):
        sent: list[int] = []
        original = stream.send_nowait

        def spy(data: Any) -> int:
            sent.append(original(data))
            return sent[-1]

        stream.send_nowait = spy  # type: ignore[method-assign]
        with _no_yield():
            await server.send_text('{"jsonrpc":"2.0","id":1,"result":{}}')

        assert sent == [len('{"jsonrpc":"2.0","id":1,"result":{}}') + 2]
        assert await _read_text_frames(client, 1) == ['{"jsonrpc":"2.0","id":1,"result":{}}']


async def test_what_the_socket_does_not_take_is_sent_after_it_in_order() -> None:
    # small buffers and a client that reads only later: the socket soon takes only part of a
    # frame (or none); the rest must follow through the stream, and later frames after it
    texts = [chr(ord("a") + i) * (CHUNK_BYTES - 16) for i in range(12)]
    async with _ws_pair(buffer_bytes=8192) as (server, stream, client):
        sent: list[tuple[int, int]] = []
        original = stream.send_nowait

        def spy(data: Any) -> int:
            sent.append((original(data), len(data)))
            return sent[-1][0]

        stream.send_nowait = spy  # type: ignore[method-assign]

        async def send_all_texts() -> None:
            for text in texts:
                await server.send_text(text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all_texts)
            with trio.fail_after(30):  # a hang guard
                while not any(took < size for took, size in sent):
                    await trio.sleep(0.01)
                received = await _read_text_frames(client, len(texts))

    assert received == texts


async def test_a_stream_that_is_not_plain_tcp_is_never_written_to_directly() -> None:
    left, _right = trio.testing.memory_stream_pair()
    assert ProgressStream(left).send_nowait(b"x" * 10) == 0


async def test_a_socket_found_blocking_is_never_written_to_directly() -> None:
    # a direct write must never block the loop: only a non-blocking socket is written to
    a, b = trio.socket.socketpair()
    with a, b:
        os.set_blocking(a.fileno(), True)
        assert ProgressStream(trio.SocketStream(a)).send_nowait(b"x" * 10) == 0


async def test_a_peer_that_went_away_makes_the_direct_write_fail_as_a_closed_connection() -> None:
    async with _ws_pair() as (server, _stream, client):
        client.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await client.aclose()  # (a reset: linger 0)
        with trio.fail_after(30), pytest.raises(ConnectionClosed):
            while True:
                await server.send_text("x" * 100)
                await trio.sleep(0.01)


async def test_a_frame_the_socket_takes_at_once_makes_no_write_deadline() -> None:
    # the caller's deadline scope is made only for a send that has to wait
    made: list[trio.CancelScope] = []

    def wait_scope() -> trio.CancelScope:
        made.append(trio.CancelScope())
        return made[-1]

    async with _ws_pair() as (server, _stream, client):
        await server.send_text('{"jsonrpc":"2.0","id":1,"result":{}}', wait_scope)

        assert made == []
        assert await _read_text_frames(client, 1) == ['{"jsonrpc":"2.0","id":1,"result":{}}']


async def test_what_the_socket_does_not_take_waits_under_the_write_deadline() -> None:
    # a peer that does not read: the socket takes part of a 64 KiB frame, the rest waits inside
    # the caller's scope, which its deadline (cancelled here by hand) ends
    made: list[trio.CancelScope] = []

    def wait_scope() -> trio.CancelScope:
        made.append(trio.CancelScope())
        return made[-1]

    async with (
        _ws_pair(buffer_bytes=8192) as (server, _stream, _client),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(server.send_text, "x" * (CHUNK_BYTES - 16), wait_scope)
        with trio.fail_after(30):  # a hang guard
            while not made:
                await trio.sleep(0.01)
        made[0].cancel()

    assert len(made) == 1
    assert made[0].cancelled_caught


class _ReaderSteps(trio.abc.Instrument):
    """Steps of the server connections' reader tasks (trio-websocket's ``_reader_task`` of a
    :class:`ServerConnection`) not resumed by the I/O manager, by where they were suspended."""

    def __init__(self) -> None:
        self.by_io: dict[trio.lowlevel.Task, bool] = {}
        self.avoidable: collections.Counter[str] = collections.Counter()

    @staticmethod
    def _is_server_reader(task: trio.lowlevel.Task) -> bool:
        frame = getattr(task.coro, "cr_frame", None)
        return (
            task.name.endswith("_reader_task")
            and frame is not None
            and isinstance(frame.f_locals.get("self"), ServerConnection)
        )

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        if self._is_server_reader(task):
            self.by_io[task] = _woken_by_io()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._is_server_reader(task) and not self.by_io.pop(task, False):
            self.avoidable[_innermost(task)] += 1


async def test_a_message_reaches_its_session_without_a_round_of_the_connection_s_reader(
    tmp_path: Path,
) -> None:
    # Before: the reader handed each message over through the channel's send, which put it
    # aside once per message (a scheduler round for nothing: the session's reader waited).
    async with _chat_daemon(tmp_path) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        for _ in range(3):
            assert "result" in await rpc.call("version", {})
        steps = _ReaderSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            for _ in range(CALLS):
                assert "result" in await rpc.call("version", {})
        finally:
            trio.lowlevel.remove_instrument(steps)

    assert dict(steps.avoidable) == {}


async def test_a_version_call_enters_only_its_deadline_s_and_its_responder_s_cancel_scopes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: four per call — also the shielded scope of a start that waited for nothing and
    # the write deadline of an answer the socket took at once.
    entered: collections.Counter[trio.lowlevel.Task] = collections.Counter()
    original = trio.CancelScope.__enter__

    def counting_enter(self: trio.CancelScope) -> trio.CancelScope:
        task = trio.lowlevel.current_task()
        if RESPONDER in task.name:
            entered[task] += 1
        return original(self)

    async with _chat_daemon(tmp_path) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        for _ in range(3):
            assert "result" in await rpc.call("version", {})
        monkeypatch.setattr(trio.CancelScope, "__enter__", counting_enter)
        for _ in range(CALLS):
            assert "result" in await rpc.call("version", {})
        monkeypatch.undo()

    assert len(entered) == CALLS
    assert set(entered.values()) == {2}


class _Spawned(trio.abc.Instrument):
    """The tasks started, by name, and the steps of each (by name)."""

    def __init__(self) -> None:
        self.spawned: collections.Counter[str] = collections.Counter()
        self.steps: collections.Counter[str] = collections.Counter()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned[task.name.rsplit(".", 2)[-2] + "." + task.name.rsplit(".", 1)[-1]] += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name.rsplit(".", 2)[-2] + "." + task.name.rsplit(".", 1)[-1]] += 1


async def test_progress_is_written_without_starting_the_session_s_writer(tmp_path: Path) -> None:
    # Before: each progress notification of a streamed call started the session's writer task
    # (it runs only while something is queued), which wrote it in its first step: two tasks
    # started and run per streamed chat call, each a scheduler round (benchmarks/README.md,
    # part 14). Now what the socket takes at once is handed to it by the task that made it.
    async with _chat_daemon(tmp_path) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        args = {"prompt": "hello", "model": "mock-a"}
        for i in range(3):
            assert "result" in await rpc.call("chat", args, meta={"progressToken": f"w{i}"})
        rpc.notifications.clear()
        tasks = _Spawned()
        trio.lowlevel.add_instrument(tasks)
        try:
            for i in range(CALLS):
                res = await rpc.call("chat", args, meta={"progressToken": f"t{i}"})
                assert res["result"]["isError"] is False, res
        finally:
            trio.lowlevel.remove_instrument(tasks)
        progress = [n for n in rpc.notifications if n.get("method") == "notifications/progress"]

    assert len(progress) >= 2 * CALLS
    assert {n["params"]["progressToken"] for n in progress} == {f"t{i}" for i in range(CALLS)}
    assert tasks.spawned["Session._writer"] == 0
    assert tasks.spawned["SessionCore._respond_call"] == CALLS


async def test_progress_the_socket_takes_in_part_is_finished_by_the_writer_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a socket that takes a few bytes of each write handed to it at once (a full send buffer):
    # the rest of a progress frame is kept by the stream and sent first by the session's writer,
    # under its deadline; every frame arrives whole, progress before its answer
    original = ProgressStream.send_nowait

    def take_a_little(self: ProgressStream, data: Any) -> int:
        return original(self, memoryview(data)[:7])

    async with _chat_daemon(tmp_path) as daemon, ws(daemon) as conn:
        rpc = Rpc(conn)
        args = {"prompt": "hello", "model": "mock-a"}
        assert "result" in await rpc.call("chat", args, meta={"progressToken": "w"})
        monkeypatch.setattr(ProgressStream, "send_nowait", take_a_little)
        rpc.notifications.clear()
        tasks = _Spawned()
        trio.lowlevel.add_instrument(tasks)
        try:
            for i in range(3):
                res = await rpc.call("chat", args, meta={"progressToken": f"t{i}"})
                assert res["result"]["isError"] is False, res
                tokens = [n["params"]["progressToken"] for n in rpc.notifications]
                assert tokens.count(f"t{i}") >= 2  # (its progress came before its answer)
        finally:
            trio.lowlevel.remove_instrument(tasks)
        monkeypatch.undo()
        assert "result" in await rpc.call("chat", args, meta={"progressToken": "after"})

    assert tasks.spawned["Session._writer"] >= 3


def _sse_call(client: httpx.AsyncClient, url: str, token: str) -> Awaitable[httpx.Response]:
    params = {
        "name": "chat",
        "arguments": {"prompt": "hello", "model": "mock-a"},
        "_meta": {**envelope(), "progressToken": token},
    }
    msg = {"jsonrpc": "2.0", "id": token, "method": "tools/call", "params": params}
    return client.post(url, json=msg, headers={"Accept": ACCEPT_BOTH})


def _check_streamed(response: httpx.Response, token: str) -> None:
    assert response.headers["content-type"].startswith("text/event-stream")
    messages = sse_messages(response.text)
    assert len(messages) >= 2
    *progress, answer = messages
    assert all(m["method"] == "notifications/progress" for m in progress)
    assert all(m["params"]["progressToken"] == token for m in progress)
    assert answer["id"] == token and answer["result"]["isError"] is False


async def _connection_steps(
    tmp_path: Path, call: Callable[[httpx.AsyncClient, str, str], Awaitable[None]]
) -> _Spawned:
    async with _chat_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=60) as client:
        url = http_url(daemon.url)
        for i in range(3):
            await call(client, url, f"w{i}")
        tasks = _Spawned()
        trio.lowlevel.add_instrument(tasks)
        try:
            for i in range(CALLS):
                await call(client, url, f"t{i}")
        finally:
            trio.lowlevel.remove_instrument(tasks)
    return tasks


async def test_an_sse_answer_is_written_without_a_task_of_its_own(tmp_path: Path) -> None:
    # Before: an SSE answer started a disconnect-watch task beside its responder (started, and
    # run again at the stream's end to be cancelled), and the connection's task wrote each
    # event, woken for each: 11 task steps and 9.5 scheduler rounds per streamed chat call
    # against 7.7 and 7.2 for a JSON one (benchmarks/README.md, part 17a; here 40 watch steps
    # and the connection's task 104 steps against 76 for 20 JSON calls). Now it is shaped as
    # the JSON answer: the responder writes (its progress at once, its answer with the
    # stream's end) while the connection's task reads the connection.
    async def streamed(client: httpx.AsyncClient, url: str, token: str) -> None:
        _check_streamed(await _sse_call(client, url, token), token)

    async def json_only(client: httpx.AsyncClient, url: str, token: str) -> None:
        params = {
            "name": "chat",
            "arguments": {"prompt": "hello", "model": "mock-a"},
            "_meta": envelope(),
        }
        msg = {"jsonrpc": "2.0", "id": token, "method": "tools/call", "params": params}
        response = await client.post(url, json=msg, headers={"Accept": "application/json"})
        assert response.json()["result"]["isError"] is False

    sse = await _connection_steps(tmp_path, streamed)
    plain = await _connection_steps(tmp_path, json_only)

    assert sse.spawned["HttpConnection._watch_disconnect"] == 0
    assert sse.spawned["SessionCore._respond_call"] == CALLS
    # the connection's task: as for a JSON answer (the request's read, the call's end, the
    # request nursery's exit; a request read in two parts, now and then, one more)
    assert (
        sse.steps["Listener._handle_stream"] <= plain.steps["Listener._handle_stream"] + CALLS // 2
    )


async def test_an_sse_stream_the_socket_takes_in_part_goes_on_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a socket that takes a few bytes of each write handed to it at once (a full send buffer):
    # the rest of the stream is written by the connection's task as a stream always was
    # (under the send deadline, beside a disconnect watch), the same bytes in the same order,
    # and the connection is kept
    original = ProgressStream.send_nowait

    def take_a_little(self: ProgressStream, data: Any) -> int:
        return original(self, memoryview(data)[:7])

    async with _chat_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=60) as client:
        url = http_url(daemon.url)
        _check_streamed(await _sse_call(client, url, "w"), "w")
        monkeypatch.setattr(ProgressStream, "send_nowait", take_a_little)
        tasks = _Spawned()
        trio.lowlevel.add_instrument(tasks)
        try:
            for i in range(3):
                _check_streamed(await _sse_call(client, url, f"t{i}"), f"t{i}")
        finally:
            trio.lowlevel.remove_instrument(tasks)
        monkeypatch.undo()
        _check_streamed(await _sse_call(client, url, "after"), "after")
        assert daemon.admission.accepted_total == 1  # (one kept connection all along)

    assert tasks.spawned["HttpConnection._watch_disconnect"] == 3


async def test_a_client_that_goes_once_its_sse_stream_began_cancels_the_call_upstream(
    tmp_path: Path,
) -> None:
    # the disconnect watch is the connection's task now: a client that closes its connection
    # after the stream's first event cancels the call, down to the upstream request
    async with (
        MockUpstream(models=("mock-a",), latency_s=120.0) as upstream,
        _chat_daemon(tmp_path, upstream) as daemon,
    ):
        params = {
            "name": "chat",
            "arguments": {"prompt": "hello", "model": "mock-a"},
            "_meta": {**envelope(), "progressToken": "p"},
        }
        body = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        ).encode()
        host, port = http_url(daemon.url).split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        head = (
            f"POST /mcp HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: {ACCEPT_BOTH}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await stream.send_all(head.encode() + body)
        got = b""
        with trio.fail_after(30):
            while b"asking a model" not in got:
                got += await stream.receive_some(65536)
            assert got.startswith(b"HTTP/1.1 200") and b"text/event-stream" in got
            while not upstream.chat_requests:
                await trio.sleep(0.01)
        disconnects = upstream.disconnects
        await stream.aclose()
        with trio.fail_after(30):
            await upstream.wait_disconnect(disconnects + 1)
            while daemon.inflight.borrowed_tokens:
                await trio.sleep(0.01)


async def test_the_connection_s_reader_waits_for_the_next_message_before_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: after each message trio-websocket's reader asked the socket for more at once, a
    # ``recv`` that found nothing (EAGAIN, trio's wrapping of it), then waited. Now a read after
    # a short one waits until the socket is readable first (issue 18, part 8). Counted by
    # reading the socket's readiness (a zero-timeout select) at every read of its descriptor,
    # through either path — trio's ``recv`` or ``os.read``.
    messages = [f"m{i}" * (i + 1) for i in range(6)] + ["z" * 70_000]
    async with _ws_pair() as (server, stream, client):
        inner = stream.inner
        assert isinstance(inner, trio.SocketStream)
        fd = inner.socket.fileno()
        reads = {"found_nothing": 0, "all": 0}

        def count() -> None:
            reads["all"] += 1
            reads["found_nothing"] += not select.select([fd], [], [], 0)[0]

        original_recv = inner.socket.recv

        async def recv(*args: Any) -> bytes:
            count()
            return await original_recv(*args)

        original_read = os.read

        def read(f: int, n: int) -> bytes:
            if f == fd:
                count()
            return original_read(f, n)

        monkeypatch.setattr(inner.socket, "recv", recv)
        monkeypatch.setattr(os, "read", read)
        for text in messages:
            await client.send_all(ws_frame(text.encode()))
            with trio.fail_after(30):  # a hang guard
                assert await server.get_message() == text
            await trio.testing.wait_all_tasks_blocked()

    assert reads["all"] >= len(messages)
    assert reads["found_nothing"] == 0


async def test_a_read_of_a_socket_closed_before_it_is_a_closed_resource_every_time() -> None:
    # Before: the wait-first read of a closed socket asked trio to wait for descriptor -1, which
    # raised a ValueError and left that wait registered: every later such read, on any
    # connection, got BusyResourceError ("another task is already reading"), which ended its
    # session as an error (issue 18, part 8: found by tests/adversarial/test_hostile_json.py).
    a, b = trio.socket.socketpair()
    async with trio.SocketStream(b) as peer:
        for _ in range(3):
            stream = ProgressStream(trio.SocketStream(a))
            stream.inner.socket.close()  # type: ignore[attr-defined]
            with pytest.raises(trio.ClosedResourceError):
                await stream.receive_when_readable(64)
            a, other = trio.socket.socketpair()
            other.close()
        await peer.aclose()
    a.close()


async def test_a_read_of_a_socket_closed_before_it_still_yields_as_its_docstring_says() -> None:
    # Before: it raised ClosedResourceError at once, without a checkpoint (trio's convention for
    # an async call that fails at once, and "Always yields" in its docstring): a loop of such
    # reads could neither be cancelled nor let any other task run.
    a, b = trio.socket.socketpair()
    b.close()
    stream = ProgressStream(trio.SocketStream(a))
    stream.inner.socket.close()  # type: ignore[attr-defined]
    with trio.testing.assert_checkpoints(), pytest.raises(trio.ClosedResourceError):
        await stream.receive_when_readable(64)
    with trio.CancelScope() as scope:
        scope.cancel()
        await stream.receive_when_readable(64)
    assert scope.cancelled_caught
