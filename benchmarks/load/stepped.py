"""Calls one at a time, in steps the orchestrator asks for (``benchmarks.insns``).

Config (JSON): ``mode`` (``mcp``: ``tools/call`` over one MCP WebSocket session; ``mcp_http``:
over the Streamable HTTP door, one keep-alive HTTP/1.1 connection), ``url``, ``token``
(``mcp``) or ``headers`` (``mcp_http``), ``tool``, ``arguments``, ``stream`` (the request asks
for progress: a progress token over WebSocket, an SSE answer over HTTP), ``warmup`` (calls
made before ``ready``).

It connects, makes ``warmup`` calls, writes ``{"event": "ready"}``; then each stdin line
``run N`` makes N calls one after the other and writes ``{"event": "ran", "n": N, "ok": k}``
(the ``step``-th such event carries ``"step": step``); ``close`` (or end of stdin) closes the
connection and writes the ``result``. The connection stays open between steps, so a step holds
calls and nothing else (no handshake, no session set-up).
"""

from __future__ import annotations

import json
from typing import Any

import trio

from benchmarks.load.common import McpConn, config, emit, outcome_of, stdin_lines
from benchmarks.load.rawhttp import RawHttpCaller


async def main(cfg: dict[str, Any]) -> None:
    mode = cfg.get("mode", "mcp")
    tool = cfg.get("tool", "chat")
    arguments = cfg.get("arguments", {"prompt": "ping", "model": "mock-fast"})
    stream = bool(cfg.get("stream"))
    async with trio.open_nursery() as nursery:
        closer: Any
        if mode == "mcp_http":
            envelope = {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            meta: dict[str, Any] = {**envelope, "progressToken": 1} if stream else envelope
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments, "_meta": meta},
            }
            accept = "application/json, text/event-stream" if stream else "application/json"
            h = {"Accept": accept, **(cfg.get("headers") or {})}
            caller = RawHttpCaller(cfg["url"], body, h, mcp=True)
            await caller.connect()
            call = caller
            closer = caller
        elif mode == "mcp":
            headers = (
                [(b"authorization", f"Bearer {cfg['token']}".encode())]
                if cfg.get("token")
                else None
            )
            conn = await McpConn.open(nursery, cfg["url"], extra_headers=headers)

            async def one_call() -> str:
                conn.next_id += 1
                rid = conn.next_id
                params: dict[str, Any] = {"name": tool, "arguments": arguments}
                if stream:
                    params["_meta"] = {"progressToken": rid}
                text = json.dumps(
                    {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}
                )
                return outcome_of(await conn.send_text(rid, text))

            call = one_call
            closer = conn
        else:
            raise SystemExit(f"stepped: unknown mode {mode!r}")

        async def run(n: int) -> int:
            ok = 0
            for _ in range(n):
                ok += (await call()) == "ok"
            return ok

        warm = int(cfg.get("warmup", 0))
        emit("ready", ok=await run(warm), n=warm)
        step = 0
        async for line in stdin_lines():
            if line.startswith("run "):
                n = int(line.split()[1])
                step += 1
                emit("ran", step=step, n=n, ok=await run(n))
            elif line == "close":
                break
        with trio.move_on_after(5):
            await closer.aclose()
        nursery.cancel_scope.cancel()
    emit("result", steps=step)


if __name__ == "__main__":
    trio.run(main, config())
