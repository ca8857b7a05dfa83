"""The Streamable HTTP door (``POST /mcp`` on the WebSocket listener's port), in-process.

Spec: docs/architecture.md "The doors" and exai/server/httpdoor.py. Both eras, the checks
before the body, SSE scoped to a request, cancellation by closing the connection or by
``notifications/cancelled``, exactly-once by idempotency key, tool argument errors by the
negotiated version (on WebSocket too), session ids that sign what they carry.
"""

from __future__ import annotations

import gc
import json
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from exai.config import Secret
from exai.server.mcp_sessions import STORED_KEY_FILE, SessionSigner, stored_key
from exai.tools.base import ToolContext, ToolResult, ToolSpec
from tests.daemon_tools import COUNT, SLEEP
from tests.helpers import Rpc, make_settings, registry_with, running_daemon, ws
from tests.httpmcp import (
    ACCEPT_BOTH,
    MODERN,
    answer_of,
    envelope,
    http_url,
    mcp_http,
    raw_exchange,
    request_bytes,
    sse_messages,
)

pytestmark = pytest.mark.anyio

OBJ: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": True}
JSON_HEADERS = [("Content-Type", "application/json"), ("Accept", ACCEPT_BOTH)]


class Probe:
    """A tool that reports what happened to its executions."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.started_event = trio.Event()
        self.cancelled_event = trio.Event()
        self.release = trio.Event()
        self.spec = ToolSpec(name="probe", description="probe", input_schema=OBJ, handler=self.run)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.started += 1
        self.started_event.set()
        try:
            if args.get("progress"):
                await ctx.progress(progress=1, total=2, message="half way")
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled += 1
            self.cancelled_event.set()
            raise
        return ToolResult(text=f"done {self.started}")


def _settings(tmp_path: Path, **kw: Any) -> Any:
    return make_settings(tmp_path, **kw)


# ------------------------------------------------------------------------------ eras


async def test_initialize_returns_a_session_id_that_later_requests_carry(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        init = await mcp.initialize("2025-06-18")
        assert init["result"]["protocolVersion"] == "2025-06-18"
        assert mcp.session_id and mcp.session_id.startswith("v1.")
        listed = await mcp.request("tools/list")
        assert "version" in {t["name"] for t in listed["result"]["tools"]}
        version = await mcp.call("version")
        assert version["result"]["isError"] is False


async def test_a_2026_request_is_served_without_a_session_and_gets_the_modern_result(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        discover = await mcp.request("server/discover")
        assert discover["result"]["supportedVersions"] == [MODERN]
        response = await mcp.post(mcp.message("tools/list"))
        assert "mcp-session-id" not in response.headers
        listed = response.json()["result"]
        assert listed["resultType"] == "complete" and listed["ttlMs"] == 0


async def test_get_and_delete_without_a_session_are_405(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, httpx.AsyncClient() as client:
        url = http_url(d.url)
        got = await client.get(url, headers={"Accept": "text/event-stream"})
        assert got.status_code == 405 and "POST" in got.headers["allow"]
        deleted = await client.delete(url)
        assert deleted.status_code == 405


async def test_a_handshake_message_without_its_session_id_is_400(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        # neither a session id nor the 2026-07-28 envelope: not a message of any era
        msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        response = await mcp.client.post(mcp.url, json=msg, headers=mcp.headers())
        assert response.status_code == 400
        assert response.json()["error"] == "bad_request"
        assert "Mcp-Session-Id" in response.json()["message"]


async def test_initialize_in_the_2026_era_is_refused_so_the_client_reprobes(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "_meta": envelope()}
        response = await mcp.post(mcp.message("initialize", params))
        assert response.status_code == 400
        assert response.json()["error"]["code"] == -32022


# ------------------------------------------------------------------------------ sessions


async def test_a_session_id_signed_with_another_key_is_unknown(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        forged = SessionSigner(b"k" * 32, 3600).mint("anonymous", "2025-11-25")
        mcp.session_id, mcp.version = forged.id, "2025-11-25"
        response = await mcp.post(mcp.message("tools/list"))
        assert response.status_code == 404
        assert response.json()["error"] == "unknown_session"


async def test_a_session_outlives_a_restart_of_its_daemon_without_a_configured_key(tmp_path):
    """Without ``EXAI_SESSION_SIGNING_KEY`` the key was made per run: a restart (an upgrade,
    ``systemctl restart``, a crash) answered every initialize-era session 404, and the official
    SDKs do not start a new one by themselves — an editor's every call failed until it was
    restarted. The key is now kept in the state directory (0600): a restarted daemon accepts
    the ids it signed before, and says where its key came from."""
    settings = _settings(tmp_path)
    async with mcp_http("http://127.0.0.1:1/mcp") as mcp:
        async with running_daemon(settings) as d:
            mcp.url = http_url(d.url)
            await mcp.initialize("2025-11-25")
            port = int(mcp.url.rsplit(":", 1)[1].split("/")[0])
        async with running_daemon(attrs.evolve(settings, port=port)) as d:
            response = await mcp.post(mcp.message("tools/list"))
            assert response.status_code == 200, response.text
            assert d.status()["doors"]["session_signing_key"] == "state directory"
    key = tmp_path / "state" / STORED_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_state_directory_that_cannot_keep_a_key_gives_none_and_two_daemons_share_one(
    tmp_path,
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    assert stored_key(blocker / "state") is None  # (the caller makes a key for the run)
    first, second = stored_key(tmp_path / "state"), stored_key(tmp_path / "state")
    assert first is not None and len(first) == 64 and first == second
    (tmp_path / "state" / STORED_KEY_FILE).write_text("short\n")  # damaged
    assert stored_key(tmp_path / "state") is None
    assert [p.name for p in (tmp_path / "state").iterdir()] == [STORED_KEY_FILE]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_kept_key_that_is_not_a_regular_file_gives_none_without_blocking(tmp_path, kind):
    """A FIFO at the key's path blocked stored_key's read for ever, and a link to /dev/zero read
    until the memory ran out: the daemon's start-up waits for that thread, so it never
    listened. Only a regular file is read, and only up to a bound."""
    import threading

    state = tmp_path / "state"
    state.mkdir()
    key = state / STORED_KEY_FILE
    if kind == "fifo":
        os.mkfifo(key)
    else:  # (/dev/null, not /dev/zero: the old code would read that until the memory ran out)
        key.symlink_to("/dev/null")
    got: list[bytes | None] = []
    worker = threading.Thread(target=lambda: got.append(stored_key(state)), daemon=True)
    worker.start()
    worker.join(30)  # (only turns a hang into a failure)
    assert got == [None]


async def test_a_session_id_that_is_garbage_is_404_and_two_of_them_are_400(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d:
        for value, status in (("not-a-session", 404), ("v1.x.y", 404), ("v1." + "a" * 600, 404)):
            headers = [*JSON_HEADERS, ("Mcp-Session-Id", value)]
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
            got, _, _ = await raw_exchange(d.url, request_bytes(d.url, body, headers=headers))
            assert got == status
        headers = [*JSON_HEADERS, ("Mcp-Session-Id", "a"), ("Mcp-Session-Id", "b")]
        got, _, body = await raw_exchange(d.url, request_bytes(d.url, b"{}", headers=headers))
        assert got == 400 and b"more than one Mcp-Session-Id" in body


async def test_a_session_ends_with_delete(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        await mcp.initialize()
        ended = await mcp.client.delete(mcp.url, headers=mcp.headers())
        assert ended.status_code == 204
        after = await mcp.post(mcp.message("tools/list"))
        assert after.status_code == 404


async def test_a_session_id_expires_after_its_ttl(tmp_path):
    async with (
        running_daemon(_settings(tmp_path, http_session_ttl_s=60.0)) as d,
        mcp_http(d.url) as mcp,
    ):
        await mcp.initialize()
        assert (await mcp.post(mcp.message("ping"))).status_code == 200
        real = d.signer.clock
        d.signer.clock = lambda: real() + 61
        try:
            assert (await mcp.post(mcp.message("ping"))).status_code == 404
        finally:
            d.signer.clock = real


async def test_a_session_belongs_to_the_identity_that_started_it(tmp_path):
    settings = _settings(tmp_path, tokens=Secret("alice:" + "a" * 40 + ",bob:" + "b" * 40))
    async with running_daemon(settings) as d, mcp_http(d.url, token="a" * 40) as alice:
        await alice.initialize()
        async with mcp_http(d.url, token="b" * 40) as bob:
            bob.session_id, bob.version = alice.session_id, alice.version
            stolen = await bob.post(bob.message("tools/list"))
            assert stolen.status_code == 404


async def test_the_protocol_version_header_must_be_one_exai_speaks_and_the_sessions(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        await mcp.initialize("2025-06-18")
        other = await mcp.post(mcp.message("ping"), **{"MCP-Protocol-Version": "2025-11-25"})
        assert other.status_code == 400
        unknown = await mcp.post(mcp.message("ping"), **{"MCP-Protocol-Version": "1999-01-01"})
        assert unknown.status_code == 400
        assert unknown.json()["error"] == "unsupported_protocol_version"


async def test_2026_routing_headers_that_contradict_the_body_are_refused(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        msg = mcp.message("tools/call", {"name": "version", "arguments": {}})
        for headers in ({"Mcp-Method": "tools/list"}, {"Mcp-Name": "status"}):
            response = await mcp.post(msg, **headers)
            assert response.status_code == 400
            assert response.json()["error"]["code"] == -32020
        agreeing = await mcp.post(
            msg,
            **{"Mcp-Method": "tools/call", "Mcp-Name": "version", "MCP-Protocol-Version": MODERN},
        )
        assert agreeing.status_code == 200 and agreeing.json()["result"]["isError"] is False


# ------------------------------------------------------------------------------ before the body


async def test_refusals_before_the_body_each_say_what_was_wrong(tmp_path):
    async with running_daemon(_settings(tmp_path, max_frame_bytes=4096)) as d:
        url = d.url
        body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
        cases = [
            ([("Content-Type", "text/plain"), ("Accept", ACCEPT_BOTH)], body, 415),
            ([("Content-Type", "application/json")], body, 406),
            ([("Content-Type", "application/json"), ("Accept", "text/html")], body, 406),
            ([*JSON_HEADERS, ("Origin", "http://evil.example")], body, 403),
            ([*JSON_HEADERS, ("Origin", "null")], body, 403),
            (
                [*JSON_HEADERS, ("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
                body,
                400,
            ),
        ]
        for headers, payload, status in cases:
            got, _, text = await raw_exchange(url, request_bytes(url, payload, headers=headers))
            assert got == status, (headers, text)
            assert "error" in json.loads(text)
        # a body over the cap is refused by its Content-Length, before it is sent
        big = request_bytes(url, b"", headers=JSON_HEADERS, content_length=5000)
        got, _, text = await raw_exchange(url, big)
        assert got == 413 and b"EXAI_MAX_FRAME_BYTES=4096" in text
        # a loopback Origin (the user's own tools) is served
        headers = [*JSON_HEADERS, ("Origin", "http://localhost:6274")]
        msg = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": envelope()}}
        )
        got, _, _ = await raw_exchange(url, request_bytes(url, msg.encode(), headers=headers))
        assert got == 200


async def test_a_chunked_body_over_the_cap_is_refused_at_the_first_byte_over(tmp_path):
    async with running_daemon(_settings(tmp_path, max_frame_bytes=4096)) as d:
        chunk = b"x" * 3000
        data = request_bytes(d.url, headers=[*JSON_HEADERS, ("Transfer-Encoding", "chunked")])
        data += b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
        got, _, _text = await raw_exchange(d.url, data)
        assert got == 413


async def test_bad_json_and_a_batch_are_400_with_a_jsonrpc_error(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d:
        for payload, code in ((b'{"jsonrpc": "2.0", "id": 1,', -32700), (b"[{}, {}]", -32600)):
            got, headers, text = await raw_exchange(
                d.url, request_bytes(d.url, payload, headers=JSON_HEADERS)
            )
            assert got == 400 and headers["content-type"] == "application/json"
            assert json.loads(text)["error"]["code"] == code


async def _head_reply(d: Any) -> bytes:
    """Everything the daemon sends to ``HEAD /mcp`` until it closes the connection."""
    parts = http_url(d.url).split("/")[2].split(":")
    stream = await trio.open_tcp_stream(parts[0], int(parts[1]))
    reply = b""
    async with stream:
        await stream.send_all(request_bytes(d.url, method="HEAD"))
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                reply += chunk
    return reply


async def test_a_head_request_gets_its_refusals_head_without_a_body(tmp_path):
    """HEAD is refused (405) with the head only: the refusal's JSON body, which h11 will not
    send after a HEAD, made the connection end with no answer and a session error logged."""
    async with running_daemon(_settings(tmp_path)) as d:
        reply = await _head_reply(d)
        assert reply.startswith(b"HTTP/1.1 405 ")
        assert reply.endswith(b"\r\n\r\n")  # (a head, nothing after it)
        assert d.stats.rejections["session_error"] == 0
    settings = _settings(tmp_path, max_connections_per_ip=1)
    async with running_daemon(settings) as d, ws(d):  # the address's connection cap: full
        reply = await _head_reply(d)
        assert reply.startswith(b"HTTP/1.1 503 ") and reply.endswith(b"\r\n\r\n")
        assert d.stats.rejections["session_error"] == 0


async def test_a_bad_token_is_401_with_www_authenticate(tmp_path):
    async with running_daemon(_settings(tmp_path, tokens=Secret("c" * 40))) as d:
        async with mcp_http(d.url, token="wrong" * 10) as mcp:
            response = await mcp.post(mcp.message("ping"))
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        async with mcp_http(d.url, token="c" * 40) as mcp:
            assert (await mcp.post(mcp.message("ping"))).status_code == 200


async def test_a_draining_daemon_refuses_a_post_with_503_before_reading_its_body(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d:
        parts = http_url(d.url).split("/")[2].split(":")
        stream = await trio.open_tcp_stream(parts[0], int(parts[1]))
        async with stream:
            d.readiness.draining = True
            try:
                # headers only: the body (1 MB announced) is never sent
                head = request_bytes(d.url, headers=JSON_HEADERS, content_length=1_000_000)
                await stream.send_all(head)
                with trio.fail_after(10):
                    reply = b""
                    while b"\r\n\r\n" not in reply:
                        reply += await stream.receive_some(4096)
            finally:
                d.readiness.draining = False
        assert reply.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in reply.lower()


async def test_expect_100_continue_is_answered_after_the_checks(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d:
        msg = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": envelope()}}
        )
        data = request_bytes(
            d.url, msg.encode(), headers=[*JSON_HEADERS, ("Expect", "100-continue")]
        )
        got, _, text = await raw_exchange(d.url, data)
        assert got == 200 and json.loads(text)["result"]["resultType"] == "complete"


# ------------------------------------------------------------------------------ answers


async def test_progress_switches_the_answer_to_an_sse_stream_scoped_to_the_request(tmp_path):
    async with (
        running_daemon(_settings(tmp_path), registry_with(SLEEP)) as d,
        mcp_http(d.url) as mcp,
    ):
        await mcp.initialize()
        msg = mcp.message(
            "tools/call",
            {"name": "sleep", "arguments": {"seconds": 1}, "_meta": {"progressToken": "p"}},
        )
        response = await mcp.post(msg)
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = sse_messages(response.text)
        assert messages[0]["method"] == "notifications/progress"
        assert messages[0]["params"]["progressToken"] == "p"
        assert messages[-1]["id"] == msg["id"] and messages[-1]["result"]["isError"] is False
        # a client that takes JSON only gets the answer as JSON, its progress dropped
        json_only = await mcp.post(msg, Accept="application/json")
        assert json_only.headers["content-type"] == "application/json"
        assert json_only.json()["result"]["content"][0]["text"] == "slept"


async def test_a_silent_call_keeps_its_sse_stream_alive_with_comments(tmp_path):
    probe = Probe()
    settings = _settings(tmp_path, heartbeat_interval_s=0.2)
    async with running_daemon(settings, registry_with(probe.spec)) as d, mcp_http(d.url) as mcp:
        async with trio.open_nursery() as nursery:

            async def release() -> None:
                await probe.started_event.wait()
                await trio.sleep(1.0)
                probe.release.set()

            nursery.start_soon(release)
            response = await mcp.post(mcp.message("tools/call", {"name": "probe", "arguments": {}}))
        assert response.headers["content-type"].startswith("text/event-stream")
        assert ": keep-alive" in response.text
        assert answer_of(response)["result"]["content"][0]["text"] == "done 1"


async def test_an_sse_stream_with_progress_and_keep_alives_stays_well_formed(tmp_path):
    # progress is written at once by the call's task (the tool's, and the execution's "still
    # working" beats), keep-alive comments by the connection's task, which reads the connection
    # meanwhile: one stream, every event whole, the answer last
    probe = Probe()
    settings = _settings(tmp_path, heartbeat_interval_s=0.1)
    async with running_daemon(settings, registry_with(probe.spec)) as d, mcp_http(d.url) as mcp:
        async with trio.open_nursery() as nursery:

            async def release() -> None:
                await probe.started_event.wait()
                await trio.sleep(1.0)
                probe.release.set()

            nursery.start_soon(release)
            args = {"name": "probe", "arguments": {"progress": True}, "_meta": {"progressToken": 7}}
            response = await mcp.post(mcp.message("tools/call", args))
        assert response.headers["content-type"].startswith("text/event-stream")
        blocks = response.text.split("\n\n")
        assert blocks[-1] == ""
        assert all(
            b == ": keep-alive" or b.startswith("event: message\ndata: {") for b in blocks[:-1]
        )
        *progress, answer = sse_messages(response.text)
        assert progress[0]["params"] == {
            "progressToken": 7,
            "progress": 1.0,
            "total": 2,
            "message": "half way",
        }
        values = [m["params"]["progress"] for m in progress]
        assert values == sorted(values) and len(set(values)) == len(values) > 1
        assert answer["result"]["content"][0]["text"] == "done 1"


async def test_two_requests_share_one_keep_alive_connection(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        await mcp.initialize()
        for _ in range(3):
            assert (await mcp.request("ping"))["result"] == {}
        assert d.admission.accepted_total == 1


# ------------------------------------------------------------------------------ cancellation


@pytest.mark.parametrize("accept", [ACCEPT_BOTH, "application/json"])
async def test_a_client_that_closes_its_connection_cancels_the_call(tmp_path, accept):
    probe = Probe()
    async with running_daemon(_settings(tmp_path), registry_with(probe.spec)) as d:
        async with trio.open_nursery() as nursery:

            async def post_then_go() -> None:
                async with mcp_http(d.url) as mcp:
                    msg = mcp.message("tools/call", {"name": "probe", "arguments": {}})
                    await mcp.post(msg, Accept=accept)

            cancel = trio.CancelScope()

            async def run() -> None:
                with cancel:
                    await post_then_go()

            nursery.start_soon(run)
            with trio.fail_after(10):
                await probe.started_event.wait()
            cancel.cancel()  # the client goes: its connection closes
            with trio.fail_after(10):
                await probe.cancelled_event.wait()
        assert probe.cancelled == 1
        with trio.fail_after(10):
            while d.inflight.borrowed_tokens:
                await trio.sleep(0.01)


@pytest.mark.parametrize("accept", [ACCEPT_BOTH, "application/json"])
async def test_notifications_cancelled_in_the_session_cancels_the_call(tmp_path, accept):
    probe = Probe()
    async with (
        running_daemon(_settings(tmp_path), registry_with(probe.spec)) as d,
        mcp_http(d.url) as mcp,
        mcp_http(d.url) as other,
    ):
        await mcp.initialize("2025-06-18")
        other.session_id, other.version = mcp.session_id, mcp.version
        msg = mcp.message("tools/call", {"name": "probe", "arguments": {}}, id="slow")
        result: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                result.append(await mcp.post(msg, Accept=accept))

            nursery.start_soon(call)
            with trio.fail_after(10):
                await probe.started_event.wait()
            cancel = {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": "slow", "reason": "user"},
            }
            accepted = await other.post(cancel)  # another connection, the same session
            assert accepted.status_code == 202
        assert probe.cancelled == 1
        # the request ends without an answer (an SSE stream with nothing in it), or for a
        # JSON-only client with the error "cancelled"
        assert result[0].status_code == 200
        if accept == ACCEPT_BOTH:
            assert sse_messages(result[0].text) == []
        else:
            assert result[0].json()["error"]["data"]["reason"] == "cancelled"


@pytest.mark.parametrize(
    "accept, progress",
    [(ACCEPT_BOTH, True), (ACCEPT_BOTH, False), ("application/json", False)],
    ids=["sse_stream_begun", "sse_accepted", "json_only"],
)
async def test_a_call_running_when_its_session_is_deleted_ends_with_session_ended(
    tmp_path, accept, progress
):
    # DELETE /mcp (the TypeScript SDK's terminateSession) while a tools/call runs on the
    # session's POST: the call was cancelled and its request ended without an answer for its id
    # (an empty SSE stream, or the error "cancelled" with id null), so a client's pending
    # request waited for its own timeout (tests/client/test_ts_sdk_http.py). It now ends with
    # the error session_ended for its id — as an SSE event when the stream had begun.
    probe = Probe()
    async with (
        running_daemon(_settings(tmp_path), registry_with(probe.spec)) as d,
        mcp_http(d.url) as mcp,
    ):
        await mcp.initialize("2025-06-18")
        assert mcp.session_id is not None and mcp.version is not None
        params: dict[str, Any] = {"name": "probe", "arguments": {"progress": progress}}
        if progress:
            params["_meta"] = {"progressToken": "p1"}
        body = json.dumps(
            {"jsonrpc": "2.0", "id": "slow", "method": "tools/call", "params": params}
        ).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", accept),
            ("Mcp-Session-Id", mcp.session_id),
            ("MCP-Protocol-Version", mcp.version),
        ]
        got: list[tuple[int, dict[str, str], bytes]] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                got.append(await raw_exchange(d.url, request_bytes(d.url, body, headers=headers)))

            nursery.start_soon(call)
            with trio.fail_after(10):
                await probe.started_event.wait()
            ended = await mcp.client.delete(mcp.url, headers=mcp.headers())
            assert ended.status_code == 204
        assert probe.cancelled == 1
        [(status, response_headers, response)] = got
        assert status == 200
        if progress:
            assert response_headers["content-type"].startswith("text/event-stream")
            messages = sse_messages(response.decode())
            assert messages[0]["method"] == "notifications/progress"
            answer = messages[-1]
        else:
            answer = json.loads(response)
        assert answer["id"] == "slow"
        assert answer["error"]["data"]["reason"] == "session_ended"


async def test_a_retry_with_the_same_idempotency_key_joins_the_first_execution(tmp_path):
    path = tmp_path / "runs"
    async with running_daemon(_settings(tmp_path), registry_with(COUNT)) as d:
        meta = {"exai/idempotencyKey": "key-1", **envelope()}
        args = {"path": str(path), "seconds": 1.0}
        async with mcp_http(d.url) as first, trio.open_nursery() as nursery:
            cancel = trio.CancelScope()

            async def go() -> None:
                with cancel:
                    await first.call("count", args, meta=meta)

            nursery.start_soon(go)
            with trio.fail_after(10):
                while not path.exists():
                    await trio.sleep(0.01)
            cancel.cancel()  # the first connection breaks while the call runs
        async with mcp_http(d.url) as retry:
            again = await retry.call("count", args, meta=meta)
        assert again["result"]["content"][0]["text"] == "1"
        assert path.read_text().splitlines() == ["started"]


# ------------------------------------------------------------------------------ argument errors


@pytest.mark.parametrize(
    ("version", "as_result"),
    [
        ("2024-11-05", False),
        ("2025-03-26", False),
        ("2025-06-18", False),
        ("2025-11-25", True),
        (MODERN, True),
    ],
)
async def test_argument_errors_follow_the_negotiated_version_over_http(
    tmp_path, version, as_result
):
    async with (
        running_daemon(_settings(tmp_path), registry_with(SLEEP)) as d,
        mcp_http(d.url) as mcp,
    ):
        if version != MODERN:
            await mcp.initialize(version)
        reply = await mcp.call("sleep", {"seconds": "soon"})
        if as_result:
            result = reply["result"]
            assert result["isError"] is True
            assert "arguments.seconds" in result["content"][0]["text"]
            assert result["structuredContent"]["error"]["data"]["field"] == "arguments.seconds"
        else:
            assert reply["error"]["code"] == -32602
        # an unknown tool is a protocol error in every version
        unknown = await mcp.call("no-such-tool")
        assert unknown["error"]["code"] == -32602


@pytest.mark.parametrize(
    ("version", "as_result"),
    [(None, False), ("2024-11-05", False), ("2025-06-18", False), ("2025-11-25", True)],
)
async def test_argument_errors_follow_the_negotiated_version_over_websocket(
    tmp_path, version, as_result
):
    async with running_daemon(_settings(tmp_path), registry_with(SLEEP)) as d, ws(d) as conn:
        rpc = Rpc(conn)
        if version is not None:
            init = await rpc.request("initialize", {"protocolVersion": version, "capabilities": {}})
            assert init["result"]["protocolVersion"] == version
        reply = await rpc.call("sleep", {"seconds": "soon"})
        if as_result:
            assert reply["result"]["isError"] is True
        else:
            assert reply["error"]["code"] == -32602


# ------------------------------------------------------------------------------ WebSocket beside


async def test_a_websocket_upgrade_with_a_foreign_origin_is_refused(tmp_path):
    from trio_websocket import ConnectionRejected, open_websocket_url

    async with running_daemon(_settings(tmp_path)) as d:
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(d.url, extra_headers=[("Origin", "http://evil.example")]):
                pass
        assert info.value.status_code == 403
        async with ws(d) as conn:  # no Origin: not a browser
            assert (await Rpc(conn).request("ping"))["result"] == {}


async def test_the_websocket_and_http_doors_share_one_port(tmp_path):
    async with running_daemon(_settings(tmp_path)) as d, ws(d) as conn, mcp_http(d.url) as mcp:
        assert (await Rpc(conn).request("ping"))["result"] == {}
        assert (await mcp.request("ping"))["result"]["resultType"] == "complete"


def test_settings_refuse_a_short_signing_key_and_a_bad_origin():
    from exai.config import Settings
    from exai.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 32"):
        Settings.from_env({"EXAI_SESSION_SIGNING_KEY": "short"}, env_file="", config_file="")
    with pytest.raises(ConfigError, match="EXAI_ALLOWED_ORIGINS"):
        Settings.from_env({"EXAI_ALLOWED_ORIGINS": "evil.example"}, env_file="", config_file="")
    ok = Settings.from_env(
        {"EXAI_ALLOWED_ORIGINS": "https://app.example,http://[::1]:*"}, env_file="", config_file=""
    )
    assert ok.allowed_origins == ("https://app.example", "http://[::1]:*")


@pytest.mark.parametrize("accept", [ACCEPT_BOTH, "application/json"])
async def test_a_call_the_daemon_stops_while_draining_is_answered_503_to_send_it_again(
    tmp_path, accept
):
    probe = Probe()
    settings = _settings(tmp_path, max_inflight=1, slot_wait_s=30.0, drain_timeout_s=0.5)
    async with running_daemon(settings, registry_with(probe.spec)) as d, mcp_http(d.url) as mcp:
        replies: dict[str, httpx.Response] = {}
        async with trio.open_nursery() as nursery:

            async def post(name: str, key: str) -> None:
                msg = mcp.message(
                    "tools/call",
                    {
                        "name": "probe",
                        "arguments": {},
                        "_meta": {**envelope(), "exai/idempotencyKey": key},
                    },
                )
                replies[name] = await mcp.post(msg, Accept=accept)

            nursery.start_soon(post, "running", "k-running")
            with trio.fail_after(10):
                await probe.started_event.wait()
            nursery.start_soon(post, "waiting", "k-waiting")  # waits for the one slot
            with trio.fail_after(10):
                while len(d.calls.running) < 2:
                    await trio.sleep(0.01)
            d.request_shutdown()  # the drain bound passes: both calls are stopped unanswered
        for name in ("running", "waiting"):
            assert replies[name].status_code == 503, (name, replies[name].text)
            assert replies[name].headers["retry-after"] == "1"


# ------------------------------------------------------------------------------ writing


class CountingStream(trio.abc.HalfCloseableStream):
    """The daemon's side of a connection, in memory: every write is recorded, and one can be
    held (a client that stops reading for a while)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.hold: trio.Event | None = None
        self.holding = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        hold, self.hold = self.hold, None
        if hold is not None:
            self.holding.set()
            await hold.wait()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class TwoSteps:
    """A tool that reports progress, waits to be let go, reports progress again and answers."""

    def __init__(self) -> None:
        self.go = trio.Event()
        self.spec = ToolSpec(
            name="two_steps", description="two", input_schema=OBJ, handler=self.run
        )

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        await ctx.progress(progress=1, total=2, message="one")
        await self.go.wait()
        await ctx.progress(progress=2, total=2, message="two")
        return ToolResult(text="both")


async def _read_response(client: trio.abc.Stream) -> bytes:
    """Everything the daemon writes for one chunked response (up to its last chunk)."""
    data = b""
    with trio.fail_after(10):
        while not data.endswith(b"0\r\n\r\n"):
            data += await client.receive_some(65536)
    return data


async def test_progress_queued_behind_a_slow_write_goes_out_with_the_answer_in_one_write(
    tmp_path,
):
    """While the SSE stream's first write waits for a client that is not reading, the next
    progress and the answer queue; they are then written together with the stream's end, in
    order, in one write (not one write per event)."""
    from exai.server.http11 import read_head
    from exai.server.outbox import ProgressStream

    tool = TwoSteps()
    async with (
        running_daemon(_settings(tmp_path), registry_with(tool.spec)) as d,
        mcp_http(d.url) as mcp,
    ):
        await mcp.initialize()
        assert mcp.session_id is not None
        session = d.http_door.signer().verify(mcp.session_id)
        assert not isinstance(session, str)
        client, server = trio.testing.memory_stream_pair()
        counting = CountingStream(server)
        stream = ProgressStream(counting)
        msg = mcp.message(
            "tools/call",
            {"name": "two_steps", "arguments": {}, "_meta": {"progressToken": "p"}},
            id="r",
        )
        body = json.dumps(msg).encode()
        headers = [*mcp.headers().items()]
        await client.send_all(request_bytes(d.url, body, headers=headers))
        head = await read_head(stream, keep_raw=False)
        assert head is not None
        release = trio.Event()
        counting.hold = release  # the first write (the stream's head, the first progress)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.http_door.serve, stream, head.conn, head.request, "127.0.0.1")
            with trio.fail_after(10):
                await counting.holding.wait()
            tool.go.set()
            core = d.http_door.running[(session.nonce, '"r"')]
            with trio.fail_after(10):
                while len(core.outbox) < 3:  # the first progress, the second, the answer
                    await trio.sleep(0.01)
            release.set()
            response = await _read_response(client)
            await client.aclose()
        assert len(counting.writes) == 2, counting.writes
        first, second = counting.writes
        assert first.startswith(b"HTTP/1.1 200 ") and b'"one"' in first
        assert second.index(b'"two"') < second.index(b'"both"')
        assert second.endswith(b"0\r\n\r\n")
        messages = sse_messages(response.split(b"\r\n\r\n", 1)[1].decode())
        assert [m.get("params", {}).get("message") for m in messages[:2]] == ["one", "two"]
        assert messages[2]["id"] == "r"


async def _serve_fake_connection(
    d: Any, nursery: trio.Nursery, request: bytes
) -> tuple[trio.abc.Stream, CountingStream]:
    """Serve one in-memory connection with the daemon's HTTP door, ``request`` sent on it."""
    from exai.server.http11 import read_head
    from exai.server.outbox import ProgressStream

    client, server = trio.testing.memory_stream_pair()
    counting = CountingStream(server)
    stream = ProgressStream(counting)
    await client.send_all(request)
    head = await read_head(stream, keep_raw=False)
    assert head is not None

    async def serve() -> None:
        try:
            await d.http_door.serve(stream, head.conn, head.request, "127.0.0.1")
        finally:
            await stream.aclose()  # (as the listener does)

    nursery.start_soon(serve)
    return client, counting


async def _read_json_response(client: trio.abc.Stream) -> tuple[bytes, dict[str, Any]]:
    """One response with a Content-Length: its head and its JSON body."""
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            data += await client.receive_some(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += await client.receive_some(65536)
    return head, json.loads(body)


def _json_call(d: Any, name: str, id: int, **extra_meta: Any) -> bytes:
    msg = {
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}, "_meta": {**envelope(), **extra_meta}},
    }
    headers = [("Content-Type", "application/json"), ("Accept", "application/json")]
    return request_bytes(d.url, json.dumps(msg).encode(), headers=headers)


async def test_a_json_answer_is_written_by_its_call_in_one_write(tmp_path):
    """The answer of a call whose client takes JSON only is written, head and body in one
    write, by the call's own task (no hand-off to the connection's task); its progress is
    not sent (nor queued)."""
    names: list[str] = []

    class Named(CountingStream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            names.append(trio.lowlevel.current_task().name)
            await super().send_all(data)

    tool = TwoSteps()
    tool.go.set()
    async with running_daemon(_settings(tmp_path), registry_with(tool.spec)) as d:
        async with trio.open_nursery() as nursery:
            client, counting = await _serve_fake_connection(
                d, nursery, _json_call(d, "two_steps", 1, progressToken="p")
            )
            counting.__class__ = Named
            head, answer = await _read_json_response(client)
            await client.aclose()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert answer["id"] == 1 and answer["result"]["content"][0]["text"] == "both"
        assert len(counting.writes) == 1
        assert names == [names[0]] and "_respond_call" in names[0], names
        assert d.stats.progress_dropped == 0


async def test_after_a_json_answer_the_next_request_on_the_connection_is_served(tmp_path):
    """A request pipelined behind a call (sent before its answer) and one sent after it are
    both served on the same connection, in order."""
    tool = TwoSteps()
    async with running_daemon(_settings(tmp_path), registry_with(tool.spec)) as d:
        async with trio.open_nursery() as nursery:
            client, _ = await _serve_fake_connection(d, nursery, _json_call(d, "two_steps", 1))
            await client.send_all(_json_call(d, "two_steps", 2))  # sent ahead
            await trio.testing.wait_all_tasks_blocked()
            tool.go.set()
            first = await _read_json_response(client)
            second = await _read_json_response(client)
            await client.send_all(_json_call(d, "two_steps", 3))
            third = await _read_json_response(client)
            await client.aclose()
        assert [r[1]["id"] for r in (first, second, third)] == [1, 2, 3]


async def test_an_idle_connection_after_a_json_answer_is_closed_after_the_keep_alive_bound(
    tmp_path,
):
    tool = TwoSteps()
    tool.go.set()
    settings = _settings(tmp_path, http_keepalive_s=0.5)
    async with (
        running_daemon(settings, registry_with(tool.spec)) as d,
        trio.open_nursery() as nursery,
    ):
        client, _ = await _serve_fake_connection(d, nursery, _json_call(d, "two_steps", 1))
        await _read_json_response(client)
        with trio.fail_after(10):
            assert await client.receive_some(65536) == b""  # closed by the daemon
        await client.aclose()


async def test_a_draining_daemon_closes_a_connection_idle_after_its_json_answer_at_once(
    tmp_path,
):
    """The request is over once its answer is written: draining does not wait for the
    keep-alive bound of the connection that carried it."""
    tool = TwoSteps()
    tool.go.set()
    settings = _settings(tmp_path, http_keepalive_s=600)
    async with (
        running_daemon(settings, registry_with(tool.spec)) as d,
        trio.open_nursery() as nursery,
    ):
        client, _ = await _serve_fake_connection(d, nursery, _json_call(d, "two_steps", 1))
        await _read_json_response(client)
        d.request_shutdown()
        with trio.fail_after(10):
            assert await client.receive_some(65536) == b""
        await client.aclose()


@pytest.mark.parametrize("asks", ["connection_close", "http_1_0"])
async def test_a_client_that_asks_to_close_gets_connection_close_and_nothing_more(tmp_path, asks):
    """The door writes its answers without h11, which would have said ``Connection: close``
    to such a client and then closed: so does the door, and a request sent behind the first
    is not read."""
    tool = TwoSteps()
    tool.go.set()
    async with running_daemon(_settings(tmp_path), registry_with(tool.spec)) as d:
        first = _json_call(d, "two_steps", 1)
        if asks == "http_1_0":
            first = first.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        else:
            first = first.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        async with trio.open_nursery() as nursery:
            client, _ = await _serve_fake_connection(
                d, nursery, first + _json_call(d, "two_steps", 2)
            )
            head, answer = await _read_json_response(client)
            with trio.fail_after(10):
                rest = b""
                while chunk := await client.receive_some(65536):
                    rest += chunk
            await client.aclose()
        assert answer["id"] == 1
        assert b"\r\nConnection: close" in head
        assert rest == b""


async def test_a_token_table_replaced_while_a_connection_is_kept_applies_to_its_next_request(
    tmp_path,
):
    """A connection's accepted token is remembered only while the token table in force is
    the same: a reload that drops the token refuses the connection's next request (401)."""
    from exai.server.auth import TokenTable, parse_tokens

    token = "c" * 40
    async with running_daemon(_settings(tmp_path, tokens=Secret(token))) as d:
        msg = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": envelope()}}
        headers = [*JSON_HEADERS, ("Authorization", f"Bearer {token}")]
        ping = request_bytes(d.url, json.dumps(msg).encode(), headers=headers)
        async with trio.open_nursery() as nursery:
            client, _ = await _serve_fake_connection(d, nursery, ping)
            first = await _read_json_response(client)
            await client.send_all(ping)
            second = await _read_json_response(client)
            d.listener.tokens = TokenTable(parse_tokens(Secret("d" * 40)))
            await client.send_all(ping)
            third_head = b""
            with trio.fail_after(10):
                while chunk := await client.receive_some(65536):
                    third_head += chunk
            await client.aclose()
        assert first[0].startswith(b"HTTP/1.1 200 ") and second[0].startswith(b"HTTP/1.1 200 ")
        assert third_head.startswith(b"HTTP/1.1 401 ")


@pytest.mark.allow_stalls  # (gc.collect() in the test's own task blocks the loop on purpose)
async def test_a_request_leaves_nothing_for_the_garbage_collector(tmp_path):
    """A request's core (its outbox, ledger, parking lots) is freed when the request ends, not
    left in a reference cycle for the garbage collector to find (issue 18: 22 objects per
    request were)."""
    from exai.server.core import SessionCore

    tool = TwoSteps()
    tool.go.set()
    async with (
        running_daemon(_settings(tmp_path), registry_with(tool.spec)) as d,
        trio.open_nursery() as nursery,
    ):
        client, _ = await _serve_fake_connection(d, nursery, _json_call(d, "two_steps", 1))
        await _read_json_response(client)
        gc.collect()
        gc.disable()
        try:
            for i in (2, 3):  # a JSON answer, then an SSE one
                request = _json_call(d, "two_steps", i, progressToken=i)
                if i == 3:
                    request = request.replace(
                        b"Accept: application/json", b"Accept: " + ACCEPT_BOTH.encode()
                    )
                await client.send_all(request)
                if i == 3:
                    await _read_response(client)
                else:
                    await _read_json_response(client)
            await trio.testing.wait_all_tasks_blocked()
            left = [o for o in gc.get_objects() if isinstance(o, SessionCore)]
        finally:
            gc.enable()
        await client.aclose()
    assert left == []


async def _h11_exchange(
    client: trio.abc.Stream, conn: Any, raw: bytes, *, send: bool = True
) -> tuple[Any, bytes]:
    """Send ``raw`` (one request) and read its response with an h11 client state ``conn``:
    the response and its body, as h11 reads them (its framing rules, one per request)."""
    import h11

    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    while True:
        event = server.next_event()
        conn.send(event)  # (h11's client state follows the request the test sends)
        if isinstance(event, h11.EndOfMessage):
            break
    if send:
        await client.send_all(raw)
    response = None
    body = b""
    with trio.fail_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await client.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(event)
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
    return response, body


async def test_plain_requests_on_a_kept_connection_are_read_without_h11(tmp_path, monkeypatch):
    """A kept connection's next request, when it is a plain one all there
    (``http11.parse_plain_request``), is not read by h11 (≈ 20 µs a request, issue 18), nor is
    an SSE stream answering it written by h11; a refusal is still h11's; and every response is
    what an h11 client reads as the answer to its request."""
    import sys

    import h11

    reads: list[int] = []
    next_event = h11.Connection.next_event

    def counting(self: h11.Connection) -> Any:
        if sys._getframe(1).f_code.co_filename.endswith(("httpdoor.py", "http11.py")):
            reads.append(1)
        return next_event(self)

    monkeypatch.setattr(h11.Connection, "next_event", counting)
    tool = TwoSteps()
    tool.go.set()
    async with running_daemon(_settings(tmp_path), registry_with(tool.spec)) as d:
        sse = json.loads(_json_call(d, "two_steps", 4, progressToken="p").split(b"\r\n\r\n")[1])
        requests = [
            _json_call(d, "two_steps", 1),
            _json_call(d, "two_steps", 2),
            _json_call(d, "two_steps", 3),
            request_bytes(d.url, json.dumps(sse).encode(), headers=JSON_HEADERS),
            _json_call(d, "two_steps", 5).replace(b"POST /mcp ", b"POST /elsewhere ", 1),
        ]
        client_state = h11.Connection(h11.CLIENT)
        async with trio.open_nursery() as nursery:
            client, _ = await _serve_fake_connection(d, nursery, requests[0])
            answers = [await _h11_exchange(client, client_state, requests[0], send=False)]
            read_by_h11 = len(reads)  # (the first request: the listener's, h11's)
            for raw in requests[1:4]:
                answers.append(await _h11_exchange(client, client_state, raw))
            assert len(reads) == read_by_h11  # (the SSE stream's too: written without h11)
            answers.append(await _h11_exchange(client, client_state, requests[4]))
            with trio.fail_after(10):
                assert await client.receive_some(65536) == b""  # closed after the refusal
            await client.aclose()
    statuses = [r.status_code for r, _ in answers]
    assert statuses == [200, 200, 200, 200, 404]
    assert [json.loads(body)["id"] for _, body in answers[:3]] == [1, 2, 3]
    assert (b"content-type", b"text/event-stream") in list(answers[3][0].headers)
    messages = sse_messages(answers[3][1].decode())
    assert [m.get("params", {}).get("message") for m in messages[:2]] == ["one", "two"]
    assert messages[2]["id"] == 4
    assert (b"connection", b"close") in list(answers[4][0].headers)
    assert json.loads(answers[4][1])["error"] == "not_found"


async def test_a_delete_on_a_kept_connection_says_connection_close_and_closes(tmp_path):
    """The door closes a connection after a ``DELETE`` (whose body it does not read), so its
    204 says ``Connection: close`` — a plain one read whole included."""
    async with running_daemon(_settings(tmp_path)) as d, mcp_http(d.url) as mcp:
        await mcp.initialize()
        headers = [(k, v) for k, v in mcp.headers().items() if k.lower() != "content-type"]
        ping = request_bytes(
            d.url,
            json.dumps(mcp.message("ping")).encode(),
            headers=[*headers, ("Content-Type", "application/json")],
        )
        delete = request_bytes(d.url, method="DELETE", headers=headers, content_length=0)
        async with trio.open_nursery() as nursery:
            client, _ = await _serve_fake_connection(d, nursery, ping)
            first = await _read_json_response(client)
            await client.send_all(delete)
            rest = b""
            with trio.fail_after(10):
                while chunk := await client.receive_some(65536):
                    rest += chunk
            await client.aclose()
    assert first[0].startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 204 ") and b"\r\nConnection: close\r\n" in rest


async def test_the_kept_signing_key_is_read_and_made_off_the_event_loop(tmp_path, monkeypatch):
    """``stored_key`` (mkdir, write, fsync, link at first start) ran from ``compose()``, on the
    trio loop; the other start-time file work (TLS files, the registry) goes to a thread."""
    import exai.server.app as app_module
    import exai.server.services as services_module

    on_loop: list[bool] = []

    def recording(state_dir):
        try:
            trio.lowlevel.current_task()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return stored_key(state_dir)

    monkeypatch.setattr(services_module, "stored_key", recording, raising=False)
    monkeypatch.setattr(app_module, "stored_key", recording, raising=False)
    async with running_daemon(make_settings(tmp_path)) as d:
        assert d.status()["doors"]["session_signing_key"] == "state directory"
    assert on_loop == [False]
