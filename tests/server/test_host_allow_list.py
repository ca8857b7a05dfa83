"""DNS rebinding: a request naming a ``Host`` the daemon does not serve is refused on every door.

A page at ``http://attacker.example:PORT`` whose name the attacker re-points at 127.0.0.1 is
same-origin with itself for the browser: its ``GET`` (an SSE stream) carries no ``Origin`` —
the Origin check never sees it — but its ``Host`` is ``attacker.example:PORT``. A daemon bound
to loopback serves only loopback ``Host`` values (any port) and ``EXAI_ALLOWED_HOSTS``; others
get 421 with a JSON body shaped as the Origin refusal's, before the token or the body.
"""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import urlsplit

import attrs
import pytest
import trio

from exai.config import Secret, Settings
from exai.errors import ConfigError
from exai.server.origins import OriginPolicy
from tests.helpers import make_settings, running_daemon
from tests.httpmcp import envelope, raw_exchange, request_bytes

pytestmark = pytest.mark.anyio

TOKEN = "alice-token-1111"
#: only turns a hang into a failure
HANG_GUARD_S = 30.0


def _policy(**env: str) -> OriginPolicy:
    return OriginPolicy.from_settings(Settings.from_env(env, env_file="", config_file=""))


def test_a_loopback_daemon_serves_loopback_hosts_only_by_default() -> None:
    policy = _policy()  # EXAI_HOST=127.0.0.1
    for host in ("127.0.0.1:8079", "localhost:8079", "LOCALHOST", "[::1]:9", "127.0.0.2", None):
        assert policy.allows_host(host), host
    for host in (
        "attacker.example:8079",
        "attacker.example",
        "x",
        "10.0.0.1:8079",
        "localhost.attacker.example",
        "127.0.0.1.attacker.example",
        "[::1",
        "127.0.0.1:99999",
        "",
    ):
        assert not policy.allows_host(host), host


def test_allowed_hosts_add_names_and_star_allows_any() -> None:
    policy = _policy(EXAI_ALLOWED_HOSTS="exai.example, api.example:443")
    assert policy.allows_host("exai.example:8079")
    assert policy.allows_host("EXAI.example")
    assert policy.allows_host("api.example:443")
    assert not policy.allows_host("api.example:8079")
    assert not policy.allows_host("attacker.example")
    assert policy.allows_host("127.0.0.1:8079")  # loopback clients on the machine still served
    assert _policy(EXAI_ALLOWED_HOSTS="*").allows_host("attacker.example")


def test_a_daemon_bound_elsewhere_checks_host_only_against_a_list_it_is_given() -> None:
    wide = {"EXAI_HOST": "0.0.0.0", "EXAI_ALLOW_INSECURE_BIND": "1"}
    assert _policy(**wide).allows_host("exai.lan:8079")
    listed = _policy(**wide, EXAI_ALLOWED_HOSTS="exai.lan")
    assert listed.allows_host("exai.lan:8079")
    assert not listed.allows_host("attacker.example:8079")


def test_a_bad_allowed_hosts_entry_is_a_config_error() -> None:
    for bad in ("http://exai.example", "exai.example/mcp", "exai.example:port", "a b"):
        with pytest.raises(ConfigError, match=r"EXAI_ALLOWED_HOSTS: .* is not a host"):
            Settings.from_env({"EXAI_ALLOWED_HOSTS": bad}, env_file="", config_file="")


def _post(port: int, host: str) -> bytes:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "version", "arguments": {}, "_meta": envelope()},
        }
    ).encode()
    data = request_bytes(
        f"http://{host}/mcp",
        body,
        headers=[
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("Authorization", f"Bearer {TOKEN}"),
        ],
    )
    assert f"Host: {host}\r\n".encode() in data
    return data


def _get(host: str) -> bytes:
    """What a rebinding page's EventSource sends: a GET with no Origin and no token."""
    return f"GET /mcp HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()


def _upgrade(host: str, path: str = "/mcp") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n"
    ).encode()


async def _status_line(port: int, data: bytes) -> bytes:
    """The status line answering ``data`` (a WebSocket upgrade's ``101`` is not read past)."""
    reply = b""
    with trio.fail_after(HANG_GUARD_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            while b"\r\n" not in reply:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                reply += chunk
    return reply.split(b"\r\n", 1)[0]


async def test_every_door_refuses_a_rebound_host_with_421_and_serves_loopback(tmp_path) -> None:
    settings = make_settings(tmp_path, tokens=Secret(f"alice:{TOKEN}"))
    async with running_daemon(settings) as d:
        port = urlsplit(d.url).port or 0
        evil = f"attacker.example:{port}"
        # the HTTP door: a rebinding page's GET (no Origin, no token) and an authenticated POST
        status, headers, body = await raw_exchange(d.url, _get(evil))
        assert status == 421
        assert headers["content-type"] == "application/json"
        refusal = json.loads(body)
        assert refusal["error"] == "forbidden_host"
        assert "EXAI_ALLOWED_HOSTS" in refusal["message"]
        status, _, body = await raw_exchange(d.url, _post(port, evil))
        assert (status, json.loads(body)["error"]) == (421, "forbidden_host")
        # an absolute-form target's authority stands for Host (RFC 9112 §3.2.2)
        absolute = _post(port, f"127.0.0.1:{port}").replace(
            b"POST /mcp ", b"POST http://%s/mcp " % evil.encode(), 1
        )
        status, _, _ = await raw_exchange(d.url, absolute)
        assert status == 421
        absolute = _post(port, evil).replace(
            b"POST /mcp ", b"POST http://127.0.0.1:%d/mcp " % port, 1
        )
        status, _, _ = await raw_exchange(d.url, absolute)
        assert status == 200
        # the WebSocket door and the old op protocol's door
        assert await _status_line(port, _upgrade(evil)) == b"HTTP/1.1 421 "
        assert await _status_line(port, _upgrade(evil, "/")) == b"HTTP/1.1 421 "
        # the same requests naming a loopback host are served
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            status, _, body = await raw_exchange(d.url, _post(port, host))
            assert status == 200, body
            assert await _status_line(port, _upgrade(host)) == b"HTTP/1.1 101 Switching Protocols"
            assert (await _status_line(port, _upgrade(host, "/"))).startswith(b"HTTP/1.1 101 ")


async def test_a_host_listed_in_allowed_hosts_is_served(tmp_path) -> None:
    settings = attrs.evolve(
        make_settings(tmp_path, tokens=Secret(f"alice:{TOKEN}")),
        allowed_hosts=("exai.example",),
    )
    async with running_daemon(settings) as d:
        port = urlsplit(d.url).port or 0
        status, _, _ = await raw_exchange(d.url, _post(port, f"exai.example:{port}"))
        assert status == 200
        assert (await _status_line(port, _upgrade("exai.example"))).startswith(b"HTTP/1.1 101 ")
        status, _, _ = await raw_exchange(d.url, _post(port, f"attacker.example:{port}"))
        assert status == 421


async def test_an_upgrade_with_a_byte_past_ascii_in_its_head_is_refused_with_400(tmp_path) -> None:
    # wsproto decodes the upgrade's Host (IDNA), Connection, Upgrade and Sec-WebSocket-* values
    # as ASCII: a byte past it ('Host: \xfflocalhost') raised UnicodeDecodeError out of the
    # connection's reader — no answer at all, the connection closed, a session.error logged
    # at error level for each request. The HTTP door answered the same Host with 421.
    settings = make_settings(tmp_path, tokens=Secret(f"alice:{TOKEN}"))
    async with running_daemon(settings) as d:
        port = urlsplit(d.url).port or 0
        good = _upgrade(f"localhost:{port}")
        for head in (
            good.replace(b"Host: localhost", b"Host: \xfflocalhost"),
            good.replace(b"Host: localhost", b"Host: \xe2\x84\x93ocalhost"),
            good.replace(b"Connection: Upgrade", b"Connection: Upgrade\xff"),
            good.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: mcp\xe9\r\n\r\n"),
            good.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: x\xe9\r\n\r\n"),
        ):
            for path in (b"/mcp", b"/"):
                data = head.replace(b"GET /mcp ", b"GET " + path + b" ", 1)
                assert await _status_line(port, data) == b"HTTP/1.1 400 ", data
        # (the daemon still serves a well-formed upgrade)
        assert await _status_line(port, good) == b"HTTP/1.1 101 Switching Protocols"
