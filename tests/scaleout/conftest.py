"""Fixtures of the scale-out tests: HAProxy, three ``exai serve`` daemons, a mock upstream.

``haproxy`` skips the test (with the reason) where the binary cannot be found; ``make services``
installs the Debian package when it runs as root with apt. The daemons share the loopback Redis
(the test's own key prefix) and PostgreSQL (the session's database, the test's own schema), as
in ``tests/storage/conftest.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from exai.testing import MockUpstream
from tests.scaleout.cluster import Cluster, find_haproxy, open_cluster
from tests.storage.conftest import (  # noqa: F401  (fixtures)
    pg_database,
    pg_schema,
    pg_url,
    redis_prefix,
)


@pytest.fixture(scope="session")
def haproxy() -> str:
    """The ``haproxy`` binary (skips the test when it is not installed)."""
    binary = find_haproxy()
    if binary is None:
        pytest.skip(
            "haproxy is not installed: `apt-get install -y haproxy` (Debian package haproxy; "
            "`make services` does it when it runs as root)"
        )
    return binary


@pytest.fixture
async def mock() -> AsyncIterator[MockUpstream]:
    """The provider every daemon of the cluster calls (in this test's process)."""
    async with MockUpstream(models=("mock-fast",)) as upstream:
        yield upstream
    assert upstream.errors == []


ClusterFactory = Callable[..., AbstractAsyncContextManager[Cluster]]


@pytest.fixture
def cluster_factory(
    tmp_path: Path,
    haproxy: str,
    mock: MockUpstream,
    pg_database: str,  # noqa: F811
    pg_schema: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> ClusterFactory:
    """``async with cluster_factory(**env) as cluster:`` — HAProxy and three daemons sharing
    this test's Redis prefix and Postgres schema; ``env`` is added to every daemon's."""

    def make(
        running: int = 3,
        argv: tuple[str, ...] = (),
        *,
        pg_port: int = 5432,
        redis_port: int = 6379,
        **env: Any,
    ) -> Any:
        """``pg_port`` / ``redis_port`` reach the servers another way (a FaultProxy)."""
        return open_cluster(
            tmp_path / "cluster",
            mock_url=mock.base_url,
            storage_url=pg_url(pg_database, schema=pg_schema, port=pg_port),
            redis_url=f"redis://127.0.0.1:{redis_port}/0",
            redis_prefix=redis_prefix,
            running=running,
            env={k: str(v) for k, v in env.items()},
            argv=argv,
            haproxy=haproxy,
        )

    return make
