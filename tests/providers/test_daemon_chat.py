"""`chat` and `listmodels` through the daemon, against mock upstreams over real HTTP."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from exai.config import Settings
from exai.providers import ProviderRouter
from exai.server.app import serve
from exai.testing import MockUpstream
from exai.tools import default_registry
from tests.helpers import Rpc, make_settings, running_daemon, ws
from tests.providers.conftest import KEY_A, mock_settings

pytestmark = pytest.mark.anyio


def daemon_settings(tmp_path: Path, a: MockUpstream, b: MockUpstream, **kw: object) -> Settings:
    providers = mock_settings(a, b)
    return make_settings(
        tmp_path,
        providers=providers.providers,
        fast_models=providers.fast_models,
        quality_models=providers.quality_models,
        **kw,
    )


async def test_chat_round_trip_streams_progress_to_the_client(tmp_path, two_mocks):
    a, b = two_mocks
    a.chunk_delay_s = 0.1  # a slow stream, so progress is worth sending
    settings = daemon_settings(tmp_path, a, b)
    async with (
        ProviderRouter(settings) as router,
        running_daemon(settings, default_registry(), {"providers": router}) as d,
        ws(d) as conn,
    ):
        rpc = Rpc(conn)
        res = await rpc.request(
            "tools/call",
            {
                "name": "chat",
                "arguments": {"prompt": "hello there", "model": "mock-a"},
                "_meta": {"progressToken": "p1"},
            },
        )
        result = res["result"]
        assert result["isError"] is False
        text = result["content"][0]["text"]
        assert "mock:mock-a: hello there" in text
        assert "mock-a" in text  # the answer says which model served it
        progress = [n for n in rpc.notifications if n.get("method") == "notifications/progress"]
        assert progress, "no progress notification reached the client"
        assert all(n["params"]["progressToken"] == "p1" for n in progress)
        assert len(a.chat_requests) == 1
        assert a.chat_requests[0].json["stream"] is True
        assert b.chat_requests == []


async def test_listmodels_reports_providers_breakers_and_limits(tmp_path, two_mocks):
    a, b = two_mocks
    settings = daemon_settings(tmp_path, a, b)
    async with (
        ProviderRouter(settings) as router,
        running_daemon(settings, default_registry(), {"providers": router}) as d,
        ws(d) as conn,
    ):
        rpc = Rpc(conn)
        res = await rpc.call("listmodels")
        text = res["result"]["content"][0]["text"]
        for word in ("mock-a", "mock-b", "closed"):
            assert word in text
        status = await rpc.call("status")
        providers = status["result"]["structuredContent"]["providers"]["providers"]
        assert providers["a"]["breaker"]["state"] == "closed"
        assert KEY_A not in str(status)


async def test_provider_key_rotation_reaches_the_upstream_on_the_next_call(tmp_path):
    key_file = tmp_path / "mock.key"
    key_file.write_text("key-before-rotation-000000\n")
    async with MockUpstream(models=("mock-fast",)) as mock:
        env = {
            "EXAI_PROVIDER_MOCK_BASE_URL": mock.base_url,
            "EXAI_PROVIDER_MOCK_MODELS": "mock-fast",
            "EXAI_PROVIDER_MOCK_API_KEY_FILE": str(key_file),
        }

        def load() -> Settings:
            base = Settings.from_env(env, env_file="", config_file="")
            return attrs.evolve(base, port=0, admin_port=0, secret_watch_interval_s=0.05)

        settings = load()
        async with ProviderRouter(settings) as router, trio.open_nursery() as nursery:
            d = await nursery.start(
                lambda task_status: serve(
                    settings,
                    default_registry(),
                    {"providers": router},
                    announce=False,
                    reload=load,
                    reload_environ=env,
                    task_status=task_status,
                )
            )
            async with ws(d) as conn:
                rpc = Rpc(conn)
                args = {"prompt": "hi", "model": "mock-fast"}
                assert (await rpc.call("chat", args))["result"]["isError"] is False
                key_file.write_text("key-after-rotation-1111111\n")
                with trio.fail_after(5):
                    while d.reloader.reloads == 0:
                        await trio.sleep(0.02)
                assert (await rpc.call("chat", args))["result"]["isError"] is False
            d.request_shutdown()
        auth = [r.headers["authorization"] for r in mock.chat_requests]
        assert auth == ["Bearer key-before-rotation-000000", "Bearer key-after-rotation-1111111"]


async def test_a_cancelled_call_logs_the_provider_it_had_reached(tmp_path, two_mocks, caplog):
    """``call.finished`` said ``provider: null`` for a call cancelled while its provider was
    answering: the provider was only noted from the answer. The route is noted as it is taken."""
    a, b = two_mocks
    a.latency_s = 30.0  # the answer does not come before the cancel
    settings = daemon_settings(tmp_path, a, b)
    with caplog.at_level("INFO", logger="exai"):
        async with (
            ProviderRouter(settings) as router,
            running_daemon(settings, default_registry(), {"providers": router}) as d,
            ws(d) as conn,
        ):
            rpc = Rpc(conn)
            await rpc.start_call("chat", {"prompt": "hello", "model": "mock-a"}, id=7)
            with trio.fail_after(10):
                while not a.chat_requests:
                    await trio.sleep(0.01)
                await rpc.send(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/cancelled",
                        "params": {"requestId": 7},
                    }
                )

                def finished() -> list[object]:
                    return [
                        r for r in caplog.records if getattr(r, "event", None) == "call.finished"
                    ]

                while not finished():
                    await trio.sleep(0.01)
    fields = finished()[0].fields  # type: ignore[attr-defined]
    assert fields["outcome"] == "cancelled"
    assert fields["provider"] == "a" and fields["model"] == "mock-a"


@pytest.mark.parametrize(
    ("b_fails", "expected"),
    [
        (False, ("b", "mock-b")),  # two answers: the synthesis (asked of mock-b) answered
        (True, ("a", "mock-a")),  # mock-b refuses: one answer, no synthesis, that one answered
    ],
)
async def test_a_consensus_call_logs_the_provider_that_answered(
    tmp_path, two_mocks, caplog, b_fails, expected
):
    """call.finished and the audit record said ``provider: null, model: null`` for every
    consensus call, though docs/security.md says they name what answered and null only for a
    call that reached no provider. They now name the synthesis, or the one answer."""
    from exai.testing.mock_upstream import Fault

    a, b = two_mocks
    if b_fails:
        b.set_fault(Fault.status(400))
    settings = daemon_settings(tmp_path, a, b)
    with caplog.at_level("INFO", logger="exai"):
        async with (
            ProviderRouter(settings) as router,
            running_daemon(settings, default_registry(), {"providers": router}) as d,
            ws(d) as conn,
        ):
            models = [{"model": "mock-a"}, {"model": "mock-b"}]
            args = {"prompt": "p", "model": "mock-b", "models": models}
            res = await Rpc(conn).call("consensus", args)
            assert res["result"]["isError"] is False, res
            with trio.fail_after(10):  # (only turns a hang into a failure)
                while not [r for r in caplog.records if getattr(r, "event", "") == "call.finished"]:
                    await trio.sleep(0.01)
    [fin] = [r for r in caplog.records if getattr(r, "event", "") == "call.finished"]
    fields = fin.fields  # type: ignore[attr-defined]
    assert (fields["provider"], fields["model"]) == expected
