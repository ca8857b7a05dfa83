"""The mock upstream, telling when each chat request reached it and when its answer was sent.

``python -m benchmarks.load.traced_mock TRACE_FILE [mock upstream options]`` serves exactly as
``python -m exai.testing.mock_upstream [options]`` does, and notes for every chat request the
``time.monotonic()`` at which the mock had read it whole (``arrived``) and at which its handler
ended (``done``: the answer handed to the socket, or the request given up). On SIGTERM it
writes ``{"arrived": [...], "done": [...]}`` to ``TRACE_FILE`` and exits.

A storm scenario (``slow_upstream``) splits its wall time with it: *intake* — from the first
request sent to the last one that reached the upstream — the upstream's latency, and *drain* —
from the first answer received to the last. ``time.monotonic()`` is the system-wide
CLOCK_MONOTONIC on Linux, so these times line up with the load process's.

The two lists grow by one float each per chat request (16 bytes a request): the storms it is
made for send a few thousand. It wraps :meth:`MockUpstream._chat`, the mock's own handler of a
chat request (``exai.testing`` is this repository's): nothing else of the mock changes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from exai.testing import mock_upstream

ARRIVED: list[float] = []
DONE: list[float] = []


def _traced(handler: Any) -> Any:
    async def chat(self: Any, *args: Any) -> Any:
        ARRIVED.append(time.monotonic())
        try:
            return await handler(self, *args)
        finally:
            DONE.append(time.monotonic())

    return chat


def main(argv: list[str]) -> int:
    path, rest = argv[0], argv[1:]

    def dump(signum: int, frame: object) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"arrived": ARRIVED, "done": DONE}, f)
        os._exit(0)

    mock_upstream.MockUpstream._chat = _traced(mock_upstream.MockUpstream._chat)  # type: ignore[method-assign]
    signal.signal(signal.SIGTERM, dump)
    return mock_upstream.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
