"""``wss://``: with EXAI_TLS_CERT/EXAI_TLS_KEY the daemon serves TLS; the client, the bridge and a
plain WebSocket client connect when they trust the certificate's CA (EXAI_TLS_CA), and are
refused when they trust another one.

Certificates come from ``trustme``: a throw-away CA and a server certificate for 127.0.0.1 and
localhost, written to the test's temporary directory.
"""

from __future__ import annotations

import json
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import attrs
import pytest
import trio
import trustme
from anyio import open_process  # imported early: a lazy import inside a test trips CPython 3.11.7
from anyio.streams.text import TextReceiveStream

from exai.client import Client
from exai.client.ws import WebSocketError
from exai.config import Secret, Settings
from exai.errors import ConfigError
from exai.server.auth import TokenTable, check_bind, parse_tokens
from tests.helpers import (
    REPO,
    Rpc,
    make_settings,
    raw_upgrade,
    running_daemon,
    subprocess_env,
    ws,
)

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "tls-test", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}


@attrs.frozen
class Pki:
    ca_file: Path  # the CA that signed the server certificate
    other_ca_file: Path  # a CA that signed nothing the daemon presents
    cert_file: Path
    key_file: Path


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path / "pki"
    d.mkdir()
    paths = Pki(d / "ca.pem", d / "other-ca.pem", d / "server.pem", d / "server.key")
    ca.cert_pem.write_to_path(str(paths.ca_file))
    other.cert_pem.write_to_path(str(paths.other_ca_file))
    server.private_key_pem.write_to_path(str(paths.key_file))
    paths.key_file.chmod(0o600)
    with paths.cert_file.open("wb") as fh:
        for blob in server.cert_chain_pems:
            fh.write(blob.bytes())
    yield paths


def tls_settings(tmp_path: Path, pki: Pki) -> Settings:
    return make_settings(tmp_path, tls_cert=str(pki.cert_file), tls_key=str(pki.key_file))


def trusting(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and the members of any group, flattened."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return seen


def is_cert_failure(exc: BaseException) -> bool:
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in chain(exc))


# ---------------------------------------------------------------------------------------
# a plain WebSocket client (trio-websocket)


@pytest.mark.anyio
async def test_the_daemon_serves_wss_when_given_a_certificate(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        assert daemon.url.startswith("wss://127.0.0.1:")


@pytest.mark.anyio
async def test_a_client_trusting_the_ca_connects_over_wss(tmp_path, pki):
    async with (
        running_daemon(tls_settings(tmp_path, pki)) as daemon,
        ws(daemon, ssl_context=trusting(pki.ca_file)) as conn,
    ):
        res = await Rpc(conn).call("version")
    assert res["result"]["isError"] is False


@pytest.mark.anyio
async def test_a_tls_handshake_trusting_another_ca_is_refused(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        port = int(daemon.url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_ssl_over_tcp_stream(
            "127.0.0.1", port, ssl_context=trusting(pki.other_ca_file)
        )
        with pytest.raises(trio.BrokenResourceError) as caught, trio.fail_after(5):
            await stream.do_handshake()
        await trio.aclose_forcefully(stream)
        assert not daemon.sessions
    assert is_cert_failure(caught.value), repr(caught.value)


@pytest.mark.anyio
async def test_a_plain_text_client_gets_no_websocket_from_a_tls_listener(tmp_path, pki):
    settings = attrs.evolve(tls_settings(tmp_path, pki), handshake_timeout_s=0.5)
    async with running_daemon(settings) as daemon:
        port = int(daemon.url.rsplit(":", 1)[1].split("/")[0])
        with trio.fail_after(5):
            stream, status, _headers, _rest = await raw_upgrade("127.0.0.1", port)
        await stream.aclose()
        assert status != 101 and not daemon.sessions


# ---------------------------------------------------------------------------------------
# exai.Client


@pytest.mark.anyio
async def test_exai_client_with_exai_tls_ca_connects_over_wss(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        settings = make_settings(tmp_path, tls_ca=str(pki.ca_file))
        async with Client(url=daemon.url, settings=settings) as client:
            result = await client.call_tool("version", {})
    assert json.loads(result["content"][0]["text"])["exai"]


@pytest.mark.anyio
async def test_exai_client_trusting_another_ca_is_refused(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        settings = make_settings(tmp_path, tls_ca=str(pki.other_ca_file))
        with pytest.raises(WebSocketError) as caught:
            async with Client(url=daemon.url, settings=settings):
                pass
    assert is_cert_failure(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)


@pytest.mark.anyio
async def test_exai_client_without_exai_tls_ca_does_not_trust_a_private_ca(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        with pytest.raises(WebSocketError) as caught:
            async with Client(url=daemon.url, settings=make_settings(tmp_path)):
                pass
    assert is_cert_failure(caught.value)


# ---------------------------------------------------------------------------------------
# the bridge, as an MCP client launches it


async def bridge_exchange(url: str, ca_file: Path, tmp_path: Path) -> list[dict]:
    """Run ``exai bridge`` against ``url`` trusting ``ca_file``; send initialize, initialized
    and tools/list; return the responses to ids 1 and 2 (in order of arrival)."""
    env = subprocess_env(tmp_path, EXAI_URL=url, EXAI_TLS_CA=str(ca_file), EXAI_CALL_TIMEOUT_S="1")
    env.pop("PYTHONWARNINGS", None)
    answers: list[dict] = []
    async with await open_process(
        [sys.executable, "-m", "exai.cli", "bridge"], env=env, cwd=str(REPO)
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for msg in (INIT, INITIALIZED, LIST):
            await proc.stdin.send((json.dumps(msg) + "\n").encode())
        buf = ""
        with anyio.fail_after(30):
            async for chunk in TextReceiveStream(proc.stdout):
                buf += chunk
                while "\n" in buf:
                    line, buf = buf.split("\n", 1)
                    msg = json.loads(line)
                    if msg.get("id") in (1, 2):
                        answers.append(msg)
                if len(answers) == 2 or (answers and "error" in answers[0]):
                    break
            await proc.stdin.aclose()
            assert await proc.wait() == 0
    return answers


@pytest.mark.stall_threshold(0.5)  # spawning the bridge process
@pytest.mark.anyio
async def test_the_bridge_with_exai_tls_ca_serves_tools_over_wss(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        answers = await bridge_exchange(daemon.url, pki.ca_file, tmp_path)
    assert [a["id"] for a in answers] == [1, 2]
    assert answers[0]["result"]["serverInfo"]
    assert {t["name"] for t in answers[1]["result"]["tools"]} >= {"version", "status"}


@pytest.mark.stall_threshold(0.5)
@pytest.mark.anyio
async def test_the_bridge_trusting_another_ca_is_refused_and_says_why(tmp_path, pki):
    async with running_daemon(tls_settings(tmp_path, pki)) as daemon:
        answers = await bridge_exchange(daemon.url, pki.other_ca_file, tmp_path)
        assert daemon.stats.calls == {} and not daemon.sessions
    assert answers[0]["id"] == 1 and "error" in answers[0]
    assert "CERTIFICATE_VERIFY_FAILED" in answers[0]["error"]["message"]


def test_a_non_loopback_bind_without_tls_is_refused_saying_what_it_exposes(tmp_path):
    settings = make_settings(tmp_path, host="0.0.0.0", tokens=Secret("t" * 40))
    tokens = TokenTable(parse_tokens(settings.tokens))
    with pytest.raises(ConfigError, match="cross the network in clear text"):
        check_bind(settings, tokens)
    check_bind(attrs.evolve(settings, allow_insecure_bind=True), tokens)  # explicitly allowed
    check_bind(attrs.evolve(settings, tls_cert="c.pem", tls_key="k.pem"), tokens)  # TLS


# ---------------------------------------------------------------------------------------
# the Streamable HTTP door over TLS


@pytest.mark.anyio
async def test_the_http_door_over_tls_writes_nothing_past_tls(tmp_path, pki, monkeypatch):
    """JSON answers (small, and one over 64 KiB), a 202 and an SSE stream over ``https://``.
    The door hands a small write to a plain TCP socket at once (``ProgressStream.send_nowait``,
    e83bafc); under TLS it must take nothing (the bytes must go through the TLS stream), and
    every write must still arrive whole."""
    import httpx

    from exai.server.outbox import ProgressStream
    from tests.daemon_tools import BLOB
    from tests.helpers import registry_with
    from tests.httpmcp import McpHttp, sse_messages

    taken: list[int] = []
    real = ProgressStream.send_nowait

    def recording(self: ProgressStream, data: bytes | bytearray | memoryview) -> int:
        n = real(self, data)
        taken.append(n)
        return n

    monkeypatch.setattr(ProgressStream, "send_nowait", recording)
    settings = attrs.evolve(tls_settings(tmp_path, pki), heartbeat_interval_s=0.5)
    async with (
        running_daemon(settings, registry_with(BLOB)) as daemon,
        httpx.AsyncClient(verify=trusting(pki.ca_file), timeout=60) as client,
    ):
        mcp = McpHttp(client, daemon.url)
        assert mcp.url.startswith("https://")
        await mcp.initialize()  # (a 200 with its session id, then a 202)
        small = await mcp.call("version")
        assert small["result"]["isError"] is False
        big = await mcp.call("blob", {"bytes": 200_000})
        assert big["result"]["structuredContent"]["content"] == ("exai " * 40_000)[:200_000]
        # silent for a heartbeat interval: an SSE stream (its head and a keep-alive comment,
        # then the answer and the stream's end)
        response = await mcp.post(
            mcp.message("tools/call", {"name": "blob", "arguments": {"bytes": 10, "seconds": 1.2}})
        )
        assert response.headers["content-type"].startswith("text/event-stream")
        assert ": keep-alive" in response.text
        assert (
            sse_messages(response.text)[-1]["result"]["structuredContent"]["content"]
            == "exai exai "
        )
        assert taken and set(taken) == {0}, taken
