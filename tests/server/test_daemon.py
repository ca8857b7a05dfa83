"""The daemon core over real WebSockets on loopback (in-process daemon under trio)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.helpers import (
    Rpc,
    make_settings,
    parse_close,
    raw_upgrade,
    registry_with,
    running_daemon,
    ws,
    ws_frame,
)

pytestmark = pytest.mark.anyio

OBJ: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": True}


class Probe:
    """A tool that reports what happened to its executions."""

    def __init__(self, name: str = "probe", timeout_s: float | None = None) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.started_event = trio.Event()
        self.release = trio.Event()
        self.spec = ToolSpec(
            name=name, description="probe", input_schema=OBJ, handler=self.run, timeout_s=timeout_s
        )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.started += 1
        self.started_event.set()
        try:
            if args.get("progress"):
                await ctx.progress(progress=1, total=2, message="half way")
            if args.get("wait", True):
                await self.release.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.finished += 1
        return ToolResult(text=f"done {self.started}")


async def test_initialize_then_tools_list_and_version(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d, ws(d) as conn:
        rpc = Rpc(conn)
        init = await rpc.request(
            "initialize",
            {
                "protocolVersion": "2025-03-26",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        )
        assert init["result"]["protocolVersion"] == "2025-03-26"
        assert init["result"]["serverInfo"]["name"] == "exai"
        await rpc.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert (await rpc.request("ping"))["result"] == {}
        tools = (await rpc.request("tools/list"))["result"]["tools"]
        names = [t["name"] for t in tools]
        assert {"version", "status"} <= set(names)
        assert all("inputSchema" in t for t in tools)
        res = await rpc.call("version")
        assert res["result"]["isError"] is False
        assert json.loads(res["result"]["content"][0]["text"])["exai"]


async def test_unsupported_protocol_version_gets_the_latest_supported(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d, ws(d) as conn:
        init = await Rpc(conn).request(
            "initialize", {"protocolVersion": "1999-01-01", "capabilities": {}}
        )
        assert init["result"]["protocolVersion"] == "2025-11-25"


async def test_server_discover_is_answered(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d, ws(d) as conn:
        res = await Rpc(conn).request("server/discover", {})
        assert "result" in res, res
        assert "2026-07-28" in json.dumps(res["result"])


async def test_connection_cap_answers_503_with_retry_after_and_recovers_after_abrupt_kills(
    tmp_path,
):
    settings = make_settings(tmp_path, max_connections=3)
    async with running_daemon(settings) as d:
        host, port = "127.0.0.1", int(d.url.rsplit(":", 1)[1].split("/")[0])
        streams = []
        for _ in range(3):
            stream, status, _, _ = await raw_upgrade(host, port)
            assert status == 101
            streams.append(stream)
        assert d.admission.open == 3
        extra, status, headers, _ = await raw_upgrade(host, port)
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        await extra.aclose()
        # kill every client abruptly: TCP close without a WebSocket close handshake
        for s in streams:
            await trio.aclose_forcefully(s)
        with trio.fail_after(5):
            while d.admission.open:
                await trio.sleep(0.01)
        assert d.admission.per_ip == {}
        async with ws(d) as conn:
            assert (await Rpc(conn).request("ping"))["result"] == {}


async def test_per_ip_cap_answers_503_and_is_released(tmp_path):
    settings = make_settings(tmp_path, max_connections=100, max_connections_per_ip=2)
    async with running_daemon(settings) as d:
        port = int(d.url.rsplit(":", 1)[1].split("/")[0])
        a, sa, _, _ = await raw_upgrade("127.0.0.1", port)
        b, sb, _, _ = await raw_upgrade("127.0.0.1", port)
        c, sc, hc, _ = await raw_upgrade("127.0.0.1", port)
        assert (sa, sb, sc) == (101, 101, 503)
        assert "retry-after" in hc
        assert d.admission.rejected["max_connections_per_ip"] == 1
        for s in (a, b, c):
            await trio.aclose_forcefully(s)
        with trio.fail_after(5):
            while d.admission.open:
                await trio.sleep(0.01)
        async with ws(d) as conn:
            assert (await Rpc(conn).request("ping"))["result"] == {}


async def test_client_vanishing_mid_handshake_releases_everything(tmp_path):
    settings = make_settings(tmp_path, handshake_timeout_s=0.3)
    async with running_daemon(settings) as d:
        port = int(d.url.rsplit(":", 1)[1].split("/")[0])
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET /mcp HTTP/1.1\r\nHost: x\r\n")  # never finishes (slowloris)
        silent = await trio.open_tcp_stream("127.0.0.1", port)  # sends nothing at all
        gone = await trio.open_tcp_stream("127.0.0.1", port)
        await gone.send_all(b"GET /mcp HTTP/1.1\r\n")
        await trio.aclose_forcefully(gone)
        with trio.fail_after(5):
            answer = b""
            while chunk := await slow.receive_some(4096):  # 408 at the handshake bound, closed
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert await silent.receive_some(100) == b""  # dropped at the bound, without a word
        assert d.stats.rejections["head_timeout"] == 1
        assert d.stats.rejections["handshake_timeout"] >= 1
        assert d.admission.open == 0
        for stream in (slow, silent):
            await trio.aclose_forcefully(stream)


async def test_bearer_token_is_required_when_tokens_are_configured(tmp_path):
    from exai.config import Secret

    settings = make_settings(
        tmp_path,
        tokens=Secret(
            "alice:tok-alice-123456,sha256:"
            + __import__("hashlib").sha256(b"hashed-tok").hexdigest()
        ),
    )
    async with running_daemon(settings) as d:
        for bad in (None, "wrong-token"):
            with pytest.raises(ConnectionRejected) as info:
                async with ws(d, token=bad):
                    pass
            assert info.value.status_code == 401
        for good in ("tok-alice-123456", "hashed-tok"):
            async with ws(d, token=good) as conn:
                assert (await Rpc(conn).request("ping"))["result"] == {}
        assert d.admission.open in (0, 1)


async def test_wrong_path_is_404_before_upgrade(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d:
        with pytest.raises(ConnectionRejected) as info:
            async with ws(d.url.replace("/mcp", "/other")):
                pass
        assert info.value.status_code == 404


def _unfinished(frame: bytes) -> bytes:
    """``frame`` with FIN cleared: the first fragment of a message."""
    return bytes([frame[0] & 0x7F]) + frame[1:]


BAD_INPUTS = [
    # (name, frame bytes builder, expected: ("error", code) | ("close", code))
    ("malformed json", lambda: ws_frame(b'{"jsonrpc": "2.0", "id": 1,'), ("error", -32700)),
    (
        "wrong jsonrpc",
        lambda: ws_frame(b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}'),
        ("error", -32600),
    ),
    (
        "unknown method",
        lambda: ws_frame(b'{"jsonrpc": "2.0", "id": 1, "method": "nope/nope"}'),
        ("error", -32601),
    ),
    (
        "invalid params",
        lambda: ws_frame(
            b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
            b'"params": {"name": "version", "arguments": {"x": 1}}}'
        ),
        ("error", -32602),
    ),
    ("nested 100000 deep", lambda: ws_frame(b"[" * 100_000 + b"]" * 100_000), ("error", None)),
    (
        "huge id",
        lambda: ws_frame(
            json.dumps({"jsonrpc": "2.0", "id": "x" * 100_000, "method": "ping"}).encode()
        ),
        ("error", -32600),
    ),
    ("oversized frame", lambda: ws_frame(b" " * (300 * 1024)), ("close", 1009)),
    # the limit is in bytes: 70 K four-byte characters are 280 KB (trio-websocket counted 70 K)
    (
        "oversized frame of 4-byte characters",
        lambda: ws_frame(('"' + "\U0001f600" * (70 * 1024) + '"').encode()),
        ("close", 1009),
    ),
    (
        "oversized message of 4-byte characters in two fragments",
        lambda: (
            _unfinished(ws_frame(('"' + "\U0001f600" * (35 * 1024)).encode()))
            + ws_frame(("\U0001f600" * (35 * 1024) + '"').encode(), opcode=0x0)
        ),
        ("close", 1009),
    ),
    ("binary frame", lambda: ws_frame(b'{"jsonrpc": "2.0"}', opcode=0x2), ("close", 1003)),
    ("invalid utf-8", lambda: ws_frame(b'{"jsonrpc": "\xff\xfe"}'), ("close", 1007)),
    # one whole text frame in a read is read without wsproto's frame decoder (e345772) when it
    # has the common shape; every frame near that shape that RFC 6455 refuses must still be
    # refused (wsproto's 1002/1007), the frame read alone as such a frame is
    ("unmasked text frame", lambda: _unmasked(ws_frame(b'"x"')), ("close", 1002)),
    ("text frame with RSV1", lambda: _first(ws_frame(b'"x"'), 0xC1), ("close", 1002)),
    ("text frame with RSV3", lambda: _first(ws_frame(b'"x"'), 0x91), ("close", 1002)),
    ("reserved data opcode", lambda: _first(ws_frame(b'"x"'), 0x83), ("close", 1002)),
    ("a continuation with no message", lambda: ws_frame(b'"x"', opcode=0x0), ("close", 1002)),
    ("length in 2 bytes that fits in 1", lambda: _wide(b'"x"', 126), ("close", 1002)),
    ("length in 8 bytes that fits in 1", lambda: _wide(b'"x"', 127), ("close", 1002)),
    ("a UTF-16 surrogate in UTF-8", lambda: ws_frame(b'"\xed\xa0\x80"'), ("close", 1007)),
    ("an overlong UTF-8 form", lambda: ws_frame(b'"\xc0\xaf"'), ("close", 1007)),
    ("a code point over U+10FFFF", lambda: ws_frame(b'"\xf4\x90\x80\x80"'), ("close", 1007)),
    ("a cut code point at the end", lambda: ws_frame(b'"\xe2\x82'), ("close", 1007)),
    ("an empty text frame", lambda: ws_frame(b""), ("error", -32700)),
]


def _first(frame: bytes, first: int) -> bytes:
    """``frame`` with its first byte (FIN, RSV bits, opcode) replaced."""
    return bytes([first]) + frame[1:]


def _unmasked(frame: bytes) -> bytes:
    """A short masked client ``frame`` (from :func:`ws_frame`) sent unmasked."""
    n = frame[1] & 0x7F
    mask, masked = frame[2:6], frame[6:]
    return bytes([frame[0], n]) + bytes(b ^ mask[i % 4] for i, b in enumerate(masked))


def _wide(payload: bytes, marker: int) -> bytes:
    """A masked text frame whose short length is written in 2 (126) or 8 (127) bytes."""
    width = 2 if marker == 126 else 8
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | marker]) + len(payload).to_bytes(width, "big") + mask + masked


@pytest.mark.parametrize(("name", "frame", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_gets_its_outcome_and_other_clients_are_served(
    tmp_path, name, frame, expected
):
    settings = make_settings(tmp_path, max_frame_bytes=256 * 1024)
    async with running_daemon(settings) as d, ws(d) as bystander:
        other = Rpc(bystander)
        port = int(d.url.rsplit(":", 1)[1].split("/")[0])
        stream, status, _, rest = await raw_upgrade("127.0.0.1", port)
        assert status == 101
        await stream.send_all(frame())
        data = rest
        with trio.fail_after(5):
            while len(data) < 4:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    break
                data += chunk
            kind, code = expected
            if kind == "close":
                assert parse_close(data) == code, data[:50]
            else:
                # a text frame carrying a JSON-RPC error; read the whole frame
                assert data[0] & 0x0F == 0x1
                length = data[1] & 0x7F
                offset = 2
                if length == 126:
                    length, offset = int.from_bytes(data[2:4], "big"), 4
                while len(data) < offset + length:
                    data += await stream.receive_some(1 << 16)
                msg = json.loads(data[offset : offset + length])
                assert "error" in msg, msg
                assert msg["error"]["message"]
                if code is not None:
                    assert msg["error"]["code"] == code, msg
                else:
                    assert msg["error"]["code"] in (-32700, -32600)
                    assert "nest" in msg["error"]["message"].lower()
        await trio.aclose_forcefully(stream)
        assert (await other.request("ping"))["result"] == {}
        assert (await other.call("version"))["result"]["isError"] is False


async def test_message_flood_is_rate_limited_then_closed_with_1008_while_others_are_served(
    tmp_path,
):
    # Ten messages a second: a busy machine still reads 200 pings faster than that, so they
    # are a flood whatever its load (at 100 a second, a loaded daemon read them within the
    # rate and never closed the flooder). Each refusal pauses reading for 0.1 s, so about ten
    # are refused a second while the abuse bucket refills one: the close comes after ~11.
    settings = make_settings(
        tmp_path, session_rate_per_s=10, session_burst=5, session_abuse_limit=10
    )
    async with running_daemon(settings) as d, ws(d) as flooder_conn, ws(d) as bystander:
        limited = []
        closed_code = None
        ping = json.dumps({"jsonrpc": "2.0", "id": 0, "method": "ping"})
        try:
            for _ in range(200):
                await flooder_conn.send_message(ping)
            with trio.fail_after(30):  # a hang guard: the close comes within seconds
                while True:
                    msg = json.loads(await flooder_conn.get_message())
                    if "error" in msg:
                        limited.append(msg)
        except ConnectionClosed as exc:
            closed_code = exc.reason.code
        assert limited, "no request was rate limited"
        data = limited[0]["error"]["data"]
        assert data["reason"] == "rate_limited"
        assert data["retry_after_s"] > 0
        assert closed_code == 1008
        assert (await Rpc(bystander).request("ping"))["result"] == {}


async def test_cancelled_notification_cancels_the_tool_frees_slots_and_sends_no_response(tmp_path):
    probe = Probe()
    async with (
        running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d,
        ws(d) as conn,
    ):
        rpc = Rpc(conn)
        await rpc.start_call("probe", id=7)
        with trio.fail_after(5):
            await probe.started_event.wait()
        assert d.inflight.borrowed_tokens == 1
        await rpc.send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": 7, "reason": "user"},
            }
        )
        with trio.fail_after(5):
            while d.inflight.borrowed_tokens:
                await trio.sleep(0.01)
        assert probe.cancelled == 1
        # the next message on the wire is the ping's answer, not a response to id 7
        await rpc.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        with trio.fail_after(5):
            msg = await rpc.next_message()
        assert msg["id"] == 8


async def test_closing_the_connection_cancels_its_calls(tmp_path):
    probe = Probe()
    async with running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d:
        async with ws(d) as conn:
            await Rpc(conn).start_call("probe", id=1)
            with trio.fail_after(5):
                await probe.started_event.wait()
        with trio.fail_after(5):
            while d.inflight.borrowed_tokens or probe.cancelled == 0:
                await trio.sleep(0.01)
        assert probe.cancelled == 1
        assert d.calls.running == {}


async def test_call_past_its_deadline_gets_reason_timeout(tmp_path):
    probe = Probe(timeout_s=0.2)
    async with (
        running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d,
        ws(d) as conn,
    ):
        res = await Rpc(conn).call("probe")
        assert res["error"]["data"]["reason"] == "timeout"
        assert "deadline" in res["error"]["message"]
        assert d.inflight.borrowed_tokens == 0


async def test_call_beyond_the_slots_and_the_fifo_is_rejected_as_overloaded(tmp_path):
    # (calls beyond the connection's slots wait in its FIFO; with none, they are refused)
    probe = Probe()
    settings = make_settings(tmp_path, session_max_inflight=1, session_queue_max=0)
    async with running_daemon(settings, registry_with(probe.spec)) as d, ws(d) as conn:
        rpc = Rpc(conn)
        await rpc.start_call("probe", id=1)
        with trio.fail_after(5):
            await probe.started_event.wait()
        res = await rpc.call("probe", id=2)
        assert res["error"]["data"]["reason"] == "overloaded"
        assert res["error"]["data"]["retry_after_s"] > 0
        probe.release.set()
        first = await rpc.response(1)
        assert first["result"]["content"][0]["text"] == "done 1"
        assert d.inflight.borrowed_tokens == 0


async def test_global_inflight_cap_applies_across_connections(tmp_path):
    probe = Probe()
    settings = make_settings(tmp_path, max_inflight=1, slot_wait_s=0.1)
    async with running_daemon(settings, registry_with(probe.spec)) as d, ws(d) as a, ws(d) as b:
        await Rpc(a).start_call("probe", id=1)
        with trio.fail_after(5):
            await probe.started_event.wait()
        res = await Rpc(b).call("probe")
        assert res["error"]["data"]["reason"] == "overloaded"
        probe.release.set()


async def test_progress_token_gets_tool_progress_and_heartbeats(tmp_path):
    probe = Probe()
    settings = make_settings(tmp_path, heartbeat_interval_s=0.05)
    async with running_daemon(settings, registry_with(probe.spec)) as d, ws(d) as conn:
        rpc = Rpc(conn)
        await rpc.start_call("probe", {"progress": True}, id=1, progressToken="tok")
        with trio.fail_after(5):
            while len(rpc.notifications) < 3:
                rpc.notifications.append(await rpc.next_message())
        probe.release.set()
        res = await rpc.response(1)
        assert res["result"]["isError"] is False
        prog = [n for n in rpc.notifications if n.get("method") == "notifications/progress"]
        assert len(prog) >= 3
        assert all(n["params"]["progressToken"] == "tok" for n in prog)
        values = [n["params"]["progress"] for n in prog]
        assert values == sorted(values) and len(set(values)) == len(values)
        assert any("half way" in (n["params"].get("message") or "") for n in prog)
        assert any("still working" in (n["params"].get("message") or "") for n in prog)


async def test_same_id_resent_on_the_same_session_runs_once(tmp_path):
    probe = Probe()
    async with (
        running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d,
        ws(d) as conn,
    ):
        rpc = Rpc(conn)
        req = {
            "jsonrpc": "2.0",
            "id": "dup",
            "method": "tools/call",
            "params": {"name": "probe", "arguments": {}},
        }
        await rpc.send(req)
        with trio.fail_after(5):
            await probe.started_event.wait()
        await rpc.send(req)  # joins the running execution
        probe.release.set()
        first = await rpc.response("dup")
        second = await rpc.response("dup")
        assert first["result"] == second["result"]
        await rpc.send(req)  # after it finished: the stored result
        third = await rpc.response("dup")
        assert third["result"] == first["result"]
        assert probe.started == 1


async def test_a_joined_call_runs_on_for_its_first_request_when_the_re_sent_one_is_cancelled(
    tmp_path,
):
    # the first request runs the call in its own task (issue 18); cancelling the request that
    # joined it must neither stop the run nor lose the first request's answer
    probe = Probe()
    async with (
        running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d,
        ws(d) as conn,
    ):
        rpc = Rpc(conn)
        req = {
            "jsonrpc": "2.0",
            "id": "dup",
            "method": "tools/call",
            "params": {"name": "probe", "arguments": {}},
        }
        await rpc.send(req)
        with trio.fail_after(5):
            await probe.started_event.wait()
        await rpc.send(req)  # joins the running execution
        await rpc.send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": "dup", "reason": "user"},
            }
        )
        await rpc.send({"jsonrpc": "2.0", "id": 8, "method": "ping"})
        with trio.fail_after(5):
            assert (await rpc.response(8))["result"] == {}
        probe.release.set()
        with trio.fail_after(5):
            first = await rpc.response("dup")
        assert "result" in first
        assert probe.started == 1 and probe.cancelled == 0
        with trio.fail_after(5):
            while d.inflight.borrowed_tokens:
                await trio.sleep(0.01)


async def test_idempotency_key_from_a_reconnected_client_joins_the_running_call(tmp_path):
    probe = Probe()
    meta = {"exai/idempotencyKey": "bridge-1:5"}
    req = {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {"name": "probe", "arguments": {}, "_meta": meta},
    }
    async with running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d:
        async with ws(d) as first:
            await Rpc(first).send(req)
            with trio.fail_after(5):
                await probe.started_event.wait()
        # the first connection is gone; the execution keeps running for the reconnecting bridge
        await trio.sleep(0.05)
        assert probe.cancelled == 0
        async with ws(d) as second:
            rpc = Rpc(second)
            await rpc.send(req)
            await trio.sleep(0.05)
            probe.release.set()
            res = await rpc.response(5)
            assert res["result"]["content"][0]["text"] == "done 1"
            # and once more after it finished: the stored result, no new execution
            again = await rpc.request("tools/call", req["params"], id=6)
            assert again["result"] == res["result"]
        assert probe.started == 1


async def test_unknown_tool_and_bad_arguments_name_the_field(tmp_path):
    async with running_daemon(make_settings(tmp_path)) as d, ws(d) as conn:
        rpc = Rpc(conn)
        res = await rpc.call("no-such-tool")
        assert res["error"]["code"] == -32602
        assert "no-such-tool" in res["error"]["message"]
        res = await rpc.request("tools/call", {"arguments": {}})
        assert res["error"]["code"] == -32602
        assert "name" in res["error"]["message"]


async def test_tool_crash_is_an_internal_error_and_the_session_survives(tmp_path):
    async def boom(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        raise RuntimeError("kaboom")

    spec = ToolSpec(name="boom", description="x", input_schema=OBJ, handler=boom)
    async with running_daemon(make_settings(tmp_path), registry_with(spec)) as d, ws(d) as conn:
        rpc = Rpc(conn)
        res = await rpc.call("boom")
        assert res["error"]["code"] == -32603
        assert res["error"]["data"]["reason"] == "internal_error"
        assert (await rpc.request("ping"))["result"] == {}


async def test_shutdown_drains_inflight_calls_then_stops(tmp_path):
    probe = Probe()
    settings = make_settings(tmp_path, drain_timeout_s=5)
    async with trio.open_nursery() as nursery:
        from exai.server.app import serve

        d = await nursery.start(
            lambda task_status: serve(
                settings, registry_with(probe.spec), announce=False, task_status=task_status
            )
        )
        async with ws(d) as conn:
            rpc = Rpc(conn)
            await rpc.start_call("probe", id=1)
            with trio.fail_after(5):
                await probe.started_event.wait()
            d.request_shutdown()
            await trio.sleep(0.05)
            assert d.draining
            # no new connections while draining
            with pytest.raises((ConnectionRejected, HandshakeError, OSError)):
                async with ws(d):
                    pass
            probe.release.set()
            res = await rpc.response(1)
            assert res["result"]["content"][0]["text"] == "done 1"
    assert probe.finished == 1


async def test_shutdown_cancels_calls_that_outlive_the_drain_bound(tmp_path):
    probe = Probe()
    settings = make_settings(tmp_path, drain_timeout_s=0.2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            from exai.server.app import serve

            d = await nursery.start(
                lambda task_status: serve(
                    settings, registry_with(probe.spec), announce=False, task_status=task_status
                )
            )
            async with ws(d) as conn:
                await Rpc(conn).start_call("probe", id=1)
                with trio.fail_after(5):
                    await probe.started_event.wait()
                d.request_shutdown()
                with pytest.raises(ConnectionClosed):
                    while True:
                        await conn.get_message()
    assert probe.cancelled == 1


async def test_admin_healthz_and_readyz(tmp_path):
    async with (
        running_daemon(make_settings(tmp_path)) as d,
        httpx.AsyncClient(base_url=d.admin_url, verify=False) as http,
    ):
        assert (await http.get("/healthz")).status_code == 200
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        d.overloaded_reason = "memory"
        r = await http.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "memory"
        d.overloaded_reason = None
        assert (await http.get("/nope")).status_code == 404


async def test_admin_paths_in_absolute_form_are_served(tmp_path):
    # RFC 9112 §3.2.2: a server MUST accept the absolute form (it was 404, as on the MCP
    # listener before); an authority that is not host[:port] is 400.
    async with running_daemon(make_settings(tmp_path)) as d:
        host, port = d.admin_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        answers = []
        for target in (f"http://{host}:{port}/healthz", "HTTP://x/readyz?verbose=1", "http://@/healthz"):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
                )
                received = b""
                with trio.fail_after(30):
                    while data := await stream.receive_some(65536):
                        received += data
            answers.append(received.split(b"\r\n", 1)[0])
    assert answers == [b"HTTP/1.1 200 ", b"HTTP/1.1 200 ", b"HTTP/1.1 400 "]


async def test_an_admin_head_request_is_answered_and_the_daemon_keeps_running(tmp_path):
    # A HEAD request (curl -I, many balancers' health checks) had its answer's body written
    # anyway: h11 refuses a body after a HEAD's head (LocalProtocolError), which nothing caught,
    # so it ended the admin listener's nursery -- the daemon's connection nursery: one
    # unauthenticated `HEAD /healthz` stopped the daemon. RFC 9110 §9.1: GET and HEAD are served.
    async with running_daemon(make_settings(tmp_path)) as d:
        host, port = d.admin_url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        answers = []
        for method, target in (("HEAD", "/healthz"), ("HEAD", "/nope"), ("GET", "/healthz")):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                received = b""
                with trio.fail_after(30):
                    while data := await stream.receive_some(65536):
                        received += data
            head, _, body = received.partition(b"\r\n\r\n")
            answers.append((head.split(b"\r\n", 1)[0], body if method == "HEAD" else b"..."))
        assert not d.draining
    assert answers == [
        (b"HTTP/1.1 200 ", b""),
        (b"HTTP/1.1 404 ", b""),
        (b"HTTP/1.1 200 ", b"..."),
    ]


async def test_status_tool_reports_connections_inflight_limits_and_uptime(tmp_path):
    async with running_daemon(make_settings(tmp_path, max_inflight=9)) as d, ws(d) as conn:
        res = await Rpc(conn).call("status")
        data = res["result"]["structuredContent"]["daemon"]
        assert data["connections"]["open"] == 1
        assert data["inflight"]["max_inflight"] == 9
        assert data["inflight"]["calls"] == 1  # the status call itself
        assert data["uptime_s"] >= 0


async def test_client_vanishing_with_answers_queued_does_not_disturb_the_daemon(tmp_path):
    settings = make_settings(tmp_path, session_rate_per_s=10_000, session_burst=10_000)
    async with running_daemon(settings) as d, ws(d) as bystander:
        port = int(d.url.rsplit(":", 1)[1].split("/")[0])
        for _ in range(5):
            stream, status, _, _ = await raw_upgrade("127.0.0.1", port)
            assert status == 101
            ping = ws_frame(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}')
            await stream.send_all(ping * 2000)  # never reads a single answer
            await trio.aclose_forcefully(stream)
        with trio.fail_after(5):
            while d.admission.open > 1:
                await trio.sleep(0.01)
        assert d.stats.rejections.get("session_error", 0) == 0
        assert (await Rpc(bystander).request("ping"))["result"] == {}


async def test_duplicates_sent_back_to_back_run_once_even_while_waiting_for_a_slot(tmp_path):
    blocker, probe = Probe("blocker"), Probe()
    settings = make_settings(tmp_path, max_inflight=1, slot_wait_s=5)
    async with (
        running_daemon(settings, registry_with(blocker.spec, probe.spec)) as d,
        ws(d) as conn,
        ws(d) as other,
    ):
        rpc = Rpc(conn)
        # hold the only global slot, so the probe's first request waits for it
        await Rpc(other).start_call("blocker", id=1)
        with trio.fail_after(5):
            await blocker.started_event.wait()
        req = {"jsonrpc": "2.0", "id": "twice", "method": "tools/call", "params": {"name": "probe"}}
        await rpc.send(req)
        await rpc.send(req)  # arrives while the first one waits for its slot
        blocker.release.set()
        probe.release.set()
        first, second = await rpc.response("twice"), await rpc.response("twice")
        assert first["result"] == second["result"]
        assert probe.started == 1


async def test_same_idempotency_key_on_two_connections_back_to_back_runs_once(tmp_path):
    probe = Probe()
    params = {"name": "probe", "arguments": {}, "_meta": {"exai/idempotencyKey": "b-1:9"}}
    async with (
        running_daemon(make_settings(tmp_path), registry_with(probe.spec)) as d,
        ws(d) as a,
        ws(d) as b,
    ):
        ra, rb = Rpc(a), Rpc(b)
        await ra.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params})
        await rb.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params})
        with trio.fail_after(5):
            await probe.started_event.wait()
        probe.release.set()
        assert (await ra.response(9))["result"] == (await rb.response(9))["result"]
        assert probe.started == 1


async def test_an_idempotency_key_is_scoped_to_the_client_identity(tmp_path):
    from exai.config import Secret

    probe = Probe()
    probe.release.set()
    settings = make_settings(tmp_path, tokens=Secret("a:tok-a-0123456789,b:tok-b-0123456789"))
    params = {"name": "probe", "arguments": {}, "_meta": {"exai/idempotencyKey": "same-key"}}
    async with running_daemon(settings, registry_with(probe.spec)) as d:
        async with ws(d, token="tok-a-0123456789") as a:
            assert (await Rpc(a).request("tools/call", params))["result"]["isError"] is False
        async with ws(d, token="tok-b-0123456789") as b:
            # b's call with a's key runs on its own: it neither joins nor reads a's result
            assert (await Rpc(b).request("tools/call", params))["result"]["isError"] is False
        assert probe.started == 2


def test_the_announcement_lines_are_each_written_whole(monkeypatch):
    """The log writer thread shares stderr: a line written in two pieces can get a record in
    between ('…/mcp{"ts": …'), and whoever reads the URL off the line gets a wrong one."""
    import sys

    from exai.server import app

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())

    class Parts:
        url = "ws://127.0.0.1:8079/mcp"
        admin_url = "http://127.0.0.1:8080"

    from exai import logs

    monkeypatch.setattr(logs, "_json_chosen", False)  # text format: the lines as they are
    app._announce(Parts())  # type: ignore[arg-type]
    assert writes == [
        "exai: listening on ws://127.0.0.1:8079/mcp\n",
        "exai: admin on http://127.0.0.1:8080\n",
    ]
    # JSON format: the same lines as whole JSON records, the text under "message"
    writes.clear()
    monkeypatch.setattr(logs, "_json_chosen", True)
    app._announce(Parts())  # type: ignore[arg-type]
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes)
    records = [json.loads(w) for w in writes]
    assert [(r["event"], r["message"], r["url"]) for r in records] == [
        ("daemon.listening", "exai: listening on ws://127.0.0.1:8079/mcp", Parts.url),
        ("daemon.admin_listening", "exai: admin on http://127.0.0.1:8080", Parts.admin_url),
    ]


async def test_an_admin_route_that_fails_is_answered_500_and_the_daemon_keeps_running(
    tmp_path, monkeypatch
):
    # Before: an exception from a route (a metrics render here) left the admin connection's
    # handler, and the admin listener runs in the daemon's connection nursery: the daemon ended.
    from exai.server.metrics import DaemonMetrics

    def broken_render(self):
        raise RuntimeError("a collector failed")

    monkeypatch.setattr(DaemonMetrics, "render", broken_render)
    async with (
        running_daemon(make_settings(tmp_path)) as d,
        httpx.AsyncClient(base_url=d.admin_url, verify=False) as http,
    ):
        failed = await http.get("/metrics")
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["error"]
        assert (await http.get("/healthz")).status_code == 200
        async with ws(d) as conn:
            assert (await Rpc(conn).request("ping"))["result"] == {}
