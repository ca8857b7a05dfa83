"""The stdio bridge, run in-process over memory streams, against the fake daemon."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from exai.client.bridge import BACKOFF_CAP_S, IDEMPOTENCY_META_KEY, Bridge, backoff_delay
from exai.config import Settings
from exai.testing.faultproxy import FaultProxy
from tests.helpers import make_settings, running_daemon

from .conftest import FakeDaemon

INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test-client", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def call(rid: Any, name: str, arguments: dict[str, Any] | None = None, **meta: Any) -> dict:
    params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
    if meta:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}


class Harness:
    """The MCP client's side of the bridge's stdio."""

    def __init__(self) -> None:
        self.stdin_send, self.stdin_recv = trio.testing.memory_stream_one_way_pair()
        self.stdout_send, self.stdout_recv = trio.testing.memory_stream_one_way_pair()
        self._buf = b""
        self.lines: list[bytes] = []

    async def send(self, msg: Any) -> None:
        data = msg if isinstance(msg, bytes) else (json.dumps(msg) + "\n").encode()
        await self.stdin_send.send_all(data)

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(10):
            while b"\n" not in self._buf:
                chunk = await self.stdout_recv.receive_some(65536)
                assert chunk, "bridge closed stdout"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.lines.append(line)
        return json.loads(line)

    async def close_stdin(self) -> None:
        await self.stdin_send.aclose()

    async def initialize(self) -> None:
        await self.send(INIT)
        reply = await self.recv()
        assert reply["id"] == 0 and "result" in reply
        await self.send(INITIALIZED)


@pytest.fixture
async def proxy(daemon: FakeDaemon) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", daemon.port) as p:
        yield p


async def start_bridge(nursery: trio.Nursery, url: str, **kw: Any) -> tuple[Bridge, Harness]:
    settings = Settings(url=url, handshake_timeout_s=2.0)
    bridge = Bridge(settings, rng=random.Random(1), **kw)
    harness = Harness()
    nursery.start_soon(bridge.run, harness.stdin_recv, harness.stdout_send)
    return bridge, harness


def url_of(proxy: FaultProxy) -> str:
    return f"ws://127.0.0.1:{proxy.port}/mcp"


# -- plain forwarding ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_requests_and_responses_pass_through_with_their_ids(daemon: FakeDaemon) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, daemon.url)
        await client.initialize()
        await client.send({"jsonrpc": "2.0", "id": "list-1", "method": "tools/list"})
        reply = await client.recv()
        assert reply["id"] == "list-1"
        assert reply["result"]["tools"][0]["name"] == "echo"
        nursery.cancel_scope.cancel()
    assert daemon.methods()[:3] == ["initialize", "notifications/initialized", "tools/list"]


@pytest.mark.anyio
async def test_tools_call_carries_an_idempotency_key_and_keeps_the_client_meta(
    daemon: FakeDaemon,
) -> None:
    async with trio.open_nursery() as nursery:
        bridge, client = await start_bridge(nursery, daemon.url)
        await client.initialize()
        await client.send(call(5, "echo", {"a": 1}, progressToken="tok"))
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    meta = json.loads(reply["result"]["content"][0]["text"])["meta"]
    assert meta["progressToken"] == "tok"
    assert meta[IDEMPOTENCY_META_KEY] == f"{bridge.instance_id}:5"
    assert len(meta[IDEMPOTENCY_META_KEY]) <= 200


@pytest.mark.anyio
async def test_progress_from_the_daemon_reaches_the_client(daemon: FakeDaemon) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, daemon.url)
        await client.initialize()
        await client.send(call(1, "progress", {"steps": 2}, progressToken="p"))
        got = [await client.recv() for _ in range(3)]
        nursery.cancel_scope.cancel()
    assert [m.get("method") for m in got] == [
        "notifications/progress",
        "notifications/progress",
        None,
    ]
    assert got[0]["params"]["progressToken"] == "p"
    assert got[2]["id"] == 1


@pytest.mark.anyio
async def test_daemon_requests_reach_the_client_and_its_answer_goes_back(
    daemon: FakeDaemon,
) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, daemon.url)
        await client.initialize()
        await daemon.wait_for(lambda: "notifications/initialized" in daemon.methods())
        await daemon.send_to_client({"jsonrpc": "2.0", "id": "srv-1", "method": "ping"})
        request = await client.recv()
        assert request == {"jsonrpc": "2.0", "id": "srv-1", "method": "ping"}
        await client.send({"jsonrpc": "2.0", "id": "srv-1", "result": {}})
        await daemon.wait_for(lambda: any(m.get("id") == "srv-1" for _, m in daemon.received))
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_stdout_carries_only_json_rpc_lines(daemon: FakeDaemon) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, daemon.url)
        await client.initialize()
        await client.send(b"this is not json\n")
        parse_error = await client.recv()
        await client.send(call(2, "echo", {"text": "line\nbreak \u2028 ok"}))
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert parse_error["error"]["code"] == -32700
    assert parse_error["id"] is None
    assert reply["id"] == 2
    for line in client.lines:
        assert json.loads(line)["jsonrpc"] == "2.0"


@pytest.mark.anyio
async def test_a_line_over_max_frame_bytes_is_refused(daemon: FakeDaemon) -> None:
    settings = Settings(url=daemon.url, max_frame_bytes=1024)
    bridge = Bridge(settings)
    client = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge.run, client.stdin_recv, client.stdout_send)
        await client.send(b'{"jsonrpc":"2.0","id":1,"method":"ping","pad":"' + b"x" * 5000)
        refused = await client.recv()
        await client.send(b'"}\n')
        await client.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        after = await client.recv()
        nursery.cancel_scope.cancel()
    assert refused["error"]["data"]["reason"] == "message_too_large"
    assert after == {"jsonrpc": "2.0", "id": 2, "result": {}}


# -- reconnecting --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cut_connection_is_resumed_with_the_same_id_and_one_execution(
    daemon: FakeDaemon, proxy: FaultProxy
) -> None:
    async with trio.open_nursery() as nursery:
        bridge, client = await start_bridge(nursery, url_of(proxy))
        await client.initialize()
        await client.send(call(42, "hold"))
        await daemon.hold_running.wait()
        proxy.cut()
        proxy.restore()
        # the bridge replays the handshake and re-sends call 42 on a new connection
        await daemon.wait_for(lambda: daemon.methods(2).count("tools/call") == 1)
        daemon.release()
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply["id"] == 42
    assert reply["result"]["content"][0]["text"] == "1"
    assert len(daemon.hold_started) == 1
    second = [m for c, m in daemon.received if c == 2]
    assert [m.get("method") for m in second] == [
        "initialize",
        "notifications/initialized",
        "tools/call",
    ]
    assert second[0]["id"] != 0  # the replayed initialize uses an id of the bridge's own
    first_call = next(m for c, m in daemon.received if c == 1 and m.get("id") == 42)
    assert second[2]["id"] == 42
    assert second[2]["params"]["_meta"] == first_call["params"]["_meta"]
    assert bridge.connections == 2


@pytest.mark.anyio
async def test_replayed_initialize_answer_is_not_shown_to_the_client(
    daemon: FakeDaemon, proxy: FaultProxy
) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, url_of(proxy))
        await client.initialize()
        await daemon.wait_for(lambda: "notifications/initialized" in daemon.methods())
        proxy.cut()
        proxy.restore()
        await client.send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply == {"jsonrpc": "2.0", "id": 9, "result": {}}


@pytest.mark.anyio
async def test_cancelled_request_is_not_resent(daemon: FakeDaemon, proxy: FaultProxy) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, url_of(proxy))
        await client.initialize()
        await client.send(call(1, "hold"))
        await daemon.hold_running.wait()
        proxy.cut()
        await client.send(
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
        )
        proxy.restore()
        await client.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply["id"] == 2
    second = [m for c, m in daemon.received if c == 2]
    assert "tools/call" not in [m.get("method") for m in second]


@pytest.mark.anyio
async def test_client_cancellation_is_forwarded_to_the_daemon(daemon: FakeDaemon) -> None:
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, daemon.url)
        await client.initialize()
        await client.send(call(1, "hold"))
        await daemon.hold_running.wait()
        await client.send(cancel)

        def forwarded() -> bool:
            for _, msg in daemon.received:
                if msg.get("method") == "notifications/cancelled":
                    params = msg["params"]
                    # with the call's idempotency key, so a daemon session that never saw
                    # the id (after a reconnect) can still find the call
                    return params["requestId"] == 1 and bool(
                        params.get("_meta", {}).get("exai/idempotencyKey")
                    )
            return False

        with trio.fail_after(10):
            await daemon.wait_for(forwarded)
        nursery.cancel_scope.cancel()


@pytest.mark.anyio
async def test_requests_sent_while_disconnected_are_delivered_after_reconnect(
    daemon: FakeDaemon, proxy: FaultProxy
) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, url_of(proxy))
        await client.initialize()
        await daemon.wait_for(lambda: "notifications/initialized" in daemon.methods())
        proxy.cut()
        await client.send(call(3, "echo", {"k": "v"}))
        await trio.sleep(0.3)  # let the bridge fail a few reconnects
        proxy.restore()
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply["id"] == 3
    assert json.loads(reply["result"]["content"][0]["text"])["arguments"] == {"k": "v"}


@pytest.mark.anyio
async def test_full_buffer_answers_bridge_overloaded(daemon: FakeDaemon, proxy: FaultProxy) -> None:
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, url_of(proxy), max_buffer=2)
        proxy.cut()
        for rid in (1, 2, 3):
            await client.send({"jsonrpc": "2.0", "id": rid, "method": "ping"})
        refused = await client.recv()
        proxy.restore()
        answered = [await client.recv(), await client.recv()]
        nursery.cancel_scope.cancel()
    assert refused["id"] == 3
    assert refused["error"]["data"]["reason"] == "bridge_overloaded"
    assert sorted(m["id"] for m in answered) == [1, 2]


# -- giving up -----------------------------------------------------------------------------


async def closed_port_url() -> str:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    return f"ws://127.0.0.1:{port}/mcp"


@pytest.mark.anyio
async def test_unreachable_daemon_answers_pending_requests_with_daemon_unavailable() -> None:
    url = await closed_port_url()
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, url, unreachable_after_s=0.3)
        await client.send(INIT)
        reply = await client.recv()
        await client.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        fast = await client.recv()  # still unreachable: answered at once
        nursery.cancel_scope.cancel()
    assert reply["id"] == 0
    assert reply["error"]["code"] == -32000
    assert reply["error"]["data"]["reason"] == "daemon_unavailable"
    assert reply["error"]["data"]["url"] == url
    assert reply["error"]["message"].startswith(f"exai daemon unreachable at {url}: ")
    assert fast["error"]["data"]["reason"] == "daemon_unavailable"


@pytest.mark.anyio
async def test_a_daemon_never_reached_is_reported_after_connect_wait_with_how_to_start_it() -> None:
    url = await closed_port_url()
    port = url.split(":")[2].split("/")[0]
    async with trio.open_nursery() as nursery:
        # the outage bound once connected is huge: only the never-reached bound can answer
        _, client = await start_bridge(
            nursery, url, unreachable_after_s=100_000.0, connect_wait_s=0.3
        )
        await client.send(INIT)
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    error = reply["error"]
    assert reply["id"] == 0 and error["code"] == -32000
    assert error["data"]["reason"] == "daemon_unavailable"
    assert error["data"]["url"] == url
    start = error["data"]["start"]
    assert start.startswith(f"EXAI_PORT={port} ") and start.endswith(" serve")
    assert f"start it with: {start}" in error["message"]
    assert "EXAI_AUTOSTART=1" in error["message"]


@pytest.mark.anyio
async def test_a_daemon_on_another_machine_gets_no_start_command() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so the connect attempt times out
    url = "ws://192.0.2.1:8079/mcp"
    settings = Settings(url=url, handshake_timeout_s=0.2)
    bridge = Bridge(settings, rng=random.Random(1), connect_wait_s=0.3)
    client = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge.run, client.stdin_recv, client.stdout_send)
        await client.send(INIT)
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply["error"]["data"]["reason"] == "daemon_unavailable"
    assert "start" not in reply["error"]["data"]
    assert "is the exai daemon running there" in reply["error"]["message"]


@pytest.mark.anyio
async def test_refused_token_is_reported_and_not_retried() -> None:
    fake = FakeDaemon(token="right")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        _, client = await start_bridge(nursery, fake.url, token="wrong")
        await client.send(INIT)
        first = await client.recv()
        await client.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        second = await client.recv()
        nursery.cancel_scope.cancel()
    for reply in (first, second):
        assert reply["error"]["data"]["reason"] == "unauthorized"
        assert "refused the client token" in reply["error"]["message"]
        assert "wrong" not in reply["error"]["message"]
    assert fake.auth_headers == ["Bearer wrong"]


@pytest.mark.anyio
async def test_a_url_without_mcp_is_reported_with_the_mcp_url_and_not_retried(
    tmp_path: Path,
) -> None:
    """``EXAI_URL=ws://127.0.0.1:8079`` — the URL of the daemon exai replaces — reaches the
    old op protocol's door at ``/``, which upgrades without the ``mcp`` subprotocol. The bridge
    retried for ``EXAI_CONNECT_WAIT_S`` and then said the running daemon was "unreachable" and
    to start it (``start it with: … exai serve``); now it says at once, and for every request,
    that the path is not the MCP door and which URL is."""
    async with running_daemon(make_settings(tmp_path)) as daemon:
        root = daemon.url.removesuffix("/mcp")
        async with trio.open_nursery() as nursery:
            _, client = await start_bridge(nursery, root, connect_wait_s=100_000.0)
            await client.send(INIT)
            first = await client.recv()
            await client.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
            second = await client.recv()
            nursery.cancel_scope.cancel()
    for reply in (first, second):
        message = reply["error"]["message"]
        assert f"connect to {root}/mcp (EXAI_URL)" in message, message
        assert "unreachable" not in message and "start it" not in message, message
        assert "start" not in reply["error"]["data"]


@pytest.mark.anyio
async def test_overloaded_daemon_is_retried_until_it_accepts(daemon: FakeDaemon) -> None:
    daemon.reject_with = (503, [(b"Retry-After", b"0")])
    async with trio.open_nursery() as nursery:
        _, client = await start_bridge(nursery, daemon.url)
        await client.send(INIT)
        with trio.fail_after(5):
            await daemon.wait_for(lambda: len(daemon.auth_headers) >= 3)
        daemon.reject_with = None
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply["id"] == 0 and "result" in reply


@pytest.mark.anyio
async def test_stdin_eof_waits_for_the_answers_of_the_requests_read_then_ends(
    daemon: FakeDaemon,
) -> None:
    settings = Settings(url=daemon.url)
    bridge = Bridge(settings)
    client = Harness()
    ended = trio.Event()

    async def run() -> None:
        await bridge.run(client.stdin_recv, client.stdout_send)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.initialize()
        await client.send(call(7, "hold"))
        await daemon.hold_running.wait()
        await client.close_stdin()
        await trio.sleep(0.3)
        assert not ended.is_set()  # still waiting for the call's answer
        daemon.release()
        answer = await client.recv()
        with trio.fail_after(5):
            await ended.wait()
    assert answer["id"] == 7 and answer["result"]["content"][0]["text"] == "1"
    cancels = [m for _, m in daemon.received if m.get("method") == "notifications/cancelled"]
    assert cancels == []


@pytest.mark.anyio
async def test_stdin_eof_drain_is_bounded_by_the_call_timeout_then_cancels(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    import exai.client.bridge as bridge_module

    monkeypatch.setattr(bridge_module, "DRAIN_MARGIN_S", 0.0)
    bridge = Bridge(Settings(url=daemon.url, call_timeout_s=0.3))
    client = Harness()
    ended = trio.Event()

    async def run() -> None:
        await bridge.run(client.stdin_recv, client.stdout_send)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.initialize()
        await client.send(call(7, "hold"))
        await daemon.hold_running.wait()
        await client.close_stdin()
        with trio.fail_after(10):
            await ended.wait()
    cancels = [m for _, m in daemon.received if m.get("method") == "notifications/cancelled"]
    assert cancels and cancels[0]["params"]["requestId"] == 7
    daemon.release()


@pytest.mark.anyio
async def test_stop_skips_the_drain_but_cancels_the_waiting_calls_at_the_daemon(
    daemon: FakeDaemon,
) -> None:
    bridge = Bridge(Settings(url=daemon.url))
    client = Harness()
    ended = trio.Event()

    async def run() -> None:
        await bridge.run(client.stdin_recv, client.stdout_send)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await client.initialize()
        await client.send(call(7, "hold"))
        await daemon.hold_running.wait()
        bridge.stop()  # SIGTERM, or the parent gone
        with trio.fail_after(10):
            await ended.wait()
        with trio.fail_after(10):
            await daemon.wait_for(lambda: "notifications/cancelled" in daemon.methods())
    cancels = [m for _, m in daemon.received if m.get("method") == "notifications/cancelled"]
    assert cancels[0]["params"]["requestId"] == 7
    daemon.release()


@pytest.mark.anyio
async def test_autostart_for_a_url_on_another_machine_starts_nothing() -> None:
    url = "ws://192.0.2.1:8079/mcp"  # TEST-NET-1: never routed
    settings = Settings(url=url, handshake_timeout_s=0.2, autostart=True)
    bridge = Bridge(settings, rng=random.Random(1), connect_wait_s=0.5)
    client = Harness()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bridge.run, client.stdin_recv, client.stdout_send)
        await client.send(INIT)
        reply = await client.recv()
        nursery.cancel_scope.cancel()
    assert reply["error"]["data"]["reason"] == "daemon_unavailable"
    assert "EXAI_AUTOSTART:" not in reply["error"]["message"]
    assert "is the exai daemon running there" in reply["error"]["message"]


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(BACKOFF_CAP_S, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # spread over the whole range, not clustered
    assert backoff_delay(1000, rng) <= BACKOFF_CAP_S


@pytest.mark.anyio
async def test_closed_stdout_ends_the_bridge_quietly(daemon: FakeDaemon) -> None:
    bridge = Bridge(Settings(url=daemon.url))
    client = Harness()
    # the nursery can only close once run() has returned by itself
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.run, client.stdin_recv, client.stdout_send)
            await client.stdout_recv.aclose()  # the MCP client stopped reading
            await client.send({"jsonrpc": "2.0", "id": 1, "method": "ping"})
