"""The answers' egress between the provider pool and the mock upstream, two mock trees side by side.

Usage::

    .venv/bin/python -m benchmarks.mock_egress BEFORE_TREE AFTER_TREE [--rounds 5] [--calls 1000]

For each tree in turn (interleaved rounds), the mock upstream runs as a process from that tree
(``python -m exai.testing.mock_upstream``, latency 1 s) and this process — the same code for
both: this tree's :class:`exai.providers.transport.H11Pool` — sends ``--calls`` streamed chat
requests at once (a new connection each, as in a storm) and reads every answer to its end.
Per round it prints one JSON line: ``client_ms_per_req`` (this process's CPU time ÷ calls,
milliseconds), ``mock_ms_per_req`` (the mock's CPU time, ``/proc/<pid>/stat``, from after its
start-up to after the pool closed ÷ calls), ``reads_per_answer`` (socket reads the pool made
per answer: waits for the socket and the reads after them) and the machine's load.

A measuring tool for the mock's write pattern (``benchmarks/README.md``, part 11), not a
scenario: the daemon's own figures come from :mod:`benchmarks.storm_intake`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from exai.providers import transport

BODY = json.dumps(
    {"model": "mock-fast", "messages": [{"role": "user", "content": "ping"}], "stream": True}
).encode()
MOCK_ARGS = ("--latency-s", "1", "--models", "mock-fast")
HEADERS = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream")]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Reads:
    """Counts :func:`exai.providers.transport._fill` (one wait and read of a socket)."""

    def __init__(self) -> None:
        self.n = 0
        self._fill = transport._fill

    async def __call__(self, conn: Any) -> None:
        self.n += 1
        await self._fill(conn)


async def _storm(base_url: str, calls: int) -> None:
    pool = transport.H11Pool(
        base_url, max_connections=calls, connect_timeout_s=30, write_timeout_s=30
    )
    async with pool:

        async def one() -> None:
            response = await pool.request("POST", "chat/completions", HEADERS, BODY)
            async with response:
                async for _ in response.aiter_bytes():
                    pass

        async with trio.open_nursery() as nursery:
            for _ in range(calls):
                nursery.start_soon(one)


def one_round(tree: Path, calls: int, reads: _Reads) -> dict[str, float]:
    """One storm against a mock upstream run from ``tree``; the figures of the docstring."""
    mock = subprocess.Popen(
        [sys.executable, "-m", "exai.testing.mock_upstream", *MOCK_ARGS],
        cwd=tree,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert mock.stderr is not None
        line = mock.stderr.readline()  # "mock-upstream: listening on http://…"
        base_url = line.rsplit(" ", 1)[-1].strip()
        time.sleep(0.3)
        reads.n = 0
        m0, c0 = _cpu_s(mock.pid), time.process_time()
        trio.run(_storm, base_url, calls)
        m1, c1 = _cpu_s(mock.pid), time.process_time()
    finally:
        mock.terminate()
        mock.wait()
    return {
        "client_ms_per_req": round((c1 - c0) / calls * 1000, 3),
        "mock_ms_per_req": round((m1 - m0) / calls * 1000, 3),
        "reads_per_answer": round(reads.n / calls, 2),
        "machine_load": os.getloadavg()[0],
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.mock_egress", description=__doc__.split("\n")[0]
    )
    ap.add_argument("before", type=Path, help="the tree the first mock runs from")
    ap.add_argument("after", type=Path, help="the tree the second mock runs from")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args(argv)
    reads = _Reads()
    transport._fill = reads  # type: ignore[assignment]
    for _ in range(args.rounds):
        for name, tree in (("before", args.before), ("after", args.after)):
            figures = one_round(tree.resolve(), args.calls, reads)
            print(json.dumps({"tree": name, "at": time.strftime("%H:%M:%S"), **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
