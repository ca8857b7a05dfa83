"""The attacker of ``test_ten_thousand_concurrent_posts_past_the_cap...``, as a process of its own.

Usage: ``python tests/adversarial/post_burst.py HOST PORT N IN_FLIGHT`` with one HTTP request
on stdin: sends the request on ``N`` connections, ``IN_FLIGHT`` of them open at once, reads each
status line and prints ``{"<status>": count, ...}`` as JSON on stdout. ``503`` counts only
answers that carry ``Retry-After: 1``; a connection that fails counts as ``connect <errno>`` or
``none:<eof|broken errno>:<line>``.

``IN_FLIGHT`` stays within what the kernel queues for a listener (its SYN backlog): with more
connections at once than that, a loaded daemon that has not accepted them within the kernel's
SYN-ACK retries (about a minute) sees the kernel itself reset them, which says nothing about
the daemon.

In its own process, its ten thousand tasks do not share an event loop with the well-behaved
client the test runs meanwhile: that client's answers then show what the daemon does, not how
busy the test's own loop was.
"""

from __future__ import annotations

import json
import sys

import trio


async def post_and_read_status(host: str, port: int, data: bytes, statuses: dict[str, int]) -> None:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        statuses[f"connect {exc.errno}"] = statuses.get(f"connect {exc.errno}", 0) + 1
        return
    async with stream:
        reply = b""
        failed = ""
        try:
            await stream.send_all(data)
            while b"\r\n" not in reply:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    failed = "eof"
                    break
                reply += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failed = f"broken {getattr(exc.__cause__, 'errno', '')}"
        line = reply.split(b"\r\n", 1)[0].decode("latin-1")
        key = line.split(" ")[1] if line.startswith("HTTP/1.1 ") else f"none:{failed}:{line[:20]}"
        if key == "503" and b"retry-after:" not in reply.lower() and b"\r\n\r\n" not in reply:
            reply += await stream.receive_some(4096)
        if key == "503" and b"retry-after: 1" not in reply.lower():
            key = "503 without Retry-After"
        statuses[key] = statuses.get(key, 0) + 1


async def main(host: str, port: int, n: int, in_flight: int, data: bytes) -> None:
    statuses: dict[str, int] = {}
    slots = trio.Semaphore(in_flight)

    async def one() -> None:
        try:
            await post_and_read_status(host, port, data, statuses)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            await slots.acquire()
            nursery.start_soon(one)
    print(json.dumps(statuses), flush=True)


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[2:5]]
    trio.run(main, sys.argv[1], *args, sys.stdin.buffer.read())
