"""The benchmarks still run: scenarios are well-formed, the runner lists them, and the process
machinery (daemon, mock upstream, load generators) works end to end on a tiny load.

No figure is asserted: these tests only say that `make bench` can produce figures.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

OURS = (
    "overhead",
    "connections",
    "slow_upstream",
    "outage",
    "flood",
    "rate_accuracy",
    "peer",
    "abuse",
    "decoder",
    "scale_out",
    "schema",
    "http_client",
    "store_writes",
)


@pytest.mark.parametrize("name", OURS)
def test_scenario_module_has_name_description_and_run(name: str) -> None:
    mod = importlib.import_module(f"benchmarks.scenarios.{name}")
    assert name == mod.NAME
    assert isinstance(mod.DESCRIPTION, str) and mod.DESCRIPTION
    assert callable(mod.run)


def test_runner_lists_every_scenario() -> None:
    if not (REPO / "benchmarks" / "__main__.py").exists():
        pytest.skip("the benchmark runner (benchmarks/__main__.py) is not in this tree")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks", "list"],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for name in OURS:
        assert name in out.stdout


def test_closed_loop_load_against_a_daemon_process_records_every_call() -> None:
    from benchmarks.daemon import exai_daemon, mock_upstream, run_load

    with mock_upstream() as mock, exai_daemon(mock=mock) as d:
        res = run_load(
            "closed",
            {
                "mode": "mcp",
                "url": d.url,
                "connections": 2,
                "duration_s": 0.3,
                "warmup_s": 0.0,
                "think_s": 0.01,
                "tool": "version",
                "arguments": {},
            },
            limit_s=60,
        )
        assert d.proc.poll() is None
    recs = res["records"]
    assert recs["t"], "no call was recorded"
    assert set(recs["outcome"]) == {"ok"}
    assert len(recs["t"]) == len(recs["lat"]) == len(recs["outcome"])


def test_the_stepped_load_makes_the_calls_it_is_asked_for_over_each_door() -> None:
    """benchmarks.insns's load: one connection, ``run N`` steps, every call answered."""
    from benchmarks.daemon import LoadProcess, exai_daemon, mock_upstream
    from benchmarks.insns import _load_config, _run

    with mock_upstream() as mock, exai_daemon(mock=mock, tokens="t0k") as d:
        for series in ("chat1", "stream1", "http1", "httpstream1", "version1"):
            cfg = _load_config(series, d)
            cfg.update(token="t0k", warmup=2)
            if "headers" in cfg:
                cfg["headers"] = {"Authorization": "Bearer t0k"}
            lp = LoadProcess("stepped", cfg)
            try:
                assert lp.wait_event("ready", 60)["ok"] == 2
                _run(lp, 3, series)  # (raises unless all 3 were answered "ok")
                _run(lp, 2, series)
                lp.send("close")
                assert lp.result(60)["steps"] == 2
            finally:
                lp.kill()
    with pytest.raises(SystemExit):
        _load_config("chat64", d)


def test_idle_sessions_are_held_and_the_daemon_answers_503_past_its_cap() -> None:
    from benchmarks.daemon import LoadProcess, exai_daemon

    with exai_daemon(max_connections=5) as d:
        host, port = d.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        lp = LoadProcess("idle", {"host": host, "port": int(port), "n": 5, "parallel": 5})
        try:
            held = lp.wait_event("held", 60)
            lp.send("probe 3")
            probed = lp.wait_event("probed", 60)
            lp.send("close")
            lp.result(60)
        finally:
            lp.kill()
    assert held["n"] == 5
    assert [p["status"] for p in probed["probes"]] == [503, 503, 503]


def test_peer_scenario_measures_exai_and_its_floor_and_skips_a_missing_litellm(
    tmp_path, monkeypatch
) -> None:
    """The peer scenario end to end on a tiny plan: every exai and floor series completes calls
    and reads the server's CPU; LiteLLM, absent from an empty cache and not to be installed,
    is a skip with its reason, and its ratios are left empty rather than invented."""
    from benchmarks.scenarios import peer

    monkeypatch.setenv("EXAI_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EXAI_BENCH_LITELLM", raising=False)
    plan = peer.Plan(
        rounds=1,
        duration_s=0.3,
        warmup_s=0.1,
        concurrency=(1,),
        install=False,
        plot_dir=tmp_path / "plots",
    )
    out = peer.measure(plan)

    assert out["litellm"]["measured"] is False
    assert "not installed" in out["litellm"]["reason"]
    expected = {
        f"{k}_c1"
        for k in (
            "echo",
            "http",
            "http_stream",
            "commit",
            "commit_thread",
            "exai_chat",
            "exai_chat_stream",
            "exai_version",
            "http_echo",
            "http_echo_sse",
            "exai_http",
            "exai_http_stream",
        )
    }
    assert set(out["series"]) == expected
    for key, s in out["series"].items():
        assert s["calls_in_windows"] > 0, key
        assert s["not_ok"] == {}, (key, s["not_ok"])
        assert s["cpu_ms_per_call"] is not None and s["cpu_ms_per_call"] >= 0, key
        assert s["p50_ms"] is not None, key
    for kind in ("chat_c1", "chat_stream_c1", "http_c1", "http_stream_c1"):
        assert out["floor"][kind]["cpu_ms_per_call"] is not None
        assert out["floor"][kind]["p50_ms"] is not None
    targets = out["targets"]
    assert targets["cpu_per_chat_call_at_most_3x_floor"]["values"]["chat_c1"] is not None
    # the Streamable HTTP door, over its own floor (h11 echo + the same upstream and commit)
    assert targets["cpu_per_chat_call_at_most_3x_floor"]["values"]["http_stream_c1"] is not None
    assert targets["version_cpu_at_most_3x_echo"]["values"]["c1"] is not None
    assert targets["cpu_per_chat_call_at_most_0.1x_litellm"]["met"] is None
    assert all(p.endswith(".png") and (tmp_path / "plots") in Path(p).parents for p in out["plots"])


def test_litellm_can_be_turned_off_and_is_then_a_skip_with_a_reason(monkeypatch) -> None:
    from benchmarks import litellm_peer

    monkeypatch.setenv("EXAI_BENCH_LITELLM", "off")
    python, reason = litellm_peer.ensure(install=True)
    assert python is None
    assert reason is not None and "EXAI_BENCH_LITELLM" in reason


def test_profile_shares_buckets_loop_stacks_by_innermost_subsystem_and_counts_workers() -> None:
    from benchmarks.profile_shares import shares

    run = "thread (1): MainThread;main (exai/cli/main.py:1);run (trio/_core/_run.py:1)"
    task = run + ";unrolled_run (trio/_core/_run.py:2)"
    raw = "\n".join(
        [
            # the run loop waiting in epoll: no task step
            f"{run};EpollIOManager.get_events (trio/_core/_io_epoll.py:243) 30",
            # h11 under httpx under the provider: the innermost subsystem wins
            f"{task};Provider._exchange (exai/providers/provider.py:1);"
            "AsyncClient.send (httpx/_client.py:1);next_event (h11/_connection.py:1) 50",
            # json under the session: a stdlib leaf counts for its caller
            f"{task};Session.send (exai/server/session.py:1);dumps (json/__init__.py:1) 20",
            # a worker thread's SQLite commit: beside the loop, not in its shares
            "thread (2): Thread-1;_work (trio/_core/_thread_cache.py:1);"
            "_append_sync (exai/storage/sqlite.py:1) 40",
        ]
    )
    out = shares(raw)
    assert out["loop_thread_samples"] == 100
    assert out["worker_thread_samples"] == 40
    table = out["share_of_loop_thread_pct"]
    assert table["httpx / httpcore / h11"] == 50.0
    assert table["WebSocket / session"] == 20.0
    assert table["trio loop / epoll (no task running)"] == 30.0


def test_cpu_meter_gives_no_figure_rather_than_a_partial_one_for_a_process_it_cannot_read(
    tmp_path,
) -> None:
    from benchmarks.daemon import run_load

    cfg = {
        "mode": "sqlite",
        "db_path": str(tmp_path / "floor.db"),
        "duration_s": 0.2,
        "warmup_s": 0.05,
    }
    gone = 2**22 + 12345  # above the default pid_max: no such process
    read = run_load("closed", {**cfg, "cpu_pids": ["self"]}, limit_s=60)["meter"]
    unread = run_load("closed", {**cfg, "cpu_pids": ["self", gone]}, limit_s=60)["meter"]
    assert read["completed"] > 0 and read["cpu_total_s"] is not None
    assert unread["completed"] > 0 and unread["cpu_total_s"] is None


def test_the_cpu_meter_closes_its_window_on_a_completed_call_while_the_load_runs() -> None:
    """Each call (0.5 s) outlasts the metered window (0.05 s): on a busy machine a short window
    is like that. The window stays open until a call completes in it and the workers run until
    its closing reading is taken, so the meter always has a figure (it had none: no call
    completed in the window, or the workers ended and the meter was cancelled before its close
    was read, and the result had no ``meter`` at all)."""
    from benchmarks.daemon import exai_daemon, run_load
    from benchmarks.scenarios.abuse import PLUGIN

    with exai_daemon(args=PLUGIN) as d:
        res = run_load(
            "closed",
            {
                "mode": "mcp",
                "url": d.url,
                "duration_s": 0.05,
                "warmup_s": 0.01,
                "tool": "sleep",
                "arguments": {"seconds": 0.5},
                "cpu_pids": [d.proc.pid],
            },
            limit_s=60,
        )
    meter = res["meter"]
    assert meter["completed"] >= 1 and meter["completed_ok"] >= 1
    assert meter["cpu_total_s"] is not None
    assert res["records"]["t"], "no call sent in the window was recorded"
    assert set(res["records"]["outcome"]) == {"ok"}


@pytest.mark.parametrize(
    ("attack", "config"),
    [
        ("slow_readers", {"connections": 1, "calls": 4, "answer_bytes": 1024}),
        ("hostile_json", {}),
        ("one_connection_burst", {"connections": 1, "parallel": 3, "seconds": 0.1}),
        ("big_answers", {"answer_bytes": 1024}),
    ],
)
def test_every_abuse_attack_runs_against_a_daemon_process(attack: str, config: dict) -> None:
    from benchmarks.daemon import exai_daemon, run_load
    from benchmarks.scenarios.abuse import ATTACKS, PLUGIN

    assert attack in {name for name, _, _ in ATTACKS}
    with exai_daemon(args=PLUGIN) as d:
        res = run_load("abuse", {"attack": attack, "url": d.url, "duration_s": 0.5, **config})
        assert res["attack"] == attack
        assert d.proc.poll() is None


@pytest.mark.parametrize("n", [500, 2_000])
def test_slow_upstream_lets_every_one_of_its_calls_run_at_once(n: int) -> None:
    # A connection's second and later calls take a shared slot too (three quarters of
    # max_inflight): with max_inflight = n, 460 of 2,000 calls waited for the first answers.
    from benchmarks.scenarios import slow_upstream
    from exai.config import Settings
    from exai.server.admission import CallSlots

    settings = Settings(**slow_upstream.daemon_settings(n))
    slots = CallSlots(settings)
    sessions = n // slow_upstream.PER_SESSION
    assert slots.inflight.total_tokens >= n
    assert slots.shared_inflight.total_tokens >= n - sessions
    assert settings.session_max_inflight >= slow_upstream.PER_SESSION
    assert settings.session_max_pending >= slow_upstream.PER_SESSION


def test_slow_upstream_phases_split_the_storm_where_requests_reach_the_upstream() -> None:
    from benchmarks.scenarios.slow_upstream import phases

    class Cpu:
        def between(self, t0: float, t1: float) -> dict[str, float]:
            return {"window_s": round(t1 - t0, 3)}

    starts, ends = [10.0, 10.1, 10.1], [12.5, 13.0, 14.0]
    # 5.0: the warm-up call before the storm, not one of its requests
    trace = {"arrived": [5.0, 10.2, 10.3, 12.6], "done": [5.1, 12.2, 12.9, 14.6]}
    got = phases(starts, ends, trace, Cpu())  # type: ignore[arg-type]
    assert got["reached_upstream"] == 3
    assert got["first_reached_upstream_s"] == 0.2
    assert got["intake_s"] == 2.6
    assert got["arrived_after_first_answer"] == 1
    assert got["cpu_s_in_intake"] == {"window_s": 2.6}
    assert got["first_answer_s"] == 2.5
    assert got["drain_s"] == 1.5
    assert got["cpu_s_in_drain"] == {"window_s": 1.5}
    assert phases(starts, ends, None, Cpu())["intake"] == "no trace from the mock"  # type: ignore[arg-type]


def test_slot_waits_over_reads_the_daemons_slot_wait_histogram() -> None:
    from benchmarks.scenarios.slow_upstream import slot_waits_over

    text = "\n".join(
        [
            'exai_inflight_slot_wait_seconds_bucket{le="0.5"} 1530.0',
            'exai_inflight_slot_wait_seconds_bucket{le="1.0"} 1540.0',
            'exai_inflight_slot_wait_seconds_bucket{le="+Inf"} 2000.0',
            "exai_inflight_slot_wait_seconds_count 2000.0",
        ]
    )
    assert slot_waits_over(text, 1.0) == 460
    assert slot_waits_over(None, 1.0) is None
    assert slot_waits_over("", 1.0) is None


def test_the_traced_mock_notes_when_each_chat_request_arrived_and_was_answered(
    tmp_path: Path,
) -> None:
    import json
    import time
    import urllib.request

    from benchmarks.daemon import mock_upstream

    path = tmp_path / "trace.json"
    body = {"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}]}
    t0 = time.monotonic()
    with mock_upstream(trace_path=str(path)) as mock:
        request = urllib.request.Request(
            mock.base_url + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] == "mock:mock-fast: hi"
        with urllib.request.urlopen(mock.base_url + "/models", timeout=10) as r:
            assert r.status == 200  # not a chat request: not traced
    t1 = time.monotonic()
    trace = json.loads(path.read_text())
    assert len(trace["arrived"]) == 1
    assert len(trace["done"]) == 1
    assert t0 <= trace["arrived"][0] <= trace["done"][0] <= t1
