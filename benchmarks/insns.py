"""Instructions per call: the daemon's own work per ``tools/call`` at concurrency 1, counted.

Usage::

    .venv/bin/python -m benchmarks.insns <tree> [<tree> ...] [--series chat1,http1,stream1]
        [--calls 150] [--samples 4] [--warmup 200] [--keep DIR]

Each tree's daemon (``exai serve`` from that tree, the settings of :mod:`benchmarks.ab`) runs
under valgrind's callgrind (``--instr-atstart=no``: at near native speed until measured) against
one mock upstream; the load (:mod:`benchmarks.load.stepped`: one connection, one call at a time)
and the mock are other processes, not counted. Per series the load connects and makes
``--warmup`` calls uninstrumented; then ``callgrind_control -i on``, 20 calls not counted, and
``--samples`` times: ``callgrind_control -z`` (zero), ``--calls`` calls, ``callgrind_control -d``
(dump); then, after ``IDLE_SETTLE_S`` uncounted, ``IDLE_S`` seconds with no call (zero, sleep,
dump): the daemon's timed work per second (≈ 0 with the timers below stopped; 1 M
instructions/s with the probe slowed but the memory, secret and collector timers running).
The series' figure pools its samples: their instruction totals (``Ir``, all the daemon's
threads: the loop and the store's) less the idle rate times their wall time, over all their
calls (a young collection or a WAL checkpoint every few dozen calls falls in one sample or the
next: single samples of 100 calls spread by up to 4 %). Counted instructions depend on the
machine's load far less than CPU time does, but not at all is not true either: how many
scheduler rounds a call takes depends on whether the native mock's and client's messages are
already there when the loop looks, so two daemons of one tree read up to ± 3 % apart on a
loaded machine (``benchmarks/README.md``, part 15b): give each tree two daemons, interleaved
(``insns A B A B``). What is counted is user-space instructions; the kernel's work in
system calls, cache misses and the futex hand-offs' waits are not.

The daemon runs with ``PYTHONHASHSEED=0``, the loop probe (``exai.server.stalls``) waking
hourly instead of every 10 ms, the idle collector's check hourly instead of every second, no
memory reading or secret watch (``TIMERS_OFF``), and a GIL switch interval of 125 ms: see
``SERVE_CODE``.

Series (concurrency 1 only): ``chat1`` (``tools/call chat`` over WebSocket), ``stream1`` (the
same with a progress token), ``version1``; over the Streamable HTTP door ``http1``,
``httpstream1`` (an SSE answer), ``httpversion1``. ``PYTHONHASHSEED=0`` in the daemon.

``--keep DIR`` keeps each sample's dump (``DIR/<tree#>-<series>-<sample>.cg``) for
``callgrind_annotate --inclusive=yes`` (C-level functions: the interpreter, json, sqlite, …).
Prints a table; writes nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.daemon as bd
from benchmarks.ab import _config, _start

#: calls made after instrumentation is switched on and before the first sample
SETTLE_CALLS = 20

#: daemon settings that stop its other timed work: the memory backstop's reading (every
#: second by default) and the secret files' watch (every 2 s)
TIMERS_OFF = {"memory_check_interval_s": "3600", "secret_watch_interval_s": "0"}

#: seconds of idle (no call) counted after each series, to price the daemon's timed work
IDLE_S = 3.0
#: seconds left uncounted before that: the daemon's idle full collection
#: (``exai.server.gcpolicy.collect_when_idle``, checked every second) runs in them, once
IDLE_SETTLE_S = 2.5

#: the daemon, started as ``exai serve`` is, but with the loop probe (``exai.server.stalls``)
#: and the idle collector's check (``exai.server.gcpolicy``) waking every hour instead of every
#: 10 ms and every second: their wake-ups follow the clock, not the calls, and under valgrind
#: (≈ 100 × slower) the probe's alone were ≈ 20 % of a sample, in proportion to its length. (A
#: tree without them runs unpatched.) The GIL's switch interval is 25 × CPython's 5 ms, so that
#: the loop and the store thread hand the GIL over about as often per call as they do natively.
SERVE_CODE = """
import functools, sys
sys.setswitchinterval(0.125)
import exai.server.app as app
import exai.server.gcpolicy as gcpolicy
if hasattr(app, "loop_probe"):
    app.loop_probe = functools.partial(app.loop_probe, interval_s=3600.0)
if "check_interval_s" in (gcpolicy.collect_when_idle.__kwdefaults__ or {}):
    gcpolicy.collect_when_idle.__kwdefaults__["check_interval_s"] = 3600.0
from exai.cli.main import main
sys.argv[0] = "exai"
sys.exit(main())
"""


def _load_config(series: str, d: Any) -> dict[str, Any]:
    """:func:`benchmarks.ab._config`'s load for ``series``, for the stepped load
    (:mod:`benchmarks.load.stepped`: ``stream`` asks for progress over WebSocket too)."""
    c, cfg = _config(series, d)
    if c != 1:
        raise SystemExit(f"{series!r}: benchmarks.insns measures concurrency 1 only")
    if cfg.pop("progress", False):
        cfg["stream"] = True
    return cfg


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _total_ir(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def _newest_dump(out_dir: Path, pid: int, seen: set[Path]) -> Path:
    fresh = [p for p in out_dir.glob(f"cg.{pid}.*") if p not in seen]
    if len(fresh) != 1:
        raise RuntimeError(f"expected one new callgrind dump in {out_dir}, found {fresh}")
    seen.add(fresh[0])
    return fresh[0]


def _run(lp: bd.LoadProcess, n: int, name: str) -> None:
    """``n`` calls, one after the other; returns when the load has their answers."""
    lp.send(f"run {n}")
    ev = lp.wait_event("ran", 600)
    with lp._cond:
        lp.events.remove(ev)
    if ev["ok"] != n:
        raise RuntimeError(f"{name}: {n - ev['ok']} of {n} calls failed")


def measure_tree(
    tree: Path, index: int, series: list[str], args: argparse.Namespace, mock: Any
) -> dict[str, list[float]]:
    """Instructions per call of each series, one figure per sample."""
    out_dir = Path(tempfile.mkdtemp(prefix="exai-insns-"))
    saved = list(bd.SERVE_CMD), bd.BASE_ENV.get("PYTHONHASHSEED")
    bd.SERVE_CMD[:] = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/cg.%p",
        sys.executable,
        "-c",
        SERVE_CODE,
        "serve",
    ]
    bd.BASE_ENV["PYTHONHASHSEED"] = "0"
    wait_for = bd.Daemon.wait_for
    # valgrind's start is slower than the daemon's 30 s allowance assumes on a busy machine
    bd.Daemon.wait_for = lambda self, keys, limit_s=30.0: wait_for(self, keys, 300.0)  # type: ignore[method-assign]
    figures: dict[str, list[float]] = {}
    try:
        with contextlib.ExitStack() as stack:
            d = _start(tree, mock, stack, dict(TIMERS_OFF))
            pid = str(d.pid)
            seen: set[Path] = set()
            for name in series:
                cfg = {**_load_config(name, d), "warmup": args.warmup}
                lp = bd.LoadProcess("stepped", cfg)
                try:
                    lp.wait_event("ready", 600)
                    _control("-i", "on", pid)
                    _run(lp, SETTLE_CALLS, name)
                    samples: list[tuple[int, float]] = []
                    for k in range(args.samples):
                        _control("-z", pid)
                        t0 = time.monotonic()
                        _run(lp, args.calls, name)
                        _control("-d", f"{name}-{k}", pid)
                        wall = time.monotonic() - t0
                        dump = _newest_dump(out_dir, d.pid, seen)
                        samples.append((_total_ir(dump), wall))
                        if args.keep:
                            shutil.copy(dump, Path(args.keep) / f"{index}-{name}-{k}.cg")
                    # the daemon's timed work (timers, watchers) while no call runs
                    time.sleep(IDLE_SETTLE_S)
                    _control("-z", pid)
                    t0 = time.monotonic()
                    time.sleep(IDLE_S)
                    _control("-d", f"{name}-idle", pid)
                    idle_rate = _total_ir(_newest_dump(out_dir, d.pid, seen)) / (
                        time.monotonic() - t0
                    )
                    _control("-i", "off", pid)
                    per = [(ir - idle_rate * wall) / args.calls for ir, wall in samples]
                    # pooled: the lumps (a young collection, a WAL checkpoint every few dozen
                    # calls) fall into one sample or the next, not into the pooled count
                    pooled = (
                        sum(ir for ir, _ in samples) - idle_rate * sum(w for _, w in samples)
                    ) / (args.calls * len(samples))
                    figures[name] = [pooled, *per]
                    lp.send("close")
                    lp.result(60)
                finally:
                    lp.kill()
                pooled, *per = figures[name]
                print(
                    f"  tree {index} {name:12} {pooled:12,.0f} insns/call "
                    f"(samples {min(per):,.0f}–{max(per):,.0f}, spread "
                    f"{100 * (max(per) - min(per)) / pooled:.2f} %; "
                    f"idle {idle_rate / 1e6:.2f} M/s; "
                    f"{1000 * statistics.median(w for _, w in samples) / args.calls:.0f} ms/call "
                    "under valgrind)",
                    flush=True,
                )
    finally:
        bd.SERVE_CMD[:] = saved[0]
        if saved[1] is None:
            bd.BASE_ENV.pop("PYTHONHASHSEED", None)
        else:
            bd.BASE_ENV["PYTHONHASHSEED"] = saved[1]
        bd.Daemon.wait_for = wait_for  # type: ignore[method-assign]
        shutil.rmtree(out_dir, ignore_errors=True)
    return figures


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.insns", description=__doc__.split("\n")[0]
    )
    ap.add_argument("trees", type=Path, nargs="+")
    ap.add_argument("--series", default="chat1,http1,stream1")
    ap.add_argument("--calls", type=int, default=150, help="calls per sample")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=200, help="uninstrumented calls first")
    ap.add_argument("--keep", type=Path, help="keep the callgrind dumps in this directory")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("benchmarks.insns needs valgrind (apt-get install valgrind)")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    series = args.series.split(",")
    for s in series:
        _load_config(s, type("D", (), {"url": "ws://x"})())  # reject a bad name before starting
    results: list[dict[str, list[float]]] = []
    with bd.mock_upstream(latency_s=0.0) as mock:
        for i, tree in enumerate(args.trees):
            print(f"tree {i}: {tree} ({bd.machine_load()})", flush=True)
            results.append(measure_tree(tree.resolve(), i, series, args, mock))
    head = f"{'series':12}" + "".join(f" {'tree ' + str(i):>14}" for i in range(len(results)))
    print(
        head
        + ("   " + " ".join(f"{i}/0" for i in range(1, len(results))) if len(results) > 1 else "")
    )
    for s in series:
        meds = [r[s][0] for r in results]
        row = f"{s:12}" + "".join(f" {m:14,.0f}" for m in meds)
        row += "   " + " ".join(f"{m / meds[0]:.4f}" for m in meds[1:])
        print(row)
    print("insns/call: all samples' instructions (less the idle rate × their time) / their calls")
    return 0


if __name__ == "__main__":
    # (a SIGTERM unwinds: the daemons, the mock and the load are stopped on the way out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(sys.argv[1:]))
