"""exai benchmarks: ``python -m benchmarks list`` and ``python -m benchmarks run [NAME…] [--full]``.

Each module in :mod:`benchmarks.scenarios` is one scenario; the runner writes one JSON file per
scenario run to ``benchmarks/results/``. See ``benchmarks/README.md``.
"""
