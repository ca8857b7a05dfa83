"""Overload manager (memory watermarks), per-identity limits and /metrics."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected

from exai.config import Secret
from exai.server.overload import MemoryReading
from tests.helpers import Rpc, make_settings, raw_upgrade, registry_with, running_daemon, ws
from tests.server.test_daemon import Probe

pytestmark = pytest.mark.anyio


class FakeMemory:
    def __init__(self, used: int, limit: int = 1000) -> None:
        self.used = used
        self.limit = limit

    async def __call__(self) -> MemoryReading:
        return MemoryReading(self.used, self.limit, "fake")


def port_of(d: Any) -> int:
    return int(d.url.rsplit(":", 1)[1].split("/")[0])


async def test_memory_watermarks_stop_and_resume_admission_and_inflight_calls_finish(tmp_path):
    probe = Probe()
    settings = make_settings(tmp_path, memory_high_watermark=0.9, memory_low_watermark=0.7)
    async with running_daemon(settings, registry_with(probe.spec)) as d, ws(d) as conn:
        fake = FakeMemory(100)
        assert d.memory is not None
        d.memory.reader = fake
        rpc = Rpc(conn)
        await rpc.start_call("probe", id=1)
        with trio.fail_after(5):
            await probe.started_event.wait()
        fake.used = 950  # above the high watermark
        await d.memory.check()
        assert d.overloaded_reason is not None
        # new calls and new connections are refused ...
        res = await rpc.call("version", id=2)
        assert res["error"]["data"]["reason"] == "overloaded"
        stream, status, headers, _ = await raw_upgrade("127.0.0.1", port_of(d))
        await stream.aclose()
        assert status == 503 and "retry-after" in headers
        # ... between the watermarks nothing changes ...
        fake.used = 800
        await d.memory.check()
        assert d.overloaded_reason is not None
        # ... while the call in flight finishes normally
        probe.release.set()
        assert (await rpc.response(1))["result"]["content"][0]["text"] == "done 1"
        fake.used = 600  # below the low watermark: resume
        await d.memory.check()
        assert d.overloaded_reason is None
        assert (await rpc.call("version", id=3))["result"]["isError"] is False
        async with ws(d) as again:
            assert (await Rpc(again).request("ping"))["result"] == {}


async def test_memory_pressure_shrinks_caches_but_keeps_exactly_once_results(tmp_path):
    class Cache:
        entries = 5

        def shrink_caches(self) -> int:
            freed, self.entries = self.entries, 0
            return freed

    cache = Cache()
    async with running_daemon(make_settings(tmp_path), services={"cache": cache}) as d:
        async with ws(d) as conn:
            await Rpc(conn).call("version")
        assert len(d.calls) == 1
        assert d.memory is not None
        d.memory.reader = FakeMemory(999)
        await d.memory.check()
        assert cache.entries == 0  # the service cache was shrunk
        assert len(d.calls) == 1  # the stored result of the call is not a cache


async def test_per_identity_inflight_limit_spans_connections(tmp_path):
    probe = Probe()
    settings = make_settings(
        tmp_path,
        tokens=Secret("alice:tok-alice-0123456789,bob:tok-bob-0123456789"),
        identity_max_inflight=1,
        slot_wait_s=0.1,
    )
    async with (
        running_daemon(settings, registry_with(probe.spec)) as d,
        ws(d, token="tok-alice-0123456789") as a1,
        ws(d, token="tok-alice-0123456789") as a2,
        ws(d, token="tok-bob-0123456789") as b,
    ):
        await Rpc(a1).start_call("probe", id=1)
        with trio.fail_after(5):
            await probe.started_event.wait()
        res = await Rpc(a2).call("version")
        assert res["error"]["data"]["reason"] == "overloaded"
        assert "alice" in res["error"]["message"]
        assert (await Rpc(b).call("version"))["result"]["isError"] is False
        probe.release.set()


async def test_metrics_expose_connections_calls_rejections_inflight_and_stalls(tmp_path):
    settings = make_settings(tmp_path, tokens=Secret("tok-metrics-0123456789"), max_connections=1)
    async with (
        running_daemon(settings) as d,
        httpx.AsyncClient(base_url=d.admin_url, verify=False) as http,
    ):
        with pytest.raises(ConnectionRejected):
            async with ws(d, token="wrong"):
                pass
        async with ws(d, token="tok-metrics-0123456789") as conn:
            rpc = Rpc(conn)
            await rpc.call("version")
            await rpc.call("nope")
            with pytest.raises(ConnectionRejected):  # over the connection cap
                async with ws(d, token="tok-metrics-0123456789"):
                    pass
            r = await http.get("/metrics")
        assert r.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(r.text)}

        def value(name: str, **labels: str) -> float:
            for sample in families[name].samples:
                if all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
            raise AssertionError(f"no sample {name} {labels}")

        assert value("exai_connections_open") == 1
        assert value("exai_connections_rejected", reason="unauthorized") == 1
        assert value("exai_connections_rejected", reason="max_connections") == 1
        assert value("exai_calls", tool="version", outcome="ok") == 1
        assert "exai_call_duration_seconds" in families
        assert "exai_inflight_slot_wait_seconds" in families
        assert value("exai_inflight_calls") == 0
        assert "exai_loop_max_stall_seconds" in families
        assert "exai_loop_stall_seconds" in families
        assert "tok-metrics" not in r.text


async def test_per_identity_message_rate_spans_connections(tmp_path):
    settings = make_settings(
        tmp_path,
        tokens=Secret("alice:tok-alice-0123456789,bob:tok-bob-0123456789"),
        identity_rate_per_s=0.001,
        identity_burst=3,
    )
    async with (
        running_daemon(settings) as d,
        ws(d, token="tok-alice-0123456789") as a1,
        ws(d, token="tok-alice-0123456789") as a2,
        ws(d, token="tok-bob-0123456789") as b,
    ):
        r1, r2 = Rpc(a1), Rpc(a2)
        assert (await r1.request("ping"))["result"] == {}
        assert (await r1.request("ping"))["result"] == {}
        assert (await r2.request("ping"))["result"] == {}
        # alice's burst of 3 is used up across her two connections
        limited = await r2.request("ping")
        assert limited["error"]["data"]["reason"] == "rate_limited"
        assert (await Rpc(b).request("ping"))["result"] == {}  # bob has his own bucket
