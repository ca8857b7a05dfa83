"""What the benchmark runner and scenarios share: discovery, machine facts, result files, timing.

A result file (``benchmarks/results/<UTC timestamp>-<scenario>.json``) holds::

    {"scenario": ..., "description": ..., "form": "short" | "full",
     "started_at": ..., "finished_at": ..., "wall_s": ...,
     "machine": {...}, "packages": {...}, "settings": {...}, "figures": {...},
     "error": null | "Traceback ..."}
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import json
import os
import pkgutil
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

#: distributions whose versions go in every result file
PACKAGES = (
    "exai",
    "trio",
    "anyio",
    "httpx",
    "httpcore",
    "trio-websocket",
    "trio-asyncio",
    "redis",
    "asyncpg",
    "tenacity",
    "attrs",
    "mcp",
)


def discover() -> dict[str, ModuleType]:
    """Every scenario module in :mod:`benchmarks.scenarios`, by its ``NAME``, sorted.

    Raises:
        RuntimeError: a module lacks ``NAME``, ``DESCRIPTION`` or ``run``, or its ``NAME`` is not
            its module name.
    """
    from benchmarks import scenarios

    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(scenarios.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"benchmarks.scenarios.{info.name}")
        missing = [a for a in ("NAME", "DESCRIPTION", "run") if not hasattr(module, a)]
        if missing:
            raise RuntimeError(f"scenario module {info.name!r} lacks {', '.join(missing)}")
        if info.name != module.NAME:
            raise RuntimeError(f"scenario module {info.name!r} has NAME {module.NAME!r}")
        found[module.NAME] = module
    return found


def machine_info() -> dict[str, Any]:
    """Facts about the machine a figure was measured on."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    cpu_model = _cpu_model()
    if cpu_model:
        info["cpu_model"] = cpu_model
    try:
        import psutil

        info["memory_total_mb"] = round(psutil.virtual_memory().total / 2**20)
        affinity = getattr(psutil.Process(), "cpu_affinity", None)
        if affinity is not None:
            info["cpu_affinity_count"] = len(affinity())
    except ImportError:  # psutil is a bench/test extra
        pass
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (``None`` when not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_stamp(when: dt.datetime | None = None) -> str:
    """``20261124T203507Z``: sortable, safe in file names."""
    return (when or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")


def write_result(name: str, payload: dict[str, Any], stamp: str | None = None) -> Path:
    """Write ``payload`` to ``benchmarks/results/<stamp>-<name>.json``; return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stamp or utc_stamp()}-{name}.json"
    n = 1
    while path.exists():  # two runs in one second
        n += 1
        path = RESULTS_DIR / f"{stamp or utc_stamp()}-{name}-{n}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def run_scenario(module: ModuleType, full: bool) -> dict[str, Any]:
    """Run one scenario and wrap its figures with the run's context (see the module docstring).

    A scenario that raises is recorded with its traceback under ``"error"``.
    """
    import traceback

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    error = None
    try:
        figures = dict(module.run(full))
    except Exception:
        error = traceback.format_exc()
    settings = figures.pop("settings", {})
    return {
        "scenario": module.NAME,
        "description": module.DESCRIPTION,
        "form": "full" if full else "short",
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "machine": machine_info(),
        "packages": package_versions(),
        "settings": settings,
        "figures": figures,
        "error": error,
    }


def ns_per_op(loop: Callable[[int], Any], n: int) -> float:
    """Time ``loop(n)`` (which performs ``n`` operations) with ``perf_counter_ns``."""
    t0 = time.perf_counter_ns()
    loop(n)
    return (time.perf_counter_ns() - t0) / n


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, minimum and maximum of repeated measurements, rounded for reading."""
    return {
        "median": round(statistics.median(samples), 1),
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
    }
