"""Pytest plugin: the ``stall_detector`` fixture fails a test whose trio loop was blocked.

Enable it with ``pytest_plugins = ["tests.stall_plugin"]`` in ``tests/conftest.py``. Then an
async test (``@pytest.mark.anyio``) that asks for the fixture runs with a
:class:`exai.server.stalls.StallDetector` installed in its trio run; if any task step ran longer
than the threshold (0.1 s by default, ``@pytest.mark.stall_threshold(0.5)`` to change it), the
test errors at teardown naming the task and the duration::

    @pytest.mark.anyio
    async def test_serves_without_blocking(stall_detector):
        ...

On the asyncio backend there is no instrument API: the fixture yields a detector that records
nothing, so tests that run on both backends can still ask for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from exai.server.stalls import StallDetector
from exai.server.stalls import stall_detector as _install

DEFAULT_TEST_THRESHOLD_S = 0.1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stall_threshold(seconds): the longest task step the stall_detector fixture tolerates",
    )


def threshold_for(item: pytest.Item) -> float:
    """The stall threshold for a test: its ``stall_threshold`` marker, else 0.1 s."""
    marker = item.get_closest_marker("stall_threshold")
    if marker is None:
        return DEFAULT_TEST_THRESHOLD_S
    if len(marker.args) != 1 or isinstance(marker.args[0], bool):
        raise pytest.UsageError("use @pytest.mark.stall_threshold(seconds)")
    return float(marker.args[0])


def stall_report(detector: StallDetector) -> str | None:
    """What to fail a test with, or ``None`` when no step went over the threshold."""
    if not detector.stall_count:
        return None
    worst = sorted(detector.stalls, reverse=True)[:5]
    lines = [f"  {duration * 1000:.1f} ms in task {name!r}" for duration, name in worst]
    return (
        f"the trio loop was blocked {detector.stall_count} time(s) for more than "
        f"{detector.threshold_s * 1000:.0f} ms (a blocking call in async code?):\n"
        + "\n".join(lines)
    )


@pytest.fixture
async def stall_detector(
    request: pytest.FixtureRequest, anyio_backend: object
) -> AsyncIterator[StallDetector]:
    """A :class:`StallDetector` watching the test's trio run; stalls fail the test."""
    threshold = threshold_for(request.node)
    backend = anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend
    if backend != "trio":
        yield StallDetector(threshold)
        return
    # Garbage-collection pauses are left out: on a loaded machine a full collection of what
    # earlier tests left behind can take 100+ ms, and this fixture looks for blocking calls.
    # So is the time the OS kept the loop's thread off the CPU, or kept another thread it
    # waited for there (a worker thread being started, the GIL's next holder): a busy machine
    # is not a blocking call. What remains is what the step itself ran or blocked.
    with _install(threshold, exclude_gc=True, exclude_descheduled=True) as detector:
        yield detector
    report = stall_report(detector)
    if report is not None:
        pytest.fail(report, pytrace=False)
