"""Attacks on the Streamable HTTP door of a real ``exai serve`` found to break it (each test
failed on the code before its fix): a body trickled a byte at a time, a keep-alive client
reusing the connection a ``DELETE`` was answered on, a ``DELETE`` racing its session's call.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.adversarial.harness import SERVED_WITHIN_S, live_daemon
from tests.daemon_tools import COUNT
from tests.httpmcp import ACCEPT_BOTH, McpHttp, http_url, request_bytes

pytestmark = pytest.mark.anyio

JSON_HEADERS = [("Content-Type", "application/json"), ("Accept", ACCEPT_BOTH)]


async def test_a_body_trickled_a_byte_at_a_time_is_given_up_on(tmp_path: Path) -> None:
    """Each byte arrives well inside EXAI_HANDSHAKE_TIMEOUT_S of the last: the bound is on the
    body's progress (64 KiB per interval), not renewed by every byte — else one client holds a
    connection (and its bytes) for as long as it likes."""
    async with live_daemon(tmp_path, EXAI_HANDSHAKE_TIMEOUT_S="1") as daemon:
        parts = urlsplit(http_url(daemon.url))
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 0)
        answer = b""
        async with stream:
            head = request_bytes(daemon.url, headers=JSON_HEADERS, content_length=100_000)
            await stream.send_all(head + b"{")
            closed = trio.Event()

            async def trickle() -> None:
                while not closed.is_set():
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(b" ")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            with trio.fail_after(SERVED_WITHIN_S):  # (hang guard: the old code never closed)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    try:
                        while data := await stream.receive_some(65536):
                            answer += data
                    except trio.BrokenResourceError:
                        pass
                    closed.set()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"body_timeout" in answer
        await daemon.assert_serves()
        assert (await daemon.status())["daemon"]["rejections"].get("body_timeout") == 1


async def test_a_delete_says_connection_close_and_the_client_goes_on_on_a_new_one(
    tmp_path: Path,
) -> None:
    """The door closes the connection after a DELETE (its body is not read): the 204 says so,
    so a keep-alive client sends its next request on a new connection instead of the closed
    one (where it got a reset, indistinguishable from a crash mid-request)."""
    async with live_daemon(tmp_path) as daemon:
        async with httpx.AsyncClient(timeout=SERVED_WITHIN_S) as client:
            mcp = McpHttp(client, daemon.url)
            for _ in range(3):
                await mcp.initialize()
                ended = await client.delete(mcp.url, headers=mcp.headers())
                assert ended.status_code == 204
                assert ended.headers.get("connection") == "close", ended.headers
                mcp.session_id = mcp.version = None
        await daemon.assert_serves()


async def test_a_delete_cancels_the_sessions_call_running_on_the_daemon(tmp_path: Path) -> None:
    """A session ended by DELETE while its call runs: the call is cancelled (its client will
    never read it), down to the tool — not run to its end for nobody."""
    path = tmp_path / "runs"
    async with live_daemon(tmp_path) as daemon:
        async with (
            httpx.AsyncClient(timeout=SERVED_WITHIN_S) as client,
            httpx.AsyncClient(timeout=SERVED_WITHIN_S) as other,
        ):
            mcp = McpHttp(client, daemon.url)
            await mcp.initialize()
            replies: list[httpx.Response] = []

            async def call() -> None:
                msg = mcp.message(
                    "tools/call",
                    {"name": COUNT.name, "arguments": {"path": str(path), "seconds": 600}},
                )
                replies.append(await client.post(mcp.url, json=msg, headers=mcp.headers()))

            with trio.fail_after(SERVED_WITHIN_S):  # (hang guard: the old code ran 600 s)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    while not await trio.Path(path).exists():  # the tool started
                        await trio.sleep(0.02)
                    ended = await other.delete(mcp.url, headers=mcp.headers())
                    assert ended.status_code == 204
            cancelled = trio.Path(str(path) + ".cancelled")
            with trio.fail_after(SERVED_WITHIN_S):
                while not await cancelled.exists():
                    await trio.sleep(0.02)
        assert len(replies) == 1 and replies[0].status_code == 200
        assert "result" not in replies[0].text, replies[0].text  # ended without an answer
        log = await daemon.wait_log_events("http.session_ended")
        assert [rec.get("calls_cancelled") for rec in log] == [1], log
        assert path.read_text().splitlines() == ["started"]  # it ran once, and no more
        await daemon.assert_serves()


async def test_a_request_reusing_a_running_calls_id_leaves_that_call_cancellable(
    tmp_path: Path,
) -> None:
    """In one session, a second request with the id of a call still running (another
    question: refused -32600) must not take the running call's place: a later
    notifications/cancelled of that id still cancels it (it was lost, and the call ran on)."""
    path = tmp_path / "runs"
    async with live_daemon(tmp_path) as daemon:
        async with (
            httpx.AsyncClient(timeout=SERVED_WITHIN_S) as client,
            httpx.AsyncClient(timeout=SERVED_WITHIN_S) as other,
        ):
            mcp = McpHttp(client, daemon.url)
            await mcp.initialize()
            replies: list[httpx.Response] = []

            async def call() -> None:
                msg = mcp.message(
                    "tools/call",
                    {"name": COUNT.name, "arguments": {"path": str(path), "seconds": 600}},
                    id=7,
                )
                replies.append(await client.post(mcp.url, json=msg, headers=mcp.headers()))

            with trio.fail_after(SERVED_WITHIN_S):  # (hang guard: the old code ran 600 s)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    while not await trio.Path(path).exists():  # the tool started
                        await trio.sleep(0.02)
                    again = mcp.message("tools/call", {"name": "version", "arguments": {}}, id=7)
                    refused = await other.post(mcp.url, json=again, headers=mcp.headers())
                    assert refused.json()["error"]["code"] == -32600, refused.text
                    cancel = {
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": 7},
                    }
                    accepted = await other.post(mcp.url, json=cancel, headers=mcp.headers())
                    assert accepted.status_code == 202
                cancelled = trio.Path(str(path) + ".cancelled")
                while not await cancelled.exists():
                    await trio.sleep(0.02)
        assert len(replies) == 1 and "result" not in replies[0].text, replies[0].text
        await daemon.assert_serves()


async def test_bodies_given_up_on_give_their_bytes_back_to_the_daemons_budget(
    tmp_path: Path,
) -> None:
    """Bodies that stop arriving (408), grow past the cap while chunked (413) or past the budget
    (503): the bytes each had been charged go back to EXAI_MAX_PENDING_BYTES. They were kept,
    so a dozen such requests left the budget full for good and every later body over 64 KiB
    got 503."""
    mib = 1024 * 1024
    async with live_daemon(
        tmp_path,
        EXAI_HANDSHAKE_TIMEOUT_S="1",
        EXAI_MAX_PENDING_BYTES=str(16 * mib),
        EXAI_MAX_FRAME_BYTES=str(2 * mib),
    ) as daemon:
        idle = await daemon.metric("exai_pending_bytes")
        parts = urlsplit(http_url(daemon.url))

        async def abandoned(chunked: bool) -> None:
            stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 0)
            async with stream:
                if chunked:  # 1.5 MiB, then past the 2 MiB cap
                    head = request_bytes(
                        daemon.url, headers=[*JSON_HEADERS, ("Transfer-Encoding", "chunked")]
                    )
                    piece = b"%x\r\n" % (mib // 2) + b" " * (mib // 2) + b"\r\n"
                    data = head + piece * 3 + piece * 2
                else:  # 1.5 MiB of the 1.9 MiB announced, then nothing
                    head = request_bytes(daemon.url, headers=JSON_HEADERS, content_length=1_900_000)
                    data = head + b"{" + b" " * (3 * mib // 2)
                try:
                    await stream.send_all(data)
                    while await stream.receive_some(65536):  # the refusal, then the close
                        pass
                except trio.BrokenResourceError:
                    pass

        with trio.fail_after(SERVED_WITHIN_S):
            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(abandoned, i % 2 == 1)
            while await daemon.metric("exai_pending_bytes") > idle + mib:  # (old code: 16 MiB)
                await trio.sleep(0.05)
        async with httpx.AsyncClient(timeout=SERVED_WITHIN_S) as client:
            mcp = McpHttp(client, daemon.url)
            # a 600 KiB body is read and reaches the tool's argument check (not 503 overloaded)
            reply = await mcp.call("sleep", {"seconds": 0, "pad": "x" * (600 * 1024)})
            error = reply["result"]["structuredContent"]["error"]
            assert error["data"]["field"] == "arguments.pad", str(reply)[:300]
        rejections = (await daemon.status())["daemon"]["rejections"]
        # each given up on: late (408), too large (413), or over the budget meanwhile (503)
        kinds = ("body_timeout", "payload_too_large", "overloaded")
        assert sum(rejections.get(k, 0) for k in kinds) == 16, rejections
