"""The floor: a bare trio-websocket server that sends every text frame straight back.

Same library, same subprotocol and message-size settings as the daemon's listener, no MCP, no
JSON parsing, no limits. Prints ``echo: listening on ws://127.0.0.1:PORT/mcp`` on stderr.
"""

from __future__ import annotations

import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from benchmarks.load.common import raise_nofile


async def handler(request: WebSocketRequest) -> None:
    conn = await request.accept(subprotocol="mcp")
    try:
        while True:
            await conn.send_message(await conn.get_message())
    except ConnectionClosed:
        pass


async def main() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler,
                "127.0.0.1",
                0,
                ssl_context=None,
                max_message_size=4 * 1024 * 1024,
                task_status=task_status,
            )
        )
        print(f"echo: listening on ws://127.0.0.1:{server.port}/mcp", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise_nofile()
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
