"""How ``make test`` spreads the suite over two pytest-xdist workers (tests/conftest.py).

The tests that start a cluster of processes or measure in real time run one at a time, on one
worker; a renamed file or folder must not silently leave that list.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import ONE_AT_A_TIME, ONE_WORKER_PER_FILE, work_unit

TESTS = Path(__file__).parent


def test_every_path_the_scheduling_names_exists() -> None:
    for path in (*ONE_AT_A_TIME, *ONE_WORKER_PER_FILE):
        assert (TESTS / path).exists(), path


def test_cluster_and_timing_tests_share_one_work_unit_and_the_rest_go_one_by_one() -> None:
    assert work_unit("tests/scaleout/test_kill.py::test_a") == "one_at_a_time"
    assert work_unit("tests/server/test_stalls.py::test_b[x]") == "one_at_a_time"
    assert work_unit("tests/test_benchmarks_smoke.py::test_c") == "one_at_a_time"
    hygiene = "tests/security/test_secret_hygiene.py"
    assert work_unit(f"{hygiene}::test_d") == work_unit(f"{hygiene}::test_e")
    assert work_unit(f"{hygiene}::test_d") not in (f"{hygiene}::test_d", "one_at_a_time")
    assert work_unit("tests/server/test_daemon.py::test_f") == "tests/server/test_daemon.py::test_f"
    # (a file whose name starts like a listed one is not in the list)
    assert work_unit("tests/server/test_stalls_more.py::t") == "tests/server/test_stalls_more.py::t"
