"""Where the daemon's time goes: py-spy's collapsed stacks bucketed by subsystem.

Input: ``py-spy record --format raw --threads`` output (one line per distinct stack,
``thread (…);frame;frame;… <count>``, root first; a frame is ``function (path:line)``). Idle
samples are not in it (py-spy leaves them out unless ``--idle``), so a share is of the time a
thread was *running* Python.

Threads: a stack with a frame of trio's run loop (``trio/_core/_run.py``) is the event-loop
thread's; every other stack is a worker thread's (SQLite writes handed off with
``to_thread``, DNS…) — including the time a worker waits for its next job when py-spy counts
that wait as running. Shares are of the loop
thread's samples; the worker threads' samples are reported beside them, relative to the loop's.

Each loop-thread sample goes to the subsystem of its **innermost** frame that belongs to one
(:data:`SUBSYSTEMS`, first match in that order for a frame), looking only at the frames the trio
run loop called (below its ``unrolled_run``): standard-library frames (``json``, ``contextlib``;
``logging`` excepted) and trio's own (checkpoints, cancel scopes) count for the nearest caller
that belongs to a subsystem. A sample in the run loop itself (epoll, scheduling, no task step)
is "trio loop / epoll".

Command line: ``python -m benchmarks.profile_shares FILE[.gz]`` prints the table.
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path
from typing import Any

#: (subsystem, path fragments) — a frame whose file path starts with a fragment (or has it after
#: a ``/``) belongs to it; py-spy prints paths relative to their ``sys.path`` entry
SUBSYSTEMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # trio calls instruments only because the stall detector installed them
    (
        "stall detector (instrument hooks)",
        ("exai/server/stalls.py", "trio/_core/_instrumentation.py"),
    ),
    ("logging", ("logging/", "exai/logs.py")),
    ("metrics", ("prometheus_client/", "exai/server/metrics.py")),
    (
        "storage and its thread hand-off",
        ("exai/storage/", "exai/server/services.py", "trio/_threads.py", "anyio/to_thread.py"),
    ),
    # the HTTP client: httpx's stack before issue 18, exai's own h11 pool after it
    (
        "httpx / httpcore / h11",
        ("httpx/", "httpcore/", "h11/", "exai/providers/transport.py"),
    ),
    ("provider layer (router, breaker, SSE)", ("exai/providers/", "exai/resilience/")),
    (
        "WebSocket / session",
        ("trio_websocket/", "wsproto/", "exai/server/session.py", "exai/server/wsconn.py"),
    ),
    ("JSON-RPC and dispatch", ("exai/server/", "exai/config/hygiene.py")),
    ("tools (chat)", ("exai/tools/",)),
    ("other exai", ("exai/",)),
)
TRIO_LOOP = "trio loop / epoll (no task running)"
TRIO_IN_TASK = "trio inside a task (checkpoints, scopes, channels)"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")
#: the run loop's frame that calls into a task step or an instrument
_RUN_LOOP = "unrolled_run"


def _path(frame: str) -> str:
    m = _FRAME.match(frame)
    return m.group("path") if m else frame


def _belongs(path: str, fragment: str) -> bool:
    return path.startswith(fragment) or ("/" + fragment) in path


def _classify(frames: list[str]) -> str:
    """The subsystem of one loop-thread stack (root first)."""
    # what runs inside the trio run loop: frames after its innermost ``unrolled_run``
    cut = max((i for i, f in enumerate(frames) if f.startswith(_RUN_LOOP + " (")), default=None)
    if cut is None or cut == len(frames) - 1:
        return TRIO_LOOP
    inner = [_path(f) for f in frames[cut + 1 :]]
    for path in reversed(inner):  # innermost first
        for name, fragments in SUBSYSTEMS:
            if any(_belongs(path, f) for f in fragments):
                return name
    return TRIO_IN_TASK if any(_belongs(p, "trio/") for p in inner) else "other"


def shares(raw: str, top: int = 15) -> dict[str, Any]:
    """The share table of a py-spy raw profile (see the module docstring)."""
    loop: dict[str, int] = {}
    leaf: dict[str, int] = {}
    workers = 0
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        try:
            count = int(n)
        except ValueError:
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread ", "process ")):
            frames = frames[1:]
        if not any("trio/_core/_run.py" in f for f in frames):
            workers += count  # a thread the trio run loop is not on: a worker thread
            continue
        name = _classify(frames)
        loop[name] = loop.get(name, 0) + count
        if frames:
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
    total = sum(loop.values())
    table = {k: round(100 * v / total, 1) for k, v in sorted(loop.items(), key=lambda kv: -kv[1])}
    return {
        "loop_thread_samples": total,
        "worker_thread_samples": workers,
        "worker_threads_vs_loop_pct": round(100 * workers / total, 1) if total else None,
        "share_of_loop_thread_pct": table,
        "top_leaf_frames_pct": {
            k: round(100 * v / total, 1)
            for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]
        },
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    data = Path(argv[0]).read_bytes()
    if argv[0].endswith(".gz"):
        data = gzip.decompress(data)
    out = shares(data.decode("utf-8"))
    print(f"loop thread samples: {out['loop_thread_samples']}")
    print("| subsystem | share of the loop thread |\n|---|---:|")
    for k, v in out["share_of_loop_thread_pct"].items():
        print(f"| {k} | {v} % |")
    print(f"worker threads: {out['worker_threads_vs_loop_pct']} % of the loop thread's samples")
    print("top leaf frames:")
    for k, v in out["top_leaf_frames_pct"].items():
        print(f"  {v:5.1f} %  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
