"""Bytecodes per call: where the daemon's Python work goes at concurrency 1, by function.

Usage::

    .venv/bin/python -m benchmarks.bytecodes <tree> [--series chat1] [--calls 200] [--top 40]

The companion of :mod:`benchmarks.insns`, whose callgrind counts name C functions only (on
CPython 3.11 the interpreter's ``_PyEval_EvalFrameDefault`` runs every Python function; there
is no perf trampoline before 3.12). The daemon from ``<tree>`` runs with a ``sys.settrace``
hook (set for its threads too) that counts each bytecode executed (``f_trace_opcodes``) by code
object; the load (:mod:`benchmarks.load.stepped`) makes 50 calls, the counts are zeroed
(``SIGUSR1``), ``--calls`` calls are made and the counts written (``SIGUSR2``). The tracing
makes the daemon ≈ 50 × slower, so timer-driven work (the loop probe every 10 ms) is
over-represented; the calls' own work is counted exactly. Bytecodes are not instructions (a
``CALL`` to ``json.dumps`` is one, ``LOAD_FAST`` is one): read it as a Python-level ranking and
:mod:`benchmarks.insns` for the C side and the totals.

Prints bytecodes per call by subsystem (the file's package) and the top functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchmarks.daemon as bd
from benchmarks.ab import _start
from benchmarks.insns import _load_config, _run

#: the daemon (``exai serve``) under a counting trace hook; SIGUSR1 zeroes, SIGUSR2 writes
SERVE_CODE = """
import collections, json, os, signal, sys, threading
counts = collections.Counter()
def local(frame, event, arg):
    if event == "opcode":
        counts[frame.f_code] += 1
    return local
def hook(frame, event, arg):
    frame.f_trace_opcodes = True
    return local
def zero(*_):
    counts.clear()
def write(*_):
    snap = dict(counts)  # (one C-level copy: the store thread cannot change it meanwhile)
    rows = [(n, c.co_filename, c.co_firstlineno, c.co_qualname) for c, n in snap.items()]
    path = os.environ["BENCH_BYTECODES_OUT"]
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f)
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, zero)
signal.signal(signal.SIGUSR2, write)
threading.settrace(hook)
sys.settrace(hook)
from exai.cli.main import main
sys.argv[0] = "exai"
sys.exit(main())
"""

#: (path fragment, subsystem): the first match names a code object's subsystem
GROUPS: tuple[tuple[str, str], ...] = (
    ("exai/server/stalls", "exai loop probe (timer-driven)"),
    ("exai/server/", "exai.server"),
    ("exai/providers/", "exai.providers"),
    ("exai/storage/", "exai.storage"),
    ("exai/tools/", "exai.tools"),
    ("exai/resilience/", "exai.resilience"),
    ("exai/", "exai (other)"),
    ("trio_websocket", "trio-websocket"),
    ("wsproto", "wsproto"),
    ("trio/", "trio"),
    ("outcome", "trio (outcome)"),
    ("<attrs generated methods trio", "trio (attrs __init__)"),
    ("<attrs generated methods outcome", "trio (outcome)"),
    ("<attrs generated methods exai", "exai attrs classes (__init__)"),
    ("contextlib", "contextlib"),
    ("h11", "h11"),
    ("json/", "json"),
    ("logging", "logging"),
)


def _group(path: str) -> str:
    for fragment, name in GROUPS:
        if fragment in path:
            return name
    return "other: " + os.path.basename(path)


def _short(path: str) -> str:
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1]
    if "/exai/" in path:
        return "exai/" + path.rsplit("/exai/", 1)[1]
    return path.rsplit("/lib/python3", 1)[-1].split("/", 1)[-1]


def report(rows: list[list[Any]], calls: int, top: int) -> None:
    total = sum(r[0] for r in rows)
    print(f"bytecodes per call: {total / calls:,.0f}")
    by = collections.Counter()
    for n, path, _, _ in rows:
        by[_group(path)] += n
    for name, n in by.most_common(16):
        print(f"  {100 * n / total:5.1f} %  {n / calls:8,.0f}  {name}")
    print(f"top {top} functions (bytecodes per call, share):")
    for n, path, line, name in sorted(rows, key=lambda r: -r[0])[:top]:
        print(f"  {n / calls:7,.0f} {100 * n / total:5.1f} %  {_short(path)}:{line} {name}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bytecodes", description=__doc__.split("\n")[0]
    )
    ap.add_argument("tree", type=Path)
    ap.add_argument("--series", default="chat1")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="exai-bytecodes-")) / "counts.json"
    saved = list(bd.SERVE_CMD), dict(bd.BASE_ENV)
    bd.SERVE_CMD[:] = [sys.executable, "-c", SERVE_CODE, "serve"]
    bd.BASE_ENV.update(PYTHONHASHSEED="0", BENCH_BYTECODES_OUT=str(out))
    wait_for = bd.Daemon.wait_for
    bd.Daemon.wait_for = lambda self, keys, limit_s=30.0: wait_for(self, keys, 300.0)  # type: ignore[method-assign]
    try:
        with bd.mock_upstream(latency_s=0.0) as mock, contextlib.ExitStack() as stack:
            d = _start(args.tree.resolve(), mock, stack, {})
            lp = bd.LoadProcess("stepped", {**_load_config(args.series, d), "warmup": 50})
            try:
                lp.wait_event("ready", 600)
                os.kill(d.pid, signal.SIGUSR1)
                time.sleep(0.5)
                _run(lp, args.calls, args.series)
                os.kill(d.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 60
                while not out.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the daemon wrote no counts")
                    time.sleep(0.2)
                lp.send("close")
                lp.result(60)
            finally:
                lp.kill()
        rows = json.loads(out.read_text())
    finally:
        bd.SERVE_CMD[:] = saved[0]
        bd.BASE_ENV.clear()
        bd.BASE_ENV.update(saved[1])
        bd.Daemon.wait_for = wait_for  # type: ignore[method-assign]
        with contextlib.suppress(OSError):
            out.unlink()
            out.parent.rmdir()
    print(f"{args.tree} {args.series}: {args.calls} calls")
    report(rows, args.calls, args.top)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(sys.argv[1:]))
