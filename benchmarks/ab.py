"""Before/after: two exai source trees side by side on one mock, interleaved rounds.

Usage::

    git worktree add --detach /tmp/exai-before <commit>
    .venv/bin/python -m benchmarks.ab /tmp/exai-before . [--rounds 3] [--duration 4]
        [--series chat64,stream64,version64,chat1,version1]

Both daemons (``exai serve`` from each tree, the settings of the *peer* scenario) run at the
same time against one mock upstream; every round measures each series on both, in alternating
order, with the closed-loop load of ``benchmarks/load/closed.py``. The figure is each daemon's
CPU time per completed call (``meter`` in ``closed.py``), pooled over rounds — what a change
did to the daemon's own work, which holds on a shared machine where wall-clock rates do not.
Series: ``chat<c>`` (``tools/call chat`` over WebSocket), ``stream<c>`` (the same with a
progress token), ``version<c>``, at concurrency ``c``; over the Streamable HTTP door
(``POST /mcp``, stateless, the peer scenario's HTTP/1.1 client): ``http<c>`` (chat, a JSON
answer), ``httpstream<c>`` (an SSE answer), ``httpversion<c>``. ``--before-setting log_level=info``
(and ``--after-setting``) set a daemon setting on one side (``EXAI_LOG_LEVEL=info``; the
benchmarks otherwise log at ``warning``), e.g. the same tree twice to price one setting.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import benchmarks.daemon as bd
from benchmarks.scenarios.peer import MODEL, PROMPT, TOKEN


def _start(tree: Path, mock: Any, stack: contextlib.ExitStack, settings: dict[str, str]) -> Any:
    original = bd.REPO
    bd.REPO = tree  # the daemon's working directory and PYTHONPATH: that tree's exai
    try:
        return stack.enter_context(
            bd.exai_daemon(
                mock=mock,
                provider={"max_concurrency": 128, "pool_max": 128},
                max_inflight=256,
                session_max_inflight=8,
                session_rate_per_s=1_000_000,
                session_burst=1_000_000,
                max_connections=1024,
                tokens=TOKEN,
                **settings,
            )
        )
    finally:
        bd.REPO = original


def _config(series: str, d: Any) -> tuple[int, dict[str, Any]]:
    kind = series.rstrip("0123456789")
    c = int(series[len(kind) :])
    cfg: dict[str, Any] = {
        "mode": "mcp",
        "url": d.url,
        "token": TOKEN,
        "arguments": {"prompt": PROMPT, "model": MODEL},
    }
    if kind.startswith("http"):
        # the Streamable HTTP door (2026-07-28, stateless), JSON answers; the peer scenario's
        # HTTP/1.1 client (``mcp_http`` in closed.py)
        cfg.update(
            mode="mcp_http",
            url=d.url.replace("ws://", "http://", 1),
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        kind = kind.removeprefix("http") or "chat"
    if kind == "stream":
        if cfg["mode"] == "mcp_http":
            cfg["stream"] = True  # (an SSE answer)
        else:
            cfg["progress"] = True
    elif kind == "version":
        cfg.update(tool="version", arguments={})
    elif kind != "chat":
        raise SystemExit(
            f"unknown series {series!r}: chat<c>, stream<c>, version<c>, or over the HTTP "
            "door http<c>, httpstream<c>, httpversion<c>"
        )
    return c, cfg


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per series")
    ap.add_argument("--series", default="chat64,stream64,version64,chat1,version1")
    for side in ("before", "after"):
        ap.add_argument(
            f"--{side}-setting",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help=f"a daemon setting for the {side} daemon, e.g. log_level=info (EXAI_LOG_LEVEL)",
        )
    args = ap.parse_args(argv)
    sides = [
        dict(item.split("=", 1) for item in getattr(args, f"{side}_setting"))
        for side in ("before", "after")
    ]
    wanted = args.series.split(",")
    acc: dict[tuple[str, int], list[Any]] = {}
    with bd.mock_upstream(latency_s=0.0) as mock, contextlib.ExitStack() as stack:
        trees = (args.before, args.after)
        daemons = [_start(t.resolve(), mock, stack, sides[i]) for i, t in enumerate(trees)]
        for r in range(args.rounds):
            for series in wanted:
                order = [0, 1] if r % 2 == 0 else [1, 0]
                for i in order:
                    c, cfg = _config(series, daemons[i])
                    out = bd.run_load(
                        "closed",
                        {
                            "connections": c,
                            "inflight": 1,
                            "duration_s": args.duration,
                            "warmup_s": 1.0,
                            "cpu_pids": [daemons[i].pid],
                            **cfg,
                        },
                        limit_s=120 + 4 * args.duration,
                    )
                    m = out["meter"]
                    recs = out["records"]
                    pairs = zip(recs["lat"], recs["outcome"], strict=True)
                    lat = [x for x, o in pairs if o == "ok"]
                    cpu, done, lats = acc.setdefault((series, i), [0.0, 0, []])
                    acc[(series, i)] = [cpu + m["cpu_total_s"], done + m["completed"], lats + lat]
            print(f"round {r + 1}: {bd.machine_load()}", flush=True)
        stalls = [d.max_loop_stall_s()["value"] for d in daemons]
    head = f"{'series':10} {'before ms':>10} {'after ms':>9} {'after/before':>13}"
    print(f"{head} {'p50 b/a ms':>14}")
    for series in wanted:
        (cb, nb, lb), (ca, na, la) = acc[(series, 0)], acc[(series, 1)]
        before, after = 1000 * cb / nb, 1000 * ca / na
        p50 = [1000 * sorted(x)[len(x) // 2] if x else float("nan") for x in (lb, la)]
        print(
            f"{series:10} {before:10.3f} {after:9.3f} {after / before:13.3f} "
            f"{p50[0]:6.2f}/{p50[1]:<6.2f}  ({nb}/{na} calls)"
        )
    print(f"longest loop stall (each daemon's own gauge), before / after: {stalls}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
