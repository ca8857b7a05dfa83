"""Draining (SIGTERM) hands sessions over instead of refusing their calls (rolling restarts).

A keyed call (the idempotency key every ``exai bridge`` call carries) that reaches a draining
daemon is left unanswered, and the session is closed with 1012 (service restart) as soon as the
calls already admitted on it are answered: the client reconnects through the balancer to a
daemon that is not stopping and re-sends it. A call without a key cannot be re-sent by its
client, so it still gets a clear error.
"""

from __future__ import annotations

import json
import socket
import struct

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from exai.server.app import serve
from tests.helpers import Rpc, make_settings, registry_with, ws
from tests.server.test_daemon import Probe

pytestmark = pytest.mark.anyio


async def test_a_keyed_call_on_a_draining_daemon_is_handed_over_not_refused(tmp_path) -> None:
    probe = Probe()
    settings = make_settings(tmp_path, drain_timeout_s=10)
    messages: list[dict] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            d = await nursery.start(
                lambda task_status: serve(
                    settings, registry_with(probe.spec), announce=False, task_status=task_status
                )
            )
            async with ws(d) as conn:
                rpc = Rpc(conn)
                await rpc.start_call("probe", id=1, **{"exai/idempotencyKey": "bridge:1"})
                await probe.started_event.wait()
                d.request_shutdown()
                await d.changes.wait_for(lambda: d.draining)
                await rpc.start_call("probe", id=2, **{"exai/idempotencyKey": "bridge:2"})
                await rpc.start_call("probe", id=3)  # no key: its client would not re-send it
                probe.release.set()
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        messages.append(json.loads(await conn.get_message()))
    answers = {m["id"]: m for m in messages if "id" in m}
    assert answers[1]["result"]["content"][0]["text"] == "done 1"  # the running call finished
    assert 2 not in answers  # handed over: the client re-sends it elsewhere
    assert answers[3]["error"]["data"]["reason"] == "overloaded"
    assert closed.value.reason.code == 1012
    assert probe.started == 1
    assert d.stats.rejections["handed_over"] == 1


async def test_an_idle_session_of_a_draining_daemon_is_closed_at_once(tmp_path) -> None:
    settings = make_settings(tmp_path, drain_timeout_s=30)
    probe = Probe()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            d = await nursery.start(
                lambda task_status: serve(
                    settings, registry_with(probe.spec), announce=False, task_status=task_status
                )
            )
            async with ws(d) as busy, ws(d) as idle:
                await Rpc(busy).start_call("probe", id=1)
                await probe.started_event.wait()
                d.request_shutdown()
                # the idle one goes now, while the busy one's call still runs
                with pytest.raises(ConnectionClosed) as closed:
                    await idle.get_message()
                assert closed.value.reason.code == 1012
                assert probe.finished == 0
                probe.release.set()


# ---------------------------------------------------------------- answers being written


def _post_big(port: int, nbytes: int) -> bytes:
    from tests.httpmcp import envelope

    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "big", "arguments": {"bytes": nbytes}, "_meta": envelope()},
        }
    ).encode()
    head = (
        f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize(
    "anyio_backend", [("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})]
)
@pytest.mark.parametrize("door", ["websocket", "websocket_queued", "http"])
async def test_an_answer_being_written_when_the_drain_begins_is_written_whole(
    tmp_path, door
) -> None:
    # A large answer to a client that reads it slowly but steadily (here 16 KiB every 10 ms
    # of the mock clock: ≈ 1.6 MB/s, ≈ 5 s for the answer) is still being written when the
    # daemon drains: its call has finished, so the drain waited 2 s for the sessions, closed
    # them (1001) and 2 s later cancelled the connections — the answer cut in the middle of
    # its frame or body (docs/deploy.md: calls running finish "and are answered on their
    # sessions"). Now the writes go on within the drain bound (and their send deadline).
    # websocket_queued: a second answer queued behind the first, written by the session's
    # close — whose flush was bounded by 1 s.
    from benchmarks.load import large_answers as la
    from tests.helpers import raw_upgrade, running_daemon, ws_frame

    nbytes = 4 * 1024 * 1024
    la.prepare(nbytes)
    settings = make_settings(
        tmp_path,
        drain_timeout_s=60,
        max_answer_bytes=64 * 1024 * 1024,
        session_max_pending_bytes=256 * 1024 * 1024,
    )
    async with running_daemon(settings, registry_with(la.BIG)) as d:
        port = int(d.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        calls = 2 if door == "websocket_queued" else 1
        if door.startswith("websocket"):
            stream, status, _, data = await raw_upgrade("127.0.0.1", port, rcvbuf=4096)
            assert status == 101
            for id in range(1, calls + 1):
                call = {
                    "jsonrpc": "2.0",
                    "id": id,
                    "method": "tools/call",
                    "params": {"name": "big", "arguments": {"bytes": nbytes}},
                }
                await stream.send_all(ws_frame(json.dumps(call).encode()))
        else:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            await stream.send_all(_post_big(port, nbytes))
            data = b""
        received = bytearray(data)
        while len(received) < 256 * 1024:
            received += await stream.receive_some(16 * 1024)
        with trio.fail_after(30):
            await d.changes.wait_for(lambda: not d.calls.running)  # (answers being written)
        d.request_shutdown()
        with trio.fail_after(120):
            while got := await stream.receive_some(16 * 1024):
                received += got
                await trio.sleep(0.01)
        await stream.aclose()
    # (checked in a worker thread: parsing 10 MB of JSON is a step the stall check would fail)
    await trio.to_thread.run_sync(_check_whole, bytes(received), door, calls, la.prepare(nbytes)[1])


def _check_whole(received: bytes, door: str, calls: int, content: str) -> None:
    if door.startswith("websocket"):
        ids = []
        at = 0
        for _ in range(calls):
            assert received[at] == 0x81 and received[at + 1] == 127
            size = struct.unpack("!Q", received[at + 2 : at + 10])[0]
            answer = received[at + 10 : at + 10 + size]
            assert len(answer) == size  # (whole: 1-2 MB of 9.9 were read when it was cut)
            msg = json.loads(answer)
            assert msg["result"]["structuredContent"]["content"] == content
            ids.append(msg["id"])
            at += 10 + size
        assert sorted(ids) == list(range(1, calls + 1))
        assert received[at] == 0x88 and struct.unpack("!H", received[at + 2 : at + 4])[0] == 1012
    else:
        head, _, answer = received.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert len(answer) == length  # (whole; its head went before the drain began)
        assert json.loads(answer)["result"]["structuredContent"]["content"] == content
