"""One ``tools/call`` over a fresh MCP session: ``{"url", "name", "arguments"}`` → the response."""

from __future__ import annotations

from typing import Any

import trio

from benchmarks.load.common import McpConn, config, emit


async def main(cfg: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(float(cfg.get("limit_s", 30))):
            conn = await McpConn.open(nursery, cfg["url"])
            resp = await conn.request(
                "tools/call", {"name": cfg["name"], "arguments": cfg.get("arguments") or {}}
            )
            await conn.aclose()
        nursery.cancel_scope.cancel()
    emit("result", response=resp)


if __name__ == "__main__":
    trio.run(main, config())
