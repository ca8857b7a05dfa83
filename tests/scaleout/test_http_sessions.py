"""Initialize-era Streamable HTTP sessions across daemons (issue 15 must-show 3, issue 16
"Sessions").

An ``Mcp-Session-Id`` is signed with the deployment's ``EXAI_SESSION_SIGNING_KEY``
(exai/server/mcp_sessions.py), so a session minted by one daemon is accepted by any other that
shares Redis, PostgreSQL and the key — with no session storage — and survives the daemon that
minted it being killed while a balancer moves its client elsewhere. A session ended with
``DELETE`` on one daemon is unknown on the others (the end is written to Redis).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from exai.testing import MockUpstream
from tests.httpmcp import McpHttp
from tests.scaleout.clients import open_sdk_http
from tests.scaleout.conftest import ClusterFactory

pytestmark = pytest.mark.anyio

WITHIN_S = 120.0


async def test_a_session_minted_by_one_daemon_is_accepted_by_another(
    cluster_factory: ClusterFactory, mock: MockUpstream, tmp_path: Path
) -> None:
    async with cluster_factory(running=2) as cluster, httpx.AsyncClient(timeout=30) as http:
        one, two = cluster.daemons[0], cluster.daemons[1]
        with trio.fail_after(WITHIN_S):
            minted = McpHttp(http, one.http_url)
            await minted.initialize("2025-06-18")
            elsewhere = McpHttp(http, two.http_url)
            elsewhere.session_id, elsewhere.version = minted.session_id, minted.version
            # the other daemon serves the session: tools, a call, a conversation in Postgres
            listed = await elsewhere.request("tools/list")
            assert "chat" in {t["name"] for t in listed["result"]["tools"]}
            chat = await elsewhere.call("chat", {"prompt": "minted on one", "model": "mock-fast"})
            assert chat["result"]["isError"] is False
            # the version the session negotiated holds on every daemon (2025-06-18: -32602)
            bad = await elsewhere.call("chat", {"prompt": 42})
            assert bad["error"]["code"] == -32602
            # ended on the second daemon: unknown on the first too (through Redis)
            ended = await http.delete(elsewhere.url, headers=elsewhere.headers())
            assert ended.status_code == 204
            after = await minted.post(minted.message("tools/list"))
            assert after.status_code == 404


async def test_a_daemon_with_another_signing_key_does_not_know_the_session(
    cluster_factory: ClusterFactory, mock: MockUpstream, tmp_path: Path
) -> None:
    async with cluster_factory(running=1) as cluster, httpx.AsyncClient(timeout=30) as http:
        minted = McpHttp(http, cluster.daemons[0].http_url)
        await minted.initialize()
        stranger = cluster.daemons[1]
        stranger.env["EXAI_SESSION_SIGNING_KEY"] = "another deployment's key, 32+ chars long"
        await stranger.start()
        other = McpHttp(http, stranger.http_url)
        other.session_id, other.version = minted.session_id, minted.version
        refused = await other.post(other.message("tools/list"))
        assert refused.status_code == 404
        assert refused.json()["error"] == "unknown_session"


async def test_a_session_survives_the_daemons_serving_it_being_killed_behind_haproxy(
    cluster_factory: ClusterFactory, mock: MockUpstream, tmp_path: Path
) -> None:
    async with (
        cluster_factory() as cluster,
        open_sdk_http(cluster.http_url, "survivor", mode="legacy") as client,
    ):
        session = client.client.session
        with trio.fail_after(WITHIN_S):
            first = await client.client.call_tool("version", {})
            assert first.is_error is False
            session_id = client.transport_session_id()
            assert session_id and session_id.startswith("v1.")
            for victim in cluster.daemons[:2]:
                victim.kill()
                assert await victim.wait() == -9
                # the next requests go to the daemons left, with the same session id
                result = await client.client.call_tool(
                    "chat", {"prompt": f"after {victim.name}", "model": "mock-fast"}
                )
                assert result.is_error is False
                assert client.transport_session_id() == session_id
        assert session is client.client.session  # one session from the client's point of view
        # the daemon left answered at least the call made after both kills
        assert await cluster.daemons[2].metric("exai_calls_total", outcome="ok") >= 1


async def test_a_client_closing_its_request_through_haproxy_cancels_the_call_upstream(
    cluster_factory: ClusterFactory, mock: MockUpstream, tmp_path: Path
) -> None:
    # (no heartbeat within the test's bound: nothing is written to the closed request, so only
    # HAProxy's `option abortonclose` tells the daemon its client went away)
    async with cluster_factory(running=2, EXAI_HEARTBEAT_INTERVAL_S=600) as cluster:
        mock.latency_s = 120.0
        with trio.fail_after(WITHIN_S):
            async with httpx.AsyncClient(timeout=60) as http:
                client = McpHttp(http, cluster.http_url)
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:

                        async def slow() -> None:
                            await client.call(
                                "chat", {"prompt": "never mind", "model": "mock-fast"}
                            )

                        nursery.start_soon(slow)
                        while not mock.chat_requests:
                            await trio.sleep(0.02)
                        scope.cancel()  # the client goes: its connection to HAProxy closes
        # (bounded below HAProxy's `timeout server` of 60 s, which would end it anyway)
        with trio.fail_after(45):
            await mock.wait_disconnect(1)
        cancelled = sum(
            [await d.metric("exai_calls_total", outcome="cancelled") for d in cluster.daemons[:2]]
        )
        assert cancelled == 1
