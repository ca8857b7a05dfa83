"""Fixtures for the security tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

import exai.server.admin  # noqa: F401
from exai.tools import default_registry

# serve() imports the admin listener and the tools lazily; a first import on the event loop would
# trip the stall detector in whichever test happens to start the first daemon.
default_registry()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def exai_log() -> Iterator[list[logging.LogRecord]]:
    """Every record the ``exai`` logger emits during the test (whatever its propagation)."""
    logger = logging.getLogger("exai")
    handler = _Collect()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
