"""One client flooding the daemon: requests as fast as its socket takes them, no waiting.

A sender writes ``tools/call`` frames back to back; a reader counts the answers by outcome. When
the daemon closes the connection (``session_abuse_limit`` rate-limited messages in a row close
it with 1008) the flooder reconnects at once and goes on, like a misbehaving client would.

Config: ``url``, ``duration_s``, ``start_at`` (``time.monotonic()``), ``tool``, ``arguments``.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, connect_websocket_url

from benchmarks.load.common import config, emit, now, outcome_of, raise_nofile


async def main(cfg: dict[str, Any]) -> None:
    url = cfg["url"]
    duration_s = float(cfg.get("duration_s", 5.0))
    tool = cfg.get("tool", "chat")
    arguments = cfg.get("arguments", {"prompt": "flood", "model": "mock-fast"})
    outcomes: dict[str, int] = {}
    closes: dict[str, int] = {}
    sent = 0
    connects = 0
    refused = 0
    emit("ready")
    start_at = float(cfg.get("start_at") or 0.0)
    if start_at > now():
        await trio.sleep(start_at - now())
    t0 = now()
    with trio.move_on_after(duration_s):
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    conn = await connect_websocket_url(
                        nursery, url, subprotocols=["mcp"], max_message_size=64 * 1024 * 1024
                    )
                    connects += 1

                    async def reader(conn: Any = conn) -> None:
                        while True:
                            msg = json.loads(await conn.get_message())
                            if "id" in msg and "method" not in msg:
                                o = outcome_of(msg)
                                outcomes[o] = outcomes.get(o, 0) + 1

                    nursery.start_soon(reader)
                    rid = 0
                    while True:
                        rid += 1
                        text = json.dumps(
                            {
                                "jsonrpc": "2.0",
                                "id": rid,
                                "method": "tools/call",
                                "params": {"name": tool, "arguments": arguments},
                            }
                        )
                        await conn.send_message(text)
                        sent += 1
            except* ConnectionClosed as group:
                for exc in group.exceptions:
                    reason = getattr(exc, "reason", None)
                    code = str(reason.code) if reason else "?"
                    closes[code] = closes.get(code, 0) + 1
            except* (HandshakeError, OSError):
                refused += 1
                await trio.sleep(0.01)
    elapsed = now() - t0
    emit(
        "result",
        sent=sent,
        elapsed_s=elapsed,
        sent_per_s=sent / max(elapsed, 1e-9),
        answered=outcomes,
        closes=closes,
        connects=connects,
        refused_connects=refused,
    )


if __name__ == "__main__":
    raise_nofile()
    trio.run(main, config())
