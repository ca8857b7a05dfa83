"""/metrics after a scripted run with rejections, a breaker trip and a spool write."""

from __future__ import annotations

import attrs
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected

from exai.config import Secret
from exai.providers import ProviderRouter
from exai.storage.service import ConversationService
from exai.testing import Fault, MockUpstream
from exai.testing.faultproxy import FaultProxy
from exai.tools import default_registry
from tests.helpers import Rpc, make_settings, running_daemon, ws
from tests.providers.conftest import provider_settings
from tests.storage.conftest import PG_HOST, PG_PORT, pg_url

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(fams: dict[str, list], name: str, **labels: str) -> float:
    for s in fams[name]:
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


async def test_metrics_after_rejections_a_breaker_trip_and_a_spool_write(
    tmp_path, pg_database, pg_schema
):
    async with (
        MockUpstream(models=("mock-a",)) as mock,
        FaultProxy(PG_HOST, PG_PORT) as proxy,
    ):
        prov = provider_settings(
            "a",
            mock.base_url,
            None,
            ("mock-a",),
            breaker_minimum_calls=2,
            breaker_window=4,
            rpm=600.0,
        )
        settings = make_settings(
            tmp_path,
            providers=(prov,),
            fast_models=("mock-a",),
            quality_models=("mock-a",),
            storage_url=Secret(pg_url(pg_database, schema=pg_schema, port=proxy.port)),
            store_timeout_s=0.5,
            session_rate_per_s=1000,
            session_burst=1000,
        )
        async with (
            ConversationService.open(settings) as conv,
            ProviderRouter(settings, attempts=1) as router,
            running_daemon(
                attrs.evolve(settings, max_connections=1),
                default_registry(),
                {"providers": router, "conversations": conv},
            ) as d,
            ws(d) as conn,
            httpx.AsyncClient(base_url=d.admin_url, verify=False) as http,
        ):
            rpc = Rpc(conn)
            ok = {"prompt": "hello", "model": "mock-a"}
            assert (await rpc.call("chat", ok))["result"]["isError"] is False
            # a spool write: the database goes away, the call still succeeds
            proxy.cut()
            assert (await rpc.call("chat", ok))["result"]["isError"] is False
            # a breaker trip: the upstream fails until the provider's breaker opens
            mock.set_fault(Fault.status(503))
            reasons = [(await rpc.call("chat", ok))["error"]["data"]["reason"] for _ in range(4)]
            assert "circuit_open" in reasons
            # rejections: bad arguments and a connection over the cap
            assert (await rpc.call("chat", {"prompt": ""}))["error"]["code"] == -32602
            with pytest.raises(ConnectionRejected):
                async with ws(d):
                    pass
            text = (await http.get("/metrics")).text
            proxy.restore()
        fams = samples(text)
        assert value(fams, "exai_breaker_state", breaker="provider:a") == 2  # open
        assert value(fams, "exai_breaker_transitions", breaker="provider:a") >= 1
        assert value(fams, "exai_spool_writes") >= 1
        assert "exai_spool_depth" in fams
        assert value(fams, "exai_connections_rejected", reason="max_connections") == 1
        assert value(fams, "exai_calls", tool="chat", outcome="ok") == 2
        assert value(fams, "exai_calls", tool="chat", outcome="circuit_open") >= 1
        for family in (
            "exai_connections_open",
            "exai_rejections",
            "exai_call_duration_seconds",
            "exai_inflight_calls",
            "exai_inflight_slot_wait_seconds",
            "exai_breaker_rejections",
            "exai_pool_in_use",
            "exai_pool_size",
            "exai_loop_max_stall_seconds",
            "exai_loop_stall_seconds",
        ):
            assert family in fams, family
        assert value(fams, "exai_pool_size", pool="store:postgres") >= 1
        assert value(fams, "exai_bucket_rejections", bucket="provider:a:rpm") == 0
        assert "exai_bucket_waits" in fams
