"""exai.Client, error_from_jsonrpc and ``exai call``."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
import trio

from exai import errors
from exai.cli.main import main as exai_main
from exai.client import PROTOCOL_VERSION, Client, error_from_jsonrpc
from exai.client.ws import ConnectionClosed, HandshakeRejected
from exai.config import Settings

from .conftest import FakeDaemon


def settings_for(url: str, **kw: Any) -> Settings:
    return Settings(url=url, **kw)


# -- error_from_jsonrpc ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        ("overloaded", errors.OverloadedError),
        ("rate_limited", errors.RateLimitedError),
        ("timeout", errors.DeadlineExceeded),
        ("circuit_open", errors.CircuitOpenError),
        ("upstream_auth", errors.UpstreamAuthError),
        ("continuation_not_found", errors.ConversationNotFound),
    ],
)
def test_error_reason_picks_the_exception_class(reason: str, cls: type) -> None:
    exc = error_from_jsonrpc({"code": -32000, "message": "no", "data": {"reason": reason}})
    assert type(exc) is cls
    assert exc.reason == reason
    assert str(exc) == "no"


def test_invalid_params_code_maps_to_invalid_params_with_the_field() -> None:
    exc = error_from_jsonrpc({"code": -32602, "message": "bad", "data": {"field": "steps"}})
    assert isinstance(exc, errors.InvalidParams)
    assert exc.field == "steps"


def test_retry_after_and_extra_data_are_kept() -> None:
    exc = error_from_jsonrpc(
        {
            "code": -32000,
            "message": "open",
            "data": {"reason": "circuit_open", "retry_after_s": 2.5, "breaker": "provider:kimi"},
        }
    )
    assert isinstance(exc, errors.CircuitOpenError)
    assert exc.retry_after_s == 2.5
    assert exc.name == "provider:kimi"
    assert exc.to_error_data()["breaker"] == "provider:kimi"


def test_unknown_reason_is_a_plain_exai_error_with_that_reason() -> None:
    exc = error_from_jsonrpc(
        {"code": -32000, "message": "gone", "data": {"reason": "daemon_unavailable"}}
    )
    assert type(exc) is errors.ExaiError
    assert exc.reason == "daemon_unavailable"
    assert exc.code == -32000


def test_error_without_data_still_maps() -> None:
    exc = error_from_jsonrpc({"code": -32603, "message": "internal"})
    assert type(exc) is errors.ExaiError
    assert str(exc) == "internal"


# -- Client ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_client_handshake_is_initialize_then_initialized(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        assert client.server_info["serverInfo"]["name"] == "fake-daemon"
        await daemon.wait_for(lambda: "notifications/initialized" in daemon.methods())
    first = daemon.received[0][1]
    assert first["method"] == "initialize"
    assert first["params"]["protocolVersion"] == PROTOCOL_VERSION
    assert daemon.methods()[:2] == ["initialize", "notifications/initialized"]


@pytest.mark.anyio
async def test_client_sends_the_token(daemon: FakeDaemon) -> None:
    async with Client(daemon.url, "tok-1", settings=Settings()):
        pass
    assert daemon.auth_headers == ["Bearer tok-1"]


@pytest.mark.anyio
async def test_list_tools_returns_the_tool_dicts(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        tools = await client.list_tools()
    assert [t["name"] for t in tools] == ["echo", "progress", "hold", "fail"]


@pytest.mark.anyio
async def test_call_tool_returns_the_mcp_result(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        result = await client.call_tool("echo", {"x": 1})
    assert result["isError"] is False
    assert json.loads(result["content"][0]["text"])["arguments"] == {"x": 1}


@pytest.mark.anyio
async def test_call_tool_reports_progress_in_order(daemon: FakeDaemon) -> None:
    seen: list[tuple[Any, Any, Any]] = []

    async def on_progress(p: float | None, total: float | None, msg: str | None) -> None:
        seen.append((p, total, msg))

    async with Client(settings=settings_for(daemon.url)) as client:
        result = await client.call_tool("progress", {"steps": 3}, on_progress=on_progress)
    assert result["content"][0]["text"] == "done"
    assert seen == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]


@pytest.mark.anyio
async def test_concurrent_calls_each_get_their_own_answer(daemon: FakeDaemon) -> None:
    results: dict[str, Any] = {}
    echoes_done = anyio.Event()
    async with Client(settings=settings_for(daemon.url)) as client:

        async def hold() -> None:
            results["hold"] = await client.call_tool("hold")

        async def echo(i: int) -> None:
            r = await client.call_tool("echo", {"i": i})
            results[f"echo{i}"] = json.loads(r["content"][0]["text"])["arguments"]["i"]
            if len(results) == 5:
                echoes_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await daemon.hold_running.wait()
            for i in range(5):
                tg.start_soon(echo, i)
            # the later calls are answered while the first one still runs
            with anyio.fail_after(5):
                await echoes_done.wait()
            assert "hold" not in results
            daemon.release()
    assert {k: v for k, v in results.items() if k != "hold"} == {f"echo{i}": i for i in range(5)}
    assert results["hold"]["content"][0]["text"] == "1"


@pytest.mark.anyio
async def test_json_rpc_error_raises_the_mapped_exception(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        with pytest.raises(errors.RateLimitedError) as info:
            await client.call_tool("fail", {"reason": "rate_limited", "retry_after_s": 1.5})
    assert info.value.retry_after_s == 1.5


@pytest.mark.anyio
async def test_cancelled_call_sends_notifications_cancelled(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        with anyio.move_on_after(5) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "hold")
                await daemon.hold_running.wait()
                tg.cancel_scope.cancel()
        assert not scope.cancelled_caught
        await daemon.wait_for(lambda: "notifications/cancelled" in daemon.methods())
        call = next(m for _, m in daemon.received if m.get("method") == "tools/call")
        cancel = next(m for _, m in daemon.received if m.get("method") == "notifications/cancelled")
        assert cancel["params"]["requestId"] == call["id"]
        daemon.release()


@pytest.mark.anyio
async def test_cancel_by_id_tells_the_daemon_and_ends_the_local_wait(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(errors.ExaiError) as info:
                    await client.call_tool("hold")
                assert info.value.reason == "cancelled"

            tg.start_soon(call)
            await daemon.hold_running.wait()
            (request_id,) = client.in_flight()
            await client.cancel(request_id)
        await daemon.wait_for(lambda: "notifications/cancelled" in daemon.methods())
        daemon.release()


@pytest.mark.anyio
async def test_connection_loss_fails_waiting_calls(daemon: FakeDaemon) -> None:
    async with Client(settings=settings_for(daemon.url)) as client:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with pytest.raises(ConnectionClosed):
                    await client.call_tool("hold")

            tg.start_soon(call)
            await daemon.hold_running.wait()
            await daemon.conns[-1].aclose(code=1001, reason="shutting down")
        with pytest.raises(ConnectionClosed):
            await client.list_tools()


@pytest.mark.anyio
async def test_refused_token_raises_handshake_rejected() -> None:
    fake = FakeDaemon(token="right")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        with pytest.raises(HandshakeRejected) as info:
            async with Client(fake.url, "wrong", settings=Settings()):
                pass
        nursery.cancel_scope.cancel()
    assert info.value.status == 401


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_client_works_under_asyncio(threaded_daemon: FakeDaemon) -> None:
    seen: list[Any] = []

    async def on_progress(p: float | None, total: float | None, msg: str | None) -> None:
        seen.append(p)

    async with Client(settings=settings_for(threaded_daemon.url)) as client:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(client.call_tool, "echo", {"i": i})
        result = await client.call_tool("progress", {"steps": 2}, on_progress=on_progress)
    assert result["content"][0]["text"] == "done"
    assert seen == [1.0, 2.0]


# -- exai call ------------------------------------------------------------------------------


def _run_in_thread_daemon(threaded_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAI_URL", threaded_daemon.url)
    monkeypatch.delenv("EXAI_TOKEN", raising=False)


def test_exai_call_prints_the_text_and_parses_values_as_json(
    threaded_daemon: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run_in_thread_daemon(threaded_daemon, monkeypatch)
    code = exai_main(["call", "echo", "n=3", "flag=true", "name=alice", 'xs=[1,"a"]'])
    out = capsys.readouterr()
    assert code == 0
    assert json.loads(out.out)["arguments"] == {
        "n": 3,
        "flag": True,
        "name": "alice",
        "xs": [1, "a"],
    }


def test_exai_call_json_object_and_progress_on_stderr(
    threaded_daemon: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run_in_thread_daemon(threaded_daemon, monkeypatch)
    code = exai_main(["call", "progress", "--json", '{"steps": 2}'])
    out = capsys.readouterr()
    assert code == 0
    assert out.out == "done\n"
    assert "progress 1/2 step 1" in out.err
    assert "progress 2/2 step 2" in out.err


def test_exai_call_failure_exits_1_with_the_message(
    threaded_daemon: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _run_in_thread_daemon(threaded_daemon, monkeypatch)
    code = exai_main(["call", "fail", "reason=overloaded", "message=too busy"])
    out = capsys.readouterr()
    assert code == 1
    assert out.out == ""
    assert "too busy" in out.err


def test_exai_call_rejects_an_argument_without_equals(capsys: pytest.CaptureFixture[str]) -> None:
    assert exai_main(["call", "echo", "oops"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_a_token_that_is_not_printable_ascii_is_refused_when_the_client_is_made() -> None:
    from exai.errors import ConfigError

    with pytest.raises(ConfigError, match="ASCII") as info:
        Client("ws://127.0.0.1:9/mcp", token="tök€n-0123456789abcdef0123456789")
    assert "tök€n" not in str(info.value)


@pytest.mark.anyio
async def test_the_clients_errors_never_show_the_urls_password_or_query(daemon: FakeDaemon) -> None:
    """The WebSocket layer's errors name the URL redacted, but exai.Client's own — "timed out
    connecting to the exai daemon at …", and the ConnectionClosed of a lost or closed
    connection — named it whole: `exai call` / `exai status` printed EXAI_URL's password and
    query string (a token put there) on stderr."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    silent = f"ws://u:pw-SECRET@127.0.0.1:{port}/mcp?token=q-SECRET"

    async def hold(stream: trio.SocketStream) -> None:  # accepts, never answers the upgrade
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, [listener])
        with pytest.raises(errors.ExaiError) as timed_out:
            async with Client(settings=settings_for(silent, handshake_timeout_s=0.05)):
                pass
        nursery.cancel_scope.cancel()
    assert "timed out" in str(timed_out.value)
    with_query = daemon.url + "?token=q-SECRET"
    async with Client(settings=settings_for(with_query)) as client:
        await daemon.conns[-1].aclose(code=1001, reason="shutting down")
        with pytest.raises(ConnectionClosed) as lost:
            await client.call_tool("hold")
    shown = [str(timed_out.value), str(lost.value), repr(client)]
    assert not [s for s in shown if "SECRET" in s], shown
