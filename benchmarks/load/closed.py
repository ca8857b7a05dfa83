"""Closed-loop load: workers that each send a call, wait for its answer, and go again.

Modes:

``mcp``
    ``tools/call`` of ``tool`` (default ``chat``) over MCP WebSocket sessions to the daemon;
    with ``progress`` the request carries ``_meta.progressToken`` (the client asks for the
    answer's progress while it streams).
``echo``
    the same request frame to the floor's bare trio-websocket echo server.
``mcp_http``
    ``tools/call`` of ``tool`` over exai's Streamable HTTP door (``url`` is its ``http://…/mcp``;
    2026-07-28, stateless; a hand-written keep-alive HTTP/1.1 client per worker); with ``stream``
    the request asks for progress and accepts ``text/event-stream``, so the answer is an SSE
    stream. The same POST to the HTTP echo floor (:mod:`benchmarks.load.http_echo_server`).
``http`` / ``http_raw``
    a POST over hand-written keep-alive HTTP/1.1 (:mod:`benchmarks.load.rawhttp`, one TCP stream
    per worker): the exchange without any client library. ``http`` posts to ``url`` itself with
    ``headers`` and, with ``stream``, asks for and decodes an SSE answer; ``http_raw`` posts the
    provider's body to ``{url}/chat/completions``.
``httpx``
    ``POST {url}/chat/completions`` with the body the provider would send, from one
    ``httpx.AsyncClient`` whose pool holds ``connections`` connections.
``sqlite`` / ``sqlite_thread``
    one durable commit of a chat call's two turns (:mod:`benchmarks.load.sqlite_floor`) into
    ``db_path``, on the loop thread or handed to a worker thread (``trio.to_thread``, one at a
    time, as exai's store does).

Config (JSON): ``mode``, ``url``, ``connections`` (sessions or pool size), ``inflight`` (workers
per connection), ``duration_s``, ``warmup_s`` (calls sent before it are not recorded),
``think_s`` (pause after each call), ``prompt``, ``model``, ``tool``, ``arguments``,
``start_at`` (``time.monotonic()`` to begin at, to line up with the orchestrator),
``until_stop`` (run until a ``stop`` line on stdin instead of for ``duration_s``),
``calls_per_worker`` (each worker stops after that many calls), ``idempotency`` (each call
carries an ``exai/idempotencyKey`` as ``exai bridge`` sends it), ``token`` (a bearer token sent
with the WebSocket upgrade), ``headers``/``stream``/``body`` (``http``), ``db_path`` (sqlite),
``cpu_pids`` (see below).

Metering: with ``cpu_pids`` (process ids, or ``"self"`` for this process) the load reads each
process's CPU time (user + system, its child processes included) when the measured window opens
(after the warm-up) and when it closes (``duration_s`` later, before the calls in flight drain),
and counts the calls that *completed* inside the window. In a steady closed loop the work in
flight at both edges is alike, so CPU ÷ completions is the CPU per call of each process — a
figure that holds on a shared machine, where wall-clock rates do not. The window closes no
earlier than ``duration_s`` after it opened and not before one call has completed in it (on a
busy machine a short window can otherwise hold none), and the workers keep the loop going until
it has closed, so the close is read with the load still running.

Result: per-call records (send time, latency, outcome) of calls sent in the measured window, its
start and end, and with ``cpu_pids`` a ``meter`` (``window_s``, ``completed``, ``completed_ok``,
``cpu_s`` per pid, ``cpu_total_s``).
"""

from __future__ import annotations

import json
import os
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
from benchmarks.load.rawhttp import RawHttpCaller


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process and its live children, now."""
    import psutil

    out: dict[int, float] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        out[pid] = total
    return out


def _sqlite_callers(cfg: dict[str, Any], n: int, threaded: bool) -> list[Any]:
    from benchmarks.load.sqlite_floor import commit_two_turns, open_db

    conn = open_db(cfg["db_path"])
    prompt = cfg.get("prompt", "ping")
    answer = f"mock:{cfg.get('model', 'mock-fast')}: {prompt}"
    limiter = trio.CapacityLimiter(1)

    async def on_loop() -> str:
        commit_two_turns(conn, prompt, answer)
        await trio.lowlevel.checkpoint()
        return "ok"

    async def in_thread() -> str:
        await trio.to_thread.run_sync(commit_two_turns, conn, prompt, answer, limiter=limiter)
        return "ok"

    return [in_thread if threaded else on_loop] * n


async def main(cfg: dict[str, Any]) -> None:
    mode = cfg.get("mode", "mcp")
    url = cfg.get("url", "")
    connections = int(cfg.get("connections", 1))
    inflight = int(cfg.get("inflight", 1))
    duration_s = float(cfg.get("duration_s", 5.0))
    warmup_s = float(cfg.get("warmup_s", 0.5))
    think_s = float(cfg.get("think_s", 0.0))
    prompt = cfg.get("prompt", "ping")
    model = cfg.get("model", "mock-fast")
    tool = cfg.get("tool", "chat")
    arguments = cfg.get("arguments", {"prompt": prompt, "model": model})
    progress = bool(cfg.get("progress"))
    idempotent = bool(cfg.get("idempotency"))
    run_id = os.urandom(8).hex()
    raw_pids = cfg.get("cpu_pids") or []
    cpu_pids = [os.getpid() if p == "self" else int(p) for p in raw_pids]
    recs = Records()
    errors: dict[str, int] = {}
    http_callers: list[RawHttpCaller] = []

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
        elif mode == "mcp_http":
            # tools/call over exai's Streamable HTTP door (2026-07-28, stateless), or the same
            # POST to its echo floor; JSON answers, or SSE with ``stream`` (the request asks
            # for progress and accepts text/event-stream)
            sse = bool(cfg.get("stream"))
            envelope = {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            meta: dict[str, Any] = {**envelope, "progressToken": 1} if sse else envelope
            call = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments, "_meta": meta},
            }
            accept = "application/json, text/event-stream" if sse else "application/json"
            h = {"Accept": accept, **(cfg.get("headers") or {})}
            http_callers = [
                RawHttpCaller(url, call, h, mcp=True) for _ in range(connections * inflight)
            ]
            for c in http_callers:
                await c.connect()
            callers = list(http_callers)
        elif mode in ("http", "http_raw"):
            stream = bool(cfg.get("stream")) and mode == "http"
            body = cfg.get("body") or {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
            }
            if stream:
                body = {**body, "stream": True}
            target = url if mode == "http" else url + "/chat/completions"
            headers = cfg.get("headers") or {}
            http_callers = [
                RawHttpCaller(target, body, headers, stream=stream)
                for _ in range(connections * inflight)
            ]
            for c in http_callers:
                await c.connect()
            callers = list(http_callers)
        elif mode in ("sqlite", "sqlite_thread"):
            callers = _sqlite_callers(cfg, connections * inflight, mode == "sqlite_thread")
        else:
            conns: list[McpConn] = []
            headers_ws = (
                [(b"authorization", f"Bearer {cfg['token']}".encode())]
                if cfg.get("token")
                else None
            )
            for _ in range(connections):
                conns.append(
                    await McpConn.open(
                        nursery, url, echo=(mode == "echo"), extra_headers=headers_ws
                    )
                )

            def make(conn: McpConn) -> Any:
                async def one_call() -> str:
                    conn.next_id += 1
                    rid = conn.next_id
                    params: dict[str, Any] = {"name": tool, "arguments": arguments}
                    meta: dict[str, Any] = {}
                    if progress:
                        meta["progressToken"] = rid
                    if idempotent:
                        # what exai bridge adds to every call (exactly-once across daemons)
                        meta["exai/idempotencyKey"] = f"{run_id}:{id(conn)}:{rid}"
                    if meta:
                        params["_meta"] = meta
                    text = json.dumps(
                        {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}
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

        # the metered window: [opened, closed] as read, completions counted by the workers
        meter: dict[str, Any] = {"opened": None, "closed": None, "completed": 0, "ok": 0}
        cpu_at: list[dict[int, float]] = []
        # Set once the window's closing reading is taken. The workers look at their own clock
        # (``now``), not trio's: without this they could all stop, and the nursery be cancelled,
        # before trio woke the metering task for its closing reading (no ``meter`` at all).
        window_closed = trio.Event()
        completed_in_window = trio.Event()

        async def metering() -> None:
            await trio.sleep(max(0.0, measure_from - now()))
            cpu_at.append(cpu_seconds(cpu_pids))
            meter["opened"] = now()
            await trio.sleep(max(0.0, stop_at - now()))
            await completed_in_window.wait()
            cpu_at.append(cpu_seconds(cpu_pids))
            meter["closed"] = now()
            window_closed.set()

        if cpu_pids and stop_at != float("inf"):
            nursery.start_soon(metering)
        else:
            window_closed.set()

        per_worker = int(cfg.get("calls_per_worker") or 0)

        async def worker(call: Any) -> None:
            made = 0
            while True:
                t = now()
                if (
                    (t >= stop_at and window_closed.is_set())
                    or stopped.is_set()
                    or (per_worker and made >= per_worker)
                ):
                    return
                made += 1
                # sent in the measured window (which may stay open past stop_at, see above)
                in_window = t >= measure_from and (t < stop_at or not window_closed.is_set())
                try:
                    outcome = await call()
                except Exception as exc:  # a broken connection is a figure, not a crash
                    outcome = f"exception:{type(exc).__name__}"
                    errors[outcome] = errors.get(outcome, 0) + 1
                    await trio.sleep(0.01)
                done = now()
                if in_window:
                    recs.add(t, done - t, outcome)
                if meter["opened"] is not None and meter["closed"] is None:
                    meter["completed"] += 1
                    meter["ok"] += outcome == "ok"
                    completed_in_window.set()
                if think_s:
                    await trio.sleep(think_s)

        async with trio.open_nursery() as workers:
            for call in callers:
                workers.start_soon(worker, call)
        t_end = now()
        if mode == "httpx":
            await client.aclose()
        elif http_callers:
            for c in http_callers:
                await c.aclose()
        elif mode not in ("sqlite", "sqlite_thread"):
            for c in conns:
                with trio.move_on_after(1):
                    await c.aclose()
        nursery.cancel_scope.cancel()
    extra: dict[str, Any] = {}
    if len(cpu_at) == 2:
        # a process that ended inside the window has no reading at its close: left out
        cpu_s = {
            str(pid): round(cpu_at[1][pid] - cpu_at[0][pid], 4)
            for pid in cpu_at[1]
            if pid in cpu_at[0]
        }
        extra["meter"] = {
            "window_s": round(meter["closed"] - meter["opened"], 4),
            "completed": meter["completed"],
            "completed_ok": meter["ok"],
            "cpu_s": cpu_s,
            # None, not a smaller sum, when a process could not be read at both edges
            "cpu_total_s": round(sum(cpu_s.values()), 4) if len(cpu_s) == len(cpu_pids) else None,
        }
    emit(
        "result",
        mode=mode,
        workers=len(callers),
        measure_from=measure_from,
        stop_at=stop_at,
        t_end=t_end,
        exceptions=errors,
        records=recs.to_json(),
        **extra,
    )


if __name__ == "__main__":
    raise_nofile()
    trio.run(main, config())
