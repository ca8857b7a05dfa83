"""Load generators of the benchmarks, each run as its own process.

``python -m benchmarks.load.<module> '<json config>'`` writes JSON lines on stdout, the last one
``{"event": "result", ...}``; :class:`benchmarks.daemon.LoadProcess` starts and reads them.
"""
