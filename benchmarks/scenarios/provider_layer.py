"""Provider layer: its added latency over a bare httpx call, and fast-fail with an open breaker.

Both measured in one process against one in-process :class:`exai.testing.MockUpstream` on
loopback (no injected latency), sequentially, so the difference between the two series is what
the provider layer adds: routing, the RPM/TPM buckets, the breaker, the limiter, request
building, response validation and the ``ChatResponse``.

* ``bare_httpx``: ``httpx.AsyncClient.post`` of the same body, JSON parsed.
* ``router``: ``ProviderRouter.complete`` (non-streamed) through the full layer.
* ``bare_httpx_stream``: ``httpx.AsyncClient.stream`` of the same body with ``stream: true``,
  every byte read.
* ``router_stream``: ``ProviderRouter.complete`` streamed over SSE with an ``on_delta``
  callback (SSE parsing, chunk assembly, the stall bound per read).
* ``open_breaker``: ``ProviderRouter.complete`` with the provider's breaker held open: the
  time to fail with ``CircuitOpenError`` (no request leaves).

Run it through the benchmark runner (``NAME`` = ``provider_layer``), or directly:
``.venv/bin/python benchmarks/scenarios/provider_layer.py [--full]``.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import attrs

NAME = "provider_layer"
DESCRIPTION = (
    "added latency of the provider layer vs a bare httpx call to the same mock upstream "
    "(p50/p99), and fast-fail latency with an open breaker (p50/p99)"
)


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _summary(samples_s: list[float]) -> dict[str, float]:
    us = [x * 1e6 for x in samples_s]
    return {
        "n": len(us),
        "p50_us": round(_pct(us, 50), 1),
        "p99_us": round(_pct(us, 99), 1),
        "mean_us": round(statistics.fmean(us), 1),
        "max_us": round(max(us), 1),
    }


async def _measure(full: bool) -> dict[str, Any]:
    import httpx

    from exai.config import ProviderSettings, Secret, Settings
    from exai.errors import CircuitOpenError
    from exai.providers import ChatRequest, ProviderRouter
    from exai.testing import MockUpstream

    n = 3000 if full else 300
    n_fail = 50_000 if full else 5_000
    warmup = 50
    key = "bench-key"
    messages = [{"role": "user", "content": "ping"}]

    async with MockUpstream(models=("mock-bench",), api_key=key) as mock:
        base = Settings.from_env({}, env_file="", config_file="")
        prov = ProviderSettings(
            name="bench",
            kind="openai",
            base_url=mock.base_url,
            api_key=Secret(key),
            models=("mock-bench",),
            rpm=1e9,
            tpm=1e12,
            max_concurrency=8,
            pool_max=8,
        )
        settings = attrs.evolve(
            base,
            providers=(prov,),
            fast_models=("mock-bench",),
            quality_models=("mock-bench",),
        )
        body = {"model": "mock-bench", "messages": messages}
        headers = {"authorization": f"Bearer {key}"}
        req = ChatRequest(messages=messages, model="mock-bench", allow_fallback=False)

        async def on_delta(delta: Any) -> None:
            return None

        sreq = attrs.evolve(req, on_delta=on_delta)
        bare: list[float] = []
        bare_streamed: list[float] = []
        routed: list[float] = []
        streamed: list[float] = []
        sbody = {**body, "stream": True}
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with (
            httpx.AsyncClient(base_url=mock.base_url + "/", limits=limits) as http,
            ProviderRouter(settings) as router,
        ):
            for i in range(warmup + n):
                # Interleave the series so drift (GC, CPU frequency) hits both alike.
                t0 = time.perf_counter()
                r = await http.post("chat/completions", json=body, headers=headers)
                r.json()
                t1 = time.perf_counter()
                await router.complete(req)
                t2 = time.perf_counter()
                async with http.stream(
                    "POST", "chat/completions", json=sbody, headers=headers
                ) as sr:
                    async for _ in sr.aiter_bytes():
                        pass
                t3 = time.perf_counter()
                await router.complete(sreq)
                t4 = time.perf_counter()
                if i >= warmup:
                    bare.append(t1 - t0)
                    routed.append(t2 - t1)
                    bare_streamed.append(t3 - t2)
                    streamed.append(t4 - t3)

            sent_before = len(mock.requests)
            router.providers["bench"].breaker.open_until(3600)
            fails: list[float] = []
            for _ in range(n_fail):
                t0 = time.perf_counter()
                try:
                    await router.complete(req)
                except CircuitOpenError:
                    pass
                fails.append(time.perf_counter() - t0)
            leaked = len(mock.requests) - sent_before

    b, r_ = _summary(bare), _summary(routed)
    bs, s_ = _summary(bare_streamed), _summary(streamed)
    return {
        "bare_httpx": b,
        "router": r_,
        "added_p50_us": round(r_["p50_us"] - b["p50_us"], 1),
        "added_p99_us": round(r_["p99_us"] - b["p99_us"], 1),
        "bare_httpx_stream": bs,
        "router_stream": s_,
        "added_stream_p50_us": round(s_["p50_us"] - bs["p50_us"], 1),
        "added_stream_p99_us": round(s_["p99_us"] - bs["p99_us"], 1),
        "open_breaker": _summary(fails),
        "open_breaker_requests_reaching_upstream": leaked,
    }


def run(full: bool) -> dict[str, Any]:
    """Run the scenario in its own trio event loop and return the figures."""
    import trio

    return trio.run(_measure, full)


if __name__ == "__main__":
    import json

    print(json.dumps(run("--full" in sys.argv), indent=2))
