"""The HTTP door's floor: a bare h11 server on trio that answers every POST with its own body.

The same HTTP library, the same keep-alive HTTP/1.1 and the same response framing as the
daemon's Streamable HTTP door, no MCP, no JSON parsing, no limits:

* ``Accept`` without ``text/event-stream`` → ``200 application/json`` with the request body;
* with it → ``200 text/event-stream`` (chunked) carrying one small notification event and then
  the request body as the final event — the shape of a ``chat`` call's SSE answer (a progress
  notification, then the response).

Prints ``http-echo: listening on http://127.0.0.1:PORT/mcp`` on stderr.
"""

from __future__ import annotations

import sys

import h11
import trio

from benchmarks.load.common import raise_nofile

_NOTE = (
    b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":1,"progress":0}}\n\n'
)


async def handler(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            body = b""
            request: h11.Request | None = None
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            assert request is not None
            accept = b",".join(v for k, v in request.headers if k == b"accept")
            if b"text/event-stream" in accept:
                out = conn.send(
                    h11.Response(status_code=200, headers=[("Content-Type", "text/event-stream")])
                )
                out += conn.send(h11.Data(data=_NOTE))
                out += conn.send(h11.Data(data=b"event: message\ndata: " + body + b"\n\n"))
            else:
                out = conn.send(
                    h11.Response(
                        status_code=200,
                        headers=[
                            ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))),
                        ],
                    )
                )
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def main() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    port = listeners[0].socket.getsockname()[1]
    print(f"http-echo: listening on http://127.0.0.1:{port}/mcp", file=sys.stderr, flush=True)
    await trio.serve_listeners(handler, listeners)


if __name__ == "__main__":
    raise_nofile()
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
