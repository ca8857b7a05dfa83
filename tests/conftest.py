"""Shared fixtures. Tests run on trio by default; resilience tests also run on asyncio.

Every async test under the integration folders runs with the loop stall detector
(``tests/stall_plugin.py``): a task step that blocks the trio loop for more than 0.1 s fails
the test and names the task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.stall_plugin"]

# Hypothesis's defaults time each example (a 200 ms deadline) and fail a test whose data is
# slow to generate: on a busy machine both fail tests that are right. Property tests check
# properties; how long an example takes is not one of them.
settings.register_profile("exai", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("exai")


def _check_the_builtin_tool_schemas_once() -> None:
    """Registering a tool checks its schema against the JSON Schema metaschema, which costs
    a tenth of a second for the built-in tools the first time in a process. ``exai serve``
    pays it before its event loop starts (``serve()`` in a worker thread); tests build
    registries inside their loop, so the one-time cost is paid here, at start."""
    from exai.tools import default_registry

    default_registry()


_check_the_builtin_tool_schemas_once()


def _share_one_client_ssl_context() -> None:
    """Every ``httpx.AsyncClient`` builds an SSL context in its constructor — it reads and
    parses the CA bundle from disk, tens of milliseconds, and on a machine whose disk is busy
    (another suite's fsyncs) over 100 ms — even for the ``http://`` loopback URLs of the tests.
    Tests make their clients (theirs, and the MCP SDK's) inside the trio loop, so the stall
    detector rightly saw a blocking call there (``mcp_http`` at 102–193 ms under a ``dd … fsync``
    loop, 7 of 20 runs). The default context is built once, here, and shared: an SSL context
    may serve many connections. Any other ``verify``/``cert`` is built as httpx would."""
    import httpx
    import httpx._transports.default as default

    shared = httpx.create_ssl_context()
    build = default.create_ssl_context

    def create_ssl_context(verify: object = True, cert: object = None, trust_env: bool = True):  # type: ignore[no-untyped-def]
        if verify is True and cert is None:
            return shared
        return build(verify=verify, cert=cert, trust_env=trust_env)  # type: ignore[arg-type]

    default.create_ssl_context = create_ssl_context  # type: ignore[assignment]


_share_one_client_ssl_context()

#: folders whose async tests are wrapped in the stall detector
STALL_CHECKED = (
    "server",
    "client",
    "storage",
    "providers",
    "tools",
    "security",
    "review",
    "adversarial",
)
#: test files that block the loop on purpose (they test the detector itself)
STALLS_ON_PURPOSE = ("test_stalls.py",)

#: Under pytest-xdist (``make test`` runs ``-n 2``) these run one at a time, on one worker,
#: while the other worker runs the rest: each starts a cluster of processes (HAProxy and three
#: daemons; load generators; ten thousand connections; node) or measures a rate or the machine's
#: scheduling over seconds of real time, and two of them at once on two cores would measure each
#: other. Paths relative to tests/ (a folder, or one file).
ONE_AT_A_TIME = (
    "scaleout",
    "test_benchmarks_smoke.py",
    "resilience/test_redis_bucket.py",
    "server/test_stalls.py",
    "adversarial/test_http_door_refusals.py",
    "client/test_ts_sdk_http.py",
)
#: files whose tests share an expensive module-scoped fixture (a daemon run through every path
#: once): kept on one worker, so it runs once
ONE_WORKER_PER_FILE = ("security/test_secret_hygiene.py",)


def work_unit(nodeid: str) -> str:
    """What pytest-xdist hands a worker at once: ``one_at_a_time`` for a test under
    :data:`ONE_AT_A_TIME`, its file for one in :data:`ONE_WORKER_PER_FILE`, else the test."""
    path = nodeid.split("::", 1)[0].removeprefix("tests/")
    if path.split("/", 1)[0] in ONE_AT_A_TIME or path in ONE_AT_A_TIME:
        return "one_at_a_time"
    if path in ONE_WORKER_PER_FILE:
        return path
    return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``-n N`` (``--dist load``) schedules by :func:`work_unit`. (pytest-xdist's own
    ``--dist loadgroup`` does nothing under pytest 9: it renames ``item._nodeid``, which
    pytest 9 no longer reads.) Other ``--dist`` modes are left as they are."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return Scheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_stalls: do not fail this test on loop stalls")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get("EXAI_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    skip = pytest.mark.skip(reason="slow soak test: run with -m slow or EXAI_SLOW=1")
    here = Path(__file__).parent
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip)
        try:
            folder = Path(str(item.fspath)).relative_to(here).parts[0]
        except ValueError:
            continue
        if (
            folder in STALL_CHECKED
            and "anyio" in item.keywords
            and "allow_stalls" not in item.keywords
            and Path(str(item.fspath)).name not in STALLS_ON_PURPOSE
        ):
            fixturenames = getattr(item, "fixturenames", None)
            if fixturenames is not None and "stall_detector" not in fixturenames:
                fixturenames.append("stall_detector")


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
