"""The WebSocket client transport (exai.client.ws) against a trio-websocket server."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketRequest

from exai.client.ws import (
    ConnectionClosed,
    HandshakeRejected,
    WebSocketError,
    connect_websocket,
    make_ssl_context,
)
from exai.config import Settings
from exai.errors import ExaiError

from .conftest import FakeDaemon


async def _serve(nursery: trio.Nursery, handler: Any) -> str:
    server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/mcp"


@pytest.mark.anyio
async def test_upgrade_offers_mcp_subprotocol_and_bearer_token(daemon: FakeDaemon) -> None:
    async with await connect_websocket(daemon.url, token="s3cret") as conn:
        assert conn.subprotocol == "mcp"
    assert daemon.subprotocols == [("mcp",)]
    assert daemon.auth_headers == ["Bearer s3cret"]


@pytest.mark.anyio
async def test_no_authorization_header_without_a_token(daemon: FakeDaemon) -> None:
    async with await connect_websocket(daemon.url):
        pass
    assert daemon.auth_headers == [None]


@pytest.mark.anyio
async def test_one_text_message_per_json_rpc_message(daemon: FakeDaemon) -> None:
    async with await connect_websocket(daemon.url) as conn:
        await conn.send_message(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "ping"}))
        reply = json.loads(await conn.receive_message())
    assert reply == {"jsonrpc": "2.0", "id": 7, "result": {}}


@pytest.mark.anyio
async def test_401_is_handshake_rejected_and_not_retryable() -> None:
    fake = FakeDaemon(token="right")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        with pytest.raises(HandshakeRejected) as info:
            await connect_websocket(fake.url, token="wrong")
        nursery.cancel_scope.cancel()
    err = info.value
    assert err.status == 401
    assert err.reason == "unauthorized"
    assert not err.retryable
    assert "refused the client token" in str(err)
    assert "wrong" not in str(err)


@pytest.mark.anyio
async def test_503_carries_retry_after(daemon: FakeDaemon) -> None:
    daemon.reject_with = (503, [(b"Retry-After", b"3")])
    with pytest.raises(HandshakeRejected) as info:
        await connect_websocket(daemon.url)
    assert info.value.status == 503
    assert info.value.retry_after_s == 3.0
    assert info.value.retryable
    assert info.value.reason == "overloaded"


@pytest.mark.anyio
async def test_refused_port_is_a_websocket_error(daemon: FakeDaemon) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    with pytest.raises(WebSocketError) as info:
        await connect_websocket(f"ws://127.0.0.1:{port}/mcp")
    assert isinstance(info.value, ExaiError)
    assert info.value.retryable


@pytest.mark.anyio
async def test_server_close_code_and_reason_surface_as_connection_closed() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="mcp")
        await ws.aclose(code=1008, reason="too many messages")

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        async with await connect_websocket(url) as conn:
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive_message()
        nursery.cancel_scope.cancel()
    assert info.value.code == 1008
    assert info.value.close_reason == "too many messages"


@pytest.mark.anyio
async def test_message_over_the_size_bound_closes_with_1009() -> None:
    closed_with: list[int] = []
    server_saw_close = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="mcp")
        await ws.send_message("x" * 5000)
        try:
            await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            closed_with.append(exc.reason.code)
            server_saw_close.set()

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        conn = await connect_websocket(url, max_message_bytes=1000)
        async with conn:
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive_message()
        with trio.fail_after(5):
            await server_saw_close.wait()
        nursery.cancel_scope.cancel()
    assert info.value.code == 1009
    assert closed_with == [1009]


@pytest.mark.anyio
async def test_ping_waits_for_the_pong(daemon: FakeDaemon) -> None:
    async with await connect_websocket(daemon.url) as conn, anyio.create_task_group() as tg:

        async def read() -> None:
            try:
                await conn.receive_message()
            except ConnectionClosed:
                pass

        tg.start_soon(read)
        with anyio.fail_after(5):
            await conn.ping()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_lost_connection_is_1006() -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="mcp")
        await ws._stream.aclose()  # drop TCP without a close frame

    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, handler)
        async with await connect_websocket(url) as conn:
            with pytest.raises(ConnectionClosed) as info:
                await conn.receive_message()
        nursery.cancel_scope.cancel()
    assert info.value.code == 1006
    with pytest.raises(ConnectionClosed):
        await conn.send_message("{}")


def test_bad_url_is_refused_before_connecting() -> None:
    async def main() -> None:
        with pytest.raises(WebSocketError, match="ws:// or wss://"):
            await connect_websocket("http://127.0.0.1:1/mcp")

    anyio.run(main, backend="trio")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 / localhost and its key (made by openssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.anyio
async def test_wss_verifies_the_server_with_exai_tls_ca(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_ctx = await anyio.to_thread.run_sync(_server_context, cert, key)

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="mcp")
        await ws.send_message(await ws.get_message())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, server_ctx
        )
        url = f"wss://127.0.0.1:{server.port}/mcp"
        trusted = await anyio.to_thread.run_sync(make_ssl_context, Settings(tls_ca=str(cert)))
        async with await connect_websocket(url, ssl_context=trusted) as conn:
            await conn.send_message("hello")
            assert await conn.receive_message() == "hello"
        # the system store does not know this certificate: refused, not silently trusted
        with pytest.raises(WebSocketError, match="cannot connect"):
            await connect_websocket(url)  # default context: the system store
        nursery.cancel_scope.cancel()
