"""Fixtures for the resilience tests.

``anyio_backend`` here runs a test on both backends: trio with a ``MockClock`` (time jumps
whenever every task sleeps) and asyncio (real time, so such tests keep their waits tiny). A
module whose tests rely on the mock clock overrides it with trio only.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return "asyncio"
