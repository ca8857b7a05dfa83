"""Idle: what a daemon that nobody calls costs the machine, per second.

An editor's daemon runs all day and is called now and then: what it spends between calls is
paid for every second of the day (a laptop's battery, a shared box's CPU). Each process below
runs alone on loopback with nothing connected, and is read from the outside over the same
window after a warm-up:

* ``exai``: ``exai serve`` with the mock provider configured (the benchmark daemon's settings,
  :data:`benchmarks.daemon.BASE_ENV`), after one ``tools/call chat`` has gone through it (so
  its pools, store and caches are as after real use);
* floor ``echo``: the bare trio-websocket echo server of the peer scenario (one trio run, a
  listening socket, nothing else).

Figures per process: CPU time (user + system, all threads, from ``/proc/<pid>/stat``) in ms per
second of the window, and wake-ups per second — the context switches of all its threads
(``voluntary_ctxt_switches`` + ``nonvoluntary_ctxt_switches`` of ``/proc/<pid>/task/*/status``),
which a loaded machine does not inflate as it does CPU time. Best (lowest) of the rounds; every
round in the JSON.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks.daemon import echo_server, exai_daemon, machine_load, mock_upstream

NAME = "idle"
DESCRIPTION = "CPU and wake-ups per second of an idle daemon, beside a bare trio echo server"

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:  # (a thread that ended meanwhile)
            continue
    return total


def measure(pid: int, window_s: float) -> dict[str, float]:
    """CPU ms and wake-ups per second of ``pid`` over ``window_s`` of wall time."""
    t0, c0, w0 = time.monotonic(), _cpu_s(pid), _switches(pid)
    time.sleep(window_s)
    t1, c1, w1 = time.monotonic(), _cpu_s(pid), _switches(pid)
    span = t1 - t0
    return {
        "cpu_ms_per_s": round((c1 - c0) * 1000 / span, 2),
        "wakeups_per_s": round((w1 - w0) / span, 1),
        "window_s": round(span, 2),
    }


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {
        "cpu_ms_per_s": min(r["cpu_ms_per_s"] for r in rounds),
        "wakeups_per_s": min(r["wakeups_per_s"] for r in rounds),
    }


def run(full: bool) -> dict[str, Any]:
    rounds, window_s, warmup_s = (3, 30.0, 5.0) if full else (2, 8.0, 3.0)
    figures: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {"rounds": rounds, "window_s": window_s, "warmup_s": warmup_s},
    }
    exai_rounds: list[dict[str, float]] = []
    echo_rounds: list[dict[str, float]] = []
    with mock_upstream() as mock, exai_daemon(mock) as daemon, echo_server() as echo:
        answer = daemon.call_tool("chat", {"prompt": "ping", "model": "mock-fast"})
        figures["first_call_ok"] = "result" in answer and not answer["result"].get("isError")
        time.sleep(warmup_s)
        for _ in range(rounds):  # interleaved: a change in the machine's load falls on both
            exai_rounds.append(measure(daemon.pid, window_s))
            echo_rounds.append(measure(echo.pid, window_s))
        figures["daemon_env"] = daemon.env_settings
    exai, floor = _best(exai_rounds), _best(echo_rounds)
    figures["exai"] = {**exai, "rounds": exai_rounds}
    figures["floor_echo"] = {**floor, "rounds": echo_rounds}
    figures["machine_load_at_end"] = machine_load()
    return figures
