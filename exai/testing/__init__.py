"""exai.testing: a real OpenAI-compatible mock upstream and a TCP fault proxy for tests.

* :class:`FaultProxy` sits between a client and a TCP server and cuts, blackholes or delays the
  connections on cue (Redis, Postgres, the bridge's WebSocket).
* :class:`MockUpstream` is an OpenAI-compatible HTTP server on loopback with scripted
  :class:`Fault` s; every request it sees is kept as a :class:`RecordedRequest`.

The names are imported lazily so that ``python -m exai.testing.faultproxy`` and
``python -m exai.testing.mock_upstream`` run their module exactly once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exai.testing.faultproxy import FaultProxy
    from exai.testing.mock_upstream import Fault, MockUpstream, RecordedRequest

__all__ = ["Fault", "FaultProxy", "MockUpstream", "RecordedRequest"]

_HOMES = {
    "Fault": "exai.testing.mock_upstream",
    "FaultProxy": "exai.testing.faultproxy",
    "MockUpstream": "exai.testing.mock_upstream",
    "RecordedRequest": "exai.testing.mock_upstream",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'exai.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
