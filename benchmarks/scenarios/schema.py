"""Schema: what checking one call's arguments against its tool's schema costs, in this process.

The check runs on the event loop for every ``tools/call`` before the tool starts
(:func:`exai.tools.schema.validate`), so it is on the hot path. Cases, each a tool's real input
schema with arguments a client sends:

* ``chat`` typical: a 2 KB prompt, a model, a temperature, a thinking mode, 5 file paths and a
  continuation id;
* ``chat`` large: a 1 MiB prompt and 100 file paths (the schema's cap);
* ``codereview`` step: a workflow step with findings, 10 relevant files and 20 issues;
* ``chat`` refused: an unknown field (the error path: message and field built).

Figures: CPU microseconds per validation (``time.process_time`` over a batch, best of the
rounds).
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.daemon import machine_load

NAME = "schema"
DESCRIPTION = "CPU per tools/call argument check (chat typical and large, a workflow step)"


def cases() -> dict[str, tuple[dict[str, Any], dict[str, Any], bool]]:
    """name -> (schema, arguments, conforming)."""
    from exai.tools import default_registry

    reg = default_registry()
    chat = reg.get("chat")
    review = reg.get("codereview")
    assert chat is not None and review is not None
    typical = {
        "prompt": "Explain what this function does and how to test it. " * 40,
        "model": "auto",
        "temperature": 0.3,
        "thinking_mode": "medium",
        "files": [f"/home/me/project/src/module_{i}.py" for i in range(5)],
        "continuation_id": "7f3c2a9e-1b4d-4c8e-9a0f-2d6b5e8c1a3f",
    }
    large = {
        "prompt": "x" * (1024 * 1024),
        "files": [f"/home/me/project/src/module_{i}.py" for i in range(100)],
    }
    step = {
        "step": "Review the session layer for races between cancel and completion.",
        "step_number": 2,
        "total_steps": 4,
        "next_step_required": True,
        "findings": "The responder detaches before the execution stores its answer. " * 10,
        "relevant_files": [f"/home/me/project/exai/server/m{i}.py" for i in range(10)],
        "issues_found": [
            {"severity": "medium", "description": f"issue {i}", "location": f"session.py:{i}"}
            for i in range(20)
        ],
        "confidence": "medium",
        "continuation_id": "7f3c2a9e-1b4d-4c8e-9a0f-2d6b5e8c1a3f",
    }
    refused = {**typical, "modle": "x"}
    return {
        "chat typical": (chat.input_schema, typical, True),
        "chat large (1 MiB prompt, 100 files)": (chat.input_schema, large, True),
        "codereview step (10 files, 20 issues)": (review.input_schema, step, True),
        "chat refused (unknown field)": (chat.input_schema, refused, False),
    }


def _cpu_us(schema: dict[str, Any], args: dict[str, Any], rounds: int, batch: int) -> float:
    from exai.errors import InvalidParams
    from exai.tools.schema import validate

    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(batch):
            try:
                validate(schema, args)
            except InvalidParams:
                pass
        best = min(best, (time.process_time() - t0) / batch)
    return round(best * 1e6, 2)


def run(full: bool) -> dict[str, Any]:
    rounds, batch = (7, 2000) if full else (3, 300)
    table: dict[str, Any] = {}
    for name, (schema, args, _ok) in cases().items():
        n = max(1, batch // 100) if "large" in name else batch
        table[name] = {"cpu_us": _cpu_us(schema, args, rounds, n)}
    return {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {"rounds": rounds, "batch": batch},
        "cpu_us_per_validation": table,
    }
