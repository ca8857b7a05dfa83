"""Benchmark scenarios, one per module.

A scenario module defines ``NAME: str`` (equal to the module's name), ``DESCRIPTION: str`` and
``def run(full: bool) -> dict``. ``run`` measures (``full=False``: a short form that finishes in
seconds to a minute; ``full=True``: the long form behind the published figures) and returns the
figures as a JSON-serialisable dict; a top-level ``"settings"`` entry, if present, is recorded
as the scenario's settings. The runner (``python -m benchmarks``) adds machine information and
package versions and writes the result file.
"""
