"""HTTP client variants: CPU per streamed chat request at 64 concurrent requests (issue 18).

One trio process (this one) makes the requests; the mock upstream runs in another process
(``python -m exai.testing.mock_upstream``, no injected latency), so the CPU measured here —
this process's own user + system time (:func:`time.process_time`) over a window, divided by the
requests completed in it — is the client's alone. Every variant runs once per round, in one
order (interleaved), so the machine's load falls on all of them alike.

One request = ``POST /v1/chat/completions`` with ``"stream": true`` and the body exai sends,
response head awaited, every body byte read (about 11 SSE events, chunked), the response closed
(the connection goes back to its pool). ``concurrency`` workers run closed loops.

Variants:

* ``httpx_pool`` — one ``httpx.AsyncClient`` with a pool of ``concurrency`` connections;
* ``httpx_shards`` — exai before issue 18: ``ceil(concurrency / 16)`` clients of 16 connections,
  each request on the client with the fewest requests in flight;
* ``httpx_single`` — one ``httpx.AsyncClient`` of one connection per worker;
* ``httpx_on_h11pool`` — one ``httpx.AsyncClient`` over :class:`exai.providers.transport.H11Pool`
  (an ``httpx.AsyncBaseTransport`` adapter, defined here);
* ``h11pool`` — :class:`~exai.providers.transport.H11Pool` used directly;
* ``openai_client`` — exai's :class:`~exai.providers.client.OpenAIClient` ``chat`` with an
  ``on_chunk`` callback: the request as the provider layer makes it, SSE decoded and assembled
  (what the daemon pays; compare it across commits).

Run: ``.venv/bin/python -m benchmarks run http_client [--full]``;
``EXAI_BENCH_HTTP_VARIANTS=httpx_pool,openai_client`` runs only those (e.g. on an older commit,
which has no ``H11Pool``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import httpx

NAME = "http_client"
DESCRIPTION = (
    "CPU per streamed chat request at 64 concurrent requests for each HTTP client variant "
    "(httpx pool, httpx shards, httpx single-connection clients, httpx on exai's h11 pool, "
    "exai's h11 pool, exai's OpenAIClient), against the mock upstream in another process"
)

BODY = {
    "model": "mock-fast",
    "messages": [{"role": "user", "content": "ping"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
VARIANTS = (
    "httpx_pool",
    "httpx_shards",
    "httpx_single",
    "httpx_on_h11pool",
    "h11pool",
    "openai_client",
)


def run(full: bool) -> dict[str, Any]:
    from benchmarks.daemon import machine_load, mock_upstream

    rounds, duration_s, warmup_s = (3, 6.0, 1.5) if full else (1, 2.0, 0.5)
    wanted = os.environ.get("EXAI_BENCH_HTTP_VARIANTS")
    variants = tuple(v for v in VARIANTS if not wanted or v in wanted.split(","))
    concurrency = 64
    with mock_upstream(latency_s=0.0) as mock:
        import trio

        load0 = machine_load()
        per: dict[str, list[tuple[float, int]]] = {v: [] for v in variants}
        loads = []
        for _ in range(rounds):
            for variant in variants:
                cpu, n = trio.run(
                    _series, variant, mock.base_url, concurrency, duration_s, warmup_s
                )
                per[variant].append((cpu, n))
            loads.append(machine_load())
    series = {}
    for variant, rs in per.items():
        cpu = sum(c for c, _ in rs)
        n = sum(k for _, k in rs)
        series[variant] = {
            "cpu_ms_per_request": round(1000 * cpu / n, 4) if n else None,
            "requests_per_s": round(n / (duration_s * len(rs)), 1),
            "requests": n,
            "per_round_cpu_ms": [round(1000 * c / k, 4) if k else None for c, k in rs],
        }
    return {
        "settings": {
            "rounds": rounds,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "concurrency": concurrency,
            "body": BODY,
        },
        "machine_load_at_start": load0,
        "machine_load_after_each_round": loads,
        "series": series,
    }


async def _series(
    variant: str, base_url: str, concurrency: int, duration_s: float, warmup_s: float
) -> tuple[float, int]:
    """Run one variant: ``concurrency`` closed loops; (CPU seconds, requests) in the window."""
    import trio

    async with _client(variant, base_url, concurrency) as make:
        state = {"count": False, "n": 0}
        stop = trio.Event()

        async def worker(i: int) -> None:
            one = make(i)
            while not stop.is_set():
                await one()
                if state["count"]:
                    state["n"] += 1

        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, i)
            await trio.sleep(warmup_s)
            cpu0 = time.process_time()
            state["count"] = True
            await trio.sleep(duration_s)
            state["count"] = False
            cpu = time.process_time() - cpu0
            n = state["n"]
            stop.set()
        return cpu, n


class _Ctx:
    """An async context manager around a ``make(i) -> one()`` factory and its cleanup."""

    def __init__(self, make: Any, closers: list[Any]) -> None:
        self.make = make
        self.closers = closers

    async def __aenter__(self) -> Any:
        return self.make

    async def __aexit__(self, *exc: object) -> None:
        for close in self.closers:
            await close()


def _client(variant: str, base_url: str, concurrency: int) -> Any:
    payload = json.dumps(BODY, ensure_ascii=False).encode()
    headers = {
        "accept": "text/event-stream",
        "content-type": "application/json",
        "authorization": "Bearer bench",
    }
    url = base_url.rstrip("/") + "/chat/completions"

    def httpx_client(n: int, transport: Any = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=httpx.Timeout(None, connect=5.0),
            transport=transport,
            trust_env=False,
        )

    def via_httpx(pick: Any) -> Any:
        def make(i: int) -> Any:
            async def one() -> None:
                client = pick(i)
                req = client.build_request("POST", url, content=payload, headers=headers)
                resp = await client.send(req, stream=True)
                try:
                    async for _ in resp.aiter_bytes():
                        pass
                finally:
                    await resp.aclose()

            return one

        return make

    if variant == "httpx_pool":
        c = httpx_client(concurrency)
        return _Ctx(via_httpx(lambda i: c), [c.aclose])
    if variant == "httpx_shards":
        shards = [httpx_client(16) for _ in range(-(-concurrency // 16))]
        inflight = [0] * len(shards)

        def make_sharded(i: int) -> Any:
            async def one() -> None:
                k = min(range(len(inflight)), key=inflight.__getitem__)
                inflight[k] += 1
                try:
                    client = shards[k]
                    req = client.build_request("POST", url, content=payload, headers=headers)
                    resp = await client.send(req, stream=True)
                    try:
                        async for _ in resp.aiter_bytes():
                            pass
                    finally:
                        await resp.aclose()
                finally:
                    inflight[k] -= 1

            return one

        return _Ctx(make_sharded, [s.aclose for s in shards])
    if variant == "httpx_single":
        singles = [httpx_client(1) for _ in range(concurrency)]
        return _Ctx(via_httpx(lambda i: singles[i]), [s.aclose for s in singles])
    if variant in ("httpx_on_h11pool", "h11pool"):
        from exai.providers.transport import H11Pool

        origin = base_url.split("/v1")[0]
        pool = H11Pool(
            origin if variant == "httpx_on_h11pool" else base_url,
            max_connections=concurrency,
            connect_timeout_s=5.0,
            write_timeout_s=60.0,
            headers={"user-agent": "exai"},
        )
        if variant == "httpx_on_h11pool":
            c = httpx_client(concurrency, transport=_H11Transport(pool))
            return _Ctx(
                via_httpx(lambda i: c), [c.aclose, lambda: pool.__aexit__(None, None, None)]
            )
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]

        def make_pool(i: int) -> Any:
            async def one() -> None:
                resp = await pool.request("POST", "chat/completions", raw, payload)
                try:
                    async for _ in resp.aiter_bytes():
                        pass
                finally:
                    await resp.aclose()

            return one

        return _Ctx(make_pool, [lambda: pool.__aexit__(None, None, None)])
    if variant == "openai_client":
        return _OpenAIClientCtx(base_url, concurrency)
    raise ValueError(variant)


class _OpenAIClientCtx:
    def __init__(self, base_url: str, concurrency: int) -> None:
        from exai.config import ProviderSettings, Secret
        from exai.providers.client import OpenAIClient

        settings = ProviderSettings(
            name="bench",
            kind="openai",
            base_url=base_url,
            api_key=Secret("bench"),
            models=("mock-fast",),
            max_concurrency=concurrency,
            pool_max=concurrency,
        )
        self.client = OpenAIClient(settings)

    async def __aenter__(self) -> Any:
        await self.client.__aenter__()

        async def on_chunk(text: str, thought: str) -> None:
            pass

        def make(i: int) -> Any:
            async def one() -> None:
                await self.client.chat(dict(BODY), on_chunk=on_chunk)

            return one

        return make

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(None, None, None)


class _H11Transport(httpx.AsyncBaseTransport):
    """``httpx.AsyncBaseTransport`` over an :class:`H11Pool` (the benchmark's adapter)."""

    _SKIP = frozenset({b"host", b"content-length", b"user-agent", b"accept-encoding"})

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def handle_async_request(self, request: Any) -> Any:
        headers = [(k.lower(), v) for k, v in request.headers.raw if k.lower() not in self._SKIP]
        body = await request.aread()
        resp = await self.pool.request(
            request.method, request.url.raw_path.decode("ascii"), headers, body
        )
        return httpx.Response(
            resp.status_code,
            headers=resp.raw_headers,
            stream=_Stream(resp),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        pass


class _Stream(httpx.AsyncByteStream):
    def __init__(self, resp: Any) -> None:
        self.resp = resp

    async def __aiter__(self) -> Any:  # type: ignore[override]
        async for chunk in self.resp.aiter_bytes():
            yield chunk

    async def aclose(self) -> None:
        await self.resp.aclose()


if __name__ == "__main__":
    import sys

    print(json.dumps(run("--full" in sys.argv), indent=2))
