"""The benchmark runner.

Usage::

    python -m benchmarks list                      # the scenarios and what each measures
    python -m benchmarks run [SCENARIO ...] [--full]

``run`` without names runs every scenario, in name order. Each run writes
``benchmarks/results/<UTC timestamp>-<scenario>.json`` and prints its path and figures. The exit
status is 1 if any scenario failed (its file then carries the traceback under ``"error"``).
"""

from __future__ import annotations

import argparse
import json
import sys

from benchmarks.common import discover, run_scenario, utc_stamp, write_result

#: figures longer than this (as JSON) are only written to the file, not printed
_PRINT_LIMIT = 6000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[1]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the scenarios")
    run = commands.add_parser("run", help="run scenarios and write their result files")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="default: all")
    run.add_argument("--full", action="store_true", help="the long form (published figures)")
    args = parser.parse_args(argv)

    scenarios = discover()
    if args.command == "list":
        width = max(map(len, scenarios), default=0)
        for name, module in scenarios.items():
            print(f"{name:<{width}}  {' '.join(module.DESCRIPTION.split())}")
        return 0

    unknown = [name for name in args.scenarios if name not in scenarios]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(scenarios)}")
    failed = []
    for name in args.scenarios or list(scenarios):
        print(f"== {name} ({'full' if args.full else 'short'})", file=sys.stderr, flush=True)
        result = run_scenario(scenarios[name], args.full)
        path = write_result(name, result, utc_stamp())
        if result["error"]:
            failed.append(name)
            print(result["error"], file=sys.stderr)
        figures = json.dumps(result["figures"], indent=2, default=str)
        if len(figures) > _PRINT_LIMIT:
            figures = f"({len(figures)} characters of figures: see the file)"
        print(f"{name}: {path}\n{figures}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
