"""Decoder: what one hostile 4 MiB frame costs to read, by decoder, in this process.

Frames (each about 4 MiB, each a valid ``tools/call`` whose argument is the hostile part):
nested groups (arrays 30 deep, side by side), tiny arrays (``[],`` repeated), tiny strings
(``"",`` repeated), long numbers (one integer and one float of 4 million digits), lone
surrogates (``\\ud800`` escapes), deep (100,000 nested arrays), and, for comparison, a normal
request with a 4 MiB prompt.

Decoders: the standard library's ``json`` (with the old daemon's depth check, as
``protocol.decode`` did before), ``orjson`` and ``msgspec`` when installed (bare ``loads``:
no limits), and exai's ``protocol.decode`` as it is now (C-speed scan of depth and value count,
then msgspec, the standard library only for what msgspec refuses).

Figures: CPU milliseconds per frame (``time.process_time``, best of the rounds) — the time the
event loop would be blocked. Target: every frame under 50 ms with exai's decode.
"""

from __future__ import annotations

import importlib
import json
import time
from typing import Any

from benchmarks.daemon import machine_load

NAME = "decoder"
DESCRIPTION = (
    "CPU per hostile 4 MiB frame: stdlib json, orjson, msgspec and exai's decode (scan first)"
)

MiB = 1024 * 1024


def frames() -> dict[str, str]:
    size = 4 * MiB - 300
    group = "[" * 30 + "]" * 30
    head = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"chat","arguments":'
    bodies = {
        "nested groups": '{"x":[' + ",".join([group] * (size // 61)) + "]}",
        "tiny arrays": '{"x":[' + "[]," * (size // 3) + "[]]}",
        "tiny strings": '{"x":[' + '"",' * (size // 3) + '""]}',
        "long integer": '{"x":' + "9" * (size // 2) + "}",
        "long float": '{"x":0.' + "9" * (size // 2) + "}",
        "lone surrogates": '{"x":"' + "\\ud800" * (size // 6) + '"}',
        "deep": '{"x":' + "[" * 100_000 + "]" * 100_000 + "}",
        "normal 4 MiB prompt": json.dumps({"prompt": "hello, world. " * (size // 14)}),
    }
    return {name: head + body + "}}" for name, body in bodies.items()}


def _old_decode(text: str) -> Any:
    """The old path: the standard library, then the depth check over the text."""
    from exai.server import protocol as p

    value = p._DECODER.decode(text)
    if isinstance(value, dict | list) and text.count("[") + text.count("{") > 64:
        p._depth_exceeds(text, 64)
    return value


def _decoders() -> dict[str, Any]:
    from exai.server import protocol as p

    out: dict[str, Any] = {"stdlib json (old exai path)": _old_decode}
    for name, attr in (("orjson", "loads"), ("msgspec", "json.decode")):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        fn = mod
        for part in attr.split("."):
            fn = getattr(fn, part)
        out[name] = fn
    out["exai protocol.decode (scan + msgspec)"] = p.decode
    return out


def _cpu_ms(fn: Any, arg: Any, rounds: int) -> tuple[float, str]:
    best, outcome = float("inf"), "ok"
    for _ in range(rounds):
        t0 = time.process_time()
        try:
            value = fn(arg)
            outcome = type(value).__name__
        except Exception as exc:  # a decoder refusing the frame is a figure, not a failure
            outcome = f"raised {type(exc).__name__}"
        best = min(best, time.process_time() - t0)
    return round(best * 1000, 2), outcome


def run(full: bool) -> dict[str, Any]:
    rounds = 7 if full else 3
    result: dict[str, Any] = {
        "form": "full" if full else "short",
        "machine_load_at_start": machine_load(),
        "settings": {"rounds": rounds, "frame_bytes": 4 * MiB},
    }
    table: dict[str, dict[str, Any]] = {}
    for fname, text in frames().items():
        data = text.encode("utf-8")
        row: dict[str, Any] = {}
        for dname, fn in _decoders().items():
            arg = text if dname.startswith(("stdlib", "exai")) else data
            ms, outcome = _cpu_ms(fn, arg, rounds)
            row[dname] = {"cpu_ms": ms, "outcome": outcome}
        table[fname] = row
    result["cpu_ms_per_frame"] = table
    exai_worst = max(r["exai protocol.decode (scan + msgspec)"]["cpu_ms"] for r in table.values())
    result["targets"] = {
        "every_frame_under_50ms_with_exai_decode": {"value_ms": exai_worst, "met": exai_worst < 50}
    }
    return result
