"""Closed-loop load: workers that each send a call, wait for its answer, and go again.

Modes:

``mcp``
    ``tools/call`` of ``tool`` (default ``chat``) over MCP WebSocket sessions to the daemon.
``echo``
    the same request frame to the floor's bare trio-websocket echo server.
``http_raw``
    the same POST over hand-written keep-alive HTTP/1.1 (one TCP stream per worker): the
    exchange without any client library.
``httpx``
    ``POST {url}/chat/completions`` with the body the provider would send, from one
    ``httpx.AsyncClient`` whose pool holds ``connections`` connections.

Config (JSON): ``mode``, ``url``, ``connections`` (sessions or pool size), ``inflight`` (workers
per connection), ``duration_s``, ``warmup_s`` (calls sent before it are not recorded),
``think_s`` (pause after each call), ``prompt``, ``model``, ``tool``, ``arguments``,
``start_at`` (``time.monotonic()`` to begin at, to line up with the orchestrator),
``until_stop`` (run until a ``stop`` line on stdin instead of for ``duration_s``),
``calls_per_worker`` (each worker stops after that many calls).

Result: per-call records (send time, latency, outcome) of the measured window, its start and end.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from benchmarks.load.common import (
    McpConn,
    Records,
    config,
    emit,
    now,
    outcome_of,
    raise_nofile,
    stdin_lines,
)


async def _raw_http_caller(base_url: str, prompt: str, model: str) -> Any:
    """A keep-alive HTTP/1.1 connection written by hand: the cost of the exchange itself."""
    from urllib.parse import urlsplit

    u = urlsplit(base_url)
    stream = await trio.open_tcp_stream(u.hostname or "127.0.0.1", u.port or 80)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}]})
    request = (
        f"POST {u.path}/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()

    async def one_call() -> str:
        await stream.send_all(request)
        buf = b""
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise trio.BrokenResourceError("closed")
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep:
                continue
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(rest) >= length:
                json.loads(rest[:length])
                status = int(head.split(b" ", 2)[1])
                return "ok" if status == 200 else f"http_{status}"

    return one_call


async def main(cfg: dict[str, Any]) -> None:
    mode = cfg.get("mode", "mcp")
    url = cfg["url"]
    connections = int(cfg.get("connections", 1))
    inflight = int(cfg.get("inflight", 1))
    duration_s = float(cfg.get("duration_s", 5.0))
    warmup_s = float(cfg.get("warmup_s", 0.5))
    think_s = float(cfg.get("think_s", 0.0))
    prompt = cfg.get("prompt", "ping")
    model = cfg.get("model", "mock-fast")
    tool = cfg.get("tool", "chat")
    arguments = cfg.get("arguments", {"prompt": prompt, "model": model})
    recs = Records()
    errors: dict[str, int] = {}

    async with trio.open_nursery() as nursery:
        if mode == "httpx":
            import httpx

            limits = httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections
            )
            client = httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0)
            body = {"model": model, "messages": [{"role": "user", "content": prompt}]}

            async def one_call() -> str:
                r = await client.post("/chat/completions", json=body)
                r.json()
                return "ok" if r.status_code == 200 else f"http_{r.status_code}"

            callers = [one_call] * (connections * inflight)
        elif mode == "http_raw":
            callers = [
                await _raw_http_caller(url, prompt, model)
                for _ in range(connections)
                for _ in range(inflight)
            ]
        else:
            conns: list[McpConn] = []
            for _ in range(connections):
                conns.append(await McpConn.open(nursery, url, echo=(mode == "echo")))

            def make(conn: McpConn) -> Any:
                async def one_call() -> str:
                    conn.next_id += 1
                    rid = conn.next_id
                    text = json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": rid,
                            "method": "tools/call",
                            "params": {"name": tool, "arguments": arguments},
                        }
                    )
                    return outcome_of(await conn.send_text(rid, text))

                return one_call

            callers = [make(c) for c in conns for _ in range(inflight)]

        emit("ready", workers=len(callers), t=now())
        start_at = float(cfg.get("start_at") or 0.0)
        if start_at > now():
            await trio.sleep(start_at - now())
        t0 = now()
        measure_from = t0 + warmup_s
        stop_at = t0 + warmup_s + duration_s

        stopped = trio.Event()
        if cfg.get("until_stop"):
            stop_at = float("inf")

            async def wait_stop() -> None:
                async for line in stdin_lines():
                    if line == "stop":
                        break
                stopped.set()

            nursery.start_soon(wait_stop)

        per_worker = int(cfg.get("calls_per_worker") or 0)

        async def worker(call: Any) -> None:
            made = 0
            while True:
                t = now()
                if t >= stop_at or stopped.is_set() or (per_worker and made >= per_worker):
                    return
                made += 1
                try:
                    outcome = await call()
                except Exception as exc:  # a broken connection is a figure, not a crash
                    outcome = f"exception:{type(exc).__name__}"
                    errors[outcome] = errors.get(outcome, 0) + 1
                    await trio.sleep(0.01)
                done = now()
                if t >= measure_from:
                    recs.add(t, done - t, outcome)
                if think_s:
                    await trio.sleep(think_s)

        async with trio.open_nursery() as workers:
            for call in callers:
                workers.start_soon(worker, call)
        t_end = now()
        if mode == "httpx":
            await client.aclose()
        elif mode != "http_raw":
            for c in conns:
                with trio.move_on_after(1):
                    await c.aclose()
        nursery.cancel_scope.cancel()
    emit(
        "result",
        mode=mode,
        workers=len(callers),
        measure_from=measure_from,
        stop_at=stop_at,
        t_end=t_end,
        exceptions=errors,
        records=recs.to_json(),
    )


if __name__ == "__main__":
    raise_nofile()
    trio.run(main, config())
