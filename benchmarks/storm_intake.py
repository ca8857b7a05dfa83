"""The storm's intake: what each process spends while thousands of calls come in at once.

Usage::

    .venv/bin/python -m benchmarks.storm_intake TREE [--calls 2000] [--latency 4]
        [--mock-tree TREE] [--pyspy PREFIX] [--native] [--drain]

One *slow_upstream*-like storm (:mod:`benchmarks.scenarios.slow_upstream`: its daemon settings,
sessions of ``PER_SESSION`` calls fired at once) against a daemon run from the source tree
``TREE`` (as :mod:`benchmarks.ab` does, through ``benchmarks.daemon.REPO``) and the traced mock
upstream (from ``--mock-tree``, default this tree), whose latency (``--latency``, seconds) is
set long enough that no answer comes back while requests still arrive. The figures are each
process's CPU time (user + system, ``/proc/<pid>/stat``) from the start of the load process
to just before the first answer can come back, divided by the calls (``daemon_ms_per_req``,
``mock_ms_per_req``: milliseconds; they include the sessions' set-up), and the intake time
(first request sent → last request at the upstream, seconds). The egress: ``drain_s`` (first
answer received → last, seconds) and each process's CPU from just before the first answer to
the load's end (all answered; a few ms of the load process's exit included), divided by the
calls (``daemon_ms_per_answer``, ``mock_ms_per_answer``); an intake that outlasts the latency
shifts requests into these figures (``intake_s`` says when). ``max_loop_stall_s``: the daemon's
longest loop stall since it started (its ``exai_loop_max_stall_seconds`` gauge), seconds.
``--pyspy PREFIX`` records both processes with py-spy (``EXAI_BENCH_PYSPY`` or
``~/.cache/exai-bench/tools-venv``) into ``PREFIX-daemon.txt`` and ``PREFIX-mock.txt`` (raw
format, for
:mod:`benchmarks.profile_shares`); ``--native`` adds native frames (the collector's share);
``--drain`` records the answers' phase instead (from just before the first answer, 3 s).

Prints one JSON line; writes nothing else. A measuring tool for before/after work on the
intake (issue 18, part 6 in ``benchmarks/README.md``), not a scenario with a target.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmarks.daemon as bd
from benchmarks.scenarios.slow_upstream import PER_SESSION, _read_trace, daemon_settings

#: seconds the load process takes to start before its first request (measured ≈ 0.3 s)
LOAD_START_S = 0.3


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pyspy() -> str:
    return os.environ.get("EXAI_BENCH_PYSPY") or os.path.expanduser(
        "~/.cache/exai-bench/tools-venv/bin/py-spy"
    )


def storm(
    tree: Path,
    calls: int,
    latency_s: float,
    mock_tree: Path | None = None,
    pyspy_prefix: str | None = None,
    native: bool = False,
    drain: bool = False,
) -> dict[str, object]:
    """Run one storm; return the figures described in the module docstring."""
    trace = os.path.join(tempfile.mkdtemp(prefix="exai-storm-"), "trace.json")
    original = bd.REPO
    with contextlib.ExitStack() as stack:
        try:
            bd.REPO = (mock_tree or original).resolve()
            mock = stack.enter_context(bd.mock_upstream(latency_s=latency_s, trace_path=trace))
            bd.REPO = tree.resolve()
            daemon = stack.enter_context(
                bd.exai_daemon(
                    mock=mock,
                    provider={"max_concurrency": calls, "pool_max": calls, "stall_timeout_s": 60},
                    **daemon_settings(calls),
                )
            )
        finally:
            bd.REPO = original
        unavailable = bd.chat_unavailable(daemon)
        if unavailable:
            raise SystemExit(f"chat is not available: {unavailable}")
        time.sleep(0.5)
        spies: list[subprocess.Popen[bytes]] = []

        def spy(seconds: int) -> None:
            assert pyspy_prefix
            for who, pid in (("daemon", daemon.pid), ("mock", mock.pid)):
                spies.append(
                    subprocess.Popen(
                        [_pyspy(), "record", "--format", "raw", "--threads", "-r", "250"]
                        + ["-d", str(seconds), "-o", f"{pyspy_prefix}-{who}.txt"]
                        + ["-p", str(pid)]
                        + (["--native"] if native else []),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )

        if pyspy_prefix and not drain:
            spy(int(latency_s) + 1)
            time.sleep(1.0)
        d0, m0, started = _cpu_s(daemon.pid), _cpu_s(mock.pid), time.monotonic()
        load = bd.LoadProcess(
            "closed",
            {
                "mode": "mcp",
                "url": daemon.url,
                "connections": calls // PER_SESSION,
                "inflight": PER_SESSION,
                "calls_per_worker": 1,
                "warmup_s": 0,
                "duration_s": 120,
            },
        )
        # until just before the first answer can come back
        time.sleep(max(0.5, latency_s - 0.3) + LOAD_START_S)
        d1, m1 = _cpu_s(daemon.pid), _cpu_s(mock.pid)
        if pyspy_prefix and drain:
            spy(3)
        result = load.result(300)
        d2, m2 = _cpu_s(daemon.pid), _cpu_s(mock.pid)
        stall = daemon.max_loop_stall_s()["value"]
        for spy in spies:
            spy.wait()
        mock.stop()
        arrivals = _read_trace(trace)
    records = result["records"]
    t0 = min(records["t"])
    ends = [t + lat for t, lat in zip(records["t"], records["lat"], strict=True)]
    arrived = sorted(t for t in (arrivals or {}).get("arrived", []) if t >= t0)
    return {
        "calls": calls,
        "ok": sum(o == "ok" for o in records["outcome"]),
        "reached_upstream": len(arrived),
        "intake_s": round(arrived[-1] - t0, 3) if arrived else None,
        "wall_s": round(max(ends) - t0, 3),
        "first_answer_s": round(min(ends) - t0, 3),
        "load_start_to_first_request_s": round(t0 - started, 3),
        "daemon_ms_per_req": round((d1 - d0) / calls * 1000, 3),
        "mock_ms_per_req": round((m1 - m0) / calls * 1000, 3),
        "drain_s": round(max(ends) - min(ends), 3),
        "daemon_ms_per_answer": round((d2 - d1) / calls * 1000, 3),
        "mock_ms_per_answer": round((m2 - m1) / calls * 1000, 3),
        "max_loop_stall_s": stall,
        "machine_load": os.getloadavg()[0],
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.storm_intake", description=__doc__.split("\n")[0]
    )
    ap.add_argument("tree", type=Path, help="the exai source tree the daemon runs from")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=4.0, help="the mock's latency, seconds")
    ap.add_argument("--mock-tree", type=Path, default=None)
    ap.add_argument("--pyspy", metavar="PREFIX", default=None)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--drain", action="store_true", help="profile the answers, not the intake")
    args = ap.parse_args(argv)
    figures = storm(
        args.tree, args.calls, args.latency, args.mock_tree, args.pyspy, args.native, args.drain
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
