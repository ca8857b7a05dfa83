"""Processes of a benchmark: the exai daemon, the mock upstream, an echo server, load generators.

Every benchmark runs the daemon, the mock upstream and the load as **separate processes** on
loopback, so the figures include the real sockets and no process steals the daemon's loop. This
module starts them, reads the address each one announces on stderr, and measures them from the
outside (RSS from ``/proc``, the daemon's ``status`` tool, its admin ``/metrics``).

The orchestration here is plain synchronous Python (threads read the children's pipes); the
children themselves run trio.

Typical use::

    with mock_upstream(latency_s=0.0) as mock, exai_daemon(mock=mock) as d:
        res = run_load("closed", {"url": d.url, ...})
        print(d.rss_bytes(), d.max_loop_stall_s())
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: settings every benchmark daemon gets unless a scenario overrides them
BASE_ENV: dict[str, str] = {
    "EXAI_PORT": "0",
    "EXAI_ADMIN_PORT": "0",
    "EXAI_LOG_LEVEL": "warning",
    "EXAI_LOG_FORMAT": "json",
    "EXAI_HEARTBEAT_INTERVAL_S": "0",
    # all load comes from 127.0.0.1
    "EXAI_MAX_CONNECTIONS_PER_IP": "100000",
}

#: the mock provider's settings (the provider is named ``mock``)
MOCK_MODELS = "mock-fast,mock-pro"

#: how the daemon is started (``exai serve``)
SERVE_CMD = [sys.executable, "-m", "exai.cli", "serve"]

_LISTEN = re.compile(r'exai: listening on (wss?://[^\s"]+)')
_ADMIN = re.compile(r'exai: admin on (https?://[^\s"]+)')
_MOCK = re.compile(r"mock-upstream: listening on (http://\S+)")
_ECHO = re.compile(r"echo: listening on (ws://\S+)")
_HTTP_ECHO = re.compile(r"http-echo: listening on (http://\S+)")


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _preexec() -> None:  # runs in the child between fork and exec
    raise_nofile()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any ``EXAI_``/``KIMI_``/``GLM_`` variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "KIMI_", "GLM_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class Child:
    """A child process whose stderr is collected and scanned for announced addresses."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        env: dict[str, str],
        patterns: dict[str, Any],
        cwd: str | None = None,
    ):
        self.name = name
        self.cmd = cmd
        self.lines: list[str] = []
        self.found: dict[str, str] = {}
        self._patterns = patterns
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd or str(REPO),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_preexec,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._cond:
                if len(self.lines) < 10_000:
                    self.lines.append(line)
                for key, pat in self._patterns.items():
                    m = pat.search(line)
                    if m and key not in self.found:
                        self.found[key] = m.group(1)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, keys: list[str], limit_s: float = 30.0) -> dict[str, str]:
        """Wait until every key was announced; raise with the child's stderr if it was not."""
        deadline = time.monotonic() + limit_s
        with self._cond:
            while not all(k in self.found for k in keys):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.2))
            if not all(k in self.found for k in keys):
                tail = "\n".join(self.lines[-30:])
                raise RuntimeError(f"{self.name} did not start ({' '.join(self.cmd)}):\n{tail}")
            return dict(self.found)

    def rss_bytes(self) -> int:
        """Resident set size of the process now (``VmRSS``)."""
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)

    def kill(self) -> None:
        """SIGKILL at once (an outage, not a shutdown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(2)


# ---------------------------------------------------------------------------- mock upstream
class MockUpstream(Child):
    """``python -m exai.testing.mock_upstream`` on a fixed port (so it can come back); with
    ``trace_path``, :mod:`benchmarks.load.traced_mock` (the same mock, writing when each chat
    request arrived and was answered to ``trace_path`` when it is stopped)."""

    def __init__(
        self, port: int, latency_s: float, models: str, trace_path: str | None = None
    ) -> None:
        self.port = port
        self.latency_s = latency_s
        self.models = models
        self.trace_path = trace_path
        module = ["exai.testing.mock_upstream"]
        if trace_path is not None:
            module = ["benchmarks.load.traced_mock", trace_path]
        cmd = [
            sys.executable,
            "-m",
            *module,
            "--port",
            str(port),
            "--latency-s",
            str(latency_s),
            "--models",
            models,
        ]
        super().__init__("mock upstream", cmd, clean_env(), {"url": _MOCK})
        self.base_url = self.wait_for(["url"])["url"]

    def restart(self) -> MockUpstream:
        """A new mock process on the same port (after :meth:`kill`)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return MockUpstream(self.port, self.latency_s, self.models)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def mock_upstream(
    latency_s: float = 0.0, models: str = MOCK_MODELS, trace_path: str | None = None
) -> Iterator[MockUpstream]:
    """Run the mock upstream as a process; yields it once it listens (``trace_path``: see
    :class:`MockUpstream`; the trace is there once the block is left)."""
    mock = MockUpstream(free_port(), latency_s, models, trace_path)
    try:
        yield mock
    finally:
        mock.stop()


# ---------------------------------------------------------------------------- echo server
@contextlib.contextmanager
def echo_server() -> Iterator[Child]:
    """The floor's bare trio-websocket echo server; ``child.found["url"]`` is its URL."""
    cmd = [sys.executable, "-m", "benchmarks.load.echo_server"]
    child = Child("echo server", cmd, clean_env(), {"url": _ECHO})
    try:
        child.wait_for(["url"])
        yield child
    finally:
        child.stop()


@contextlib.contextmanager
def http_echo_server() -> Iterator[Child]:
    """The HTTP door's floor: a bare h11 echo server; ``child.found["url"]`` is its URL."""
    cmd = [sys.executable, "-m", "benchmarks.load.http_echo_server"]
    child = Child("http echo server", cmd, clean_env(), {"url": _HTTP_ECHO})
    try:
        child.wait_for(["url"])
        yield child
    finally:
        child.stop()


# ---------------------------------------------------------------------------- daemon
class Daemon(Child):
    """``python -m exai.cli serve`` with benchmark settings."""

    def __init__(self, env: dict[str, str], state_dir: str, args: tuple[str, ...] = ()) -> None:
        self.env_settings = {k: v for k, v in env.items() if k.startswith("EXAI_")}
        self.state_dir = state_dir
        cmd = [*SERVE_CMD, *args]
        super().__init__("exai daemon", cmd, clean_env(**env), {"url": _LISTEN, "admin": _ADMIN})
        found = self.wait_for(["url", "admin"])
        self.url = found["url"]
        self.admin_url = found["admin"]

    # -- looking inside ---------------------------------------------------------------
    def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """One ``tools/call`` over a fresh connection (from a helper process); the response."""
        cfg = {"url": self.url, "name": name, "arguments": arguments or {}, "limit_s": 10}
        res = run_load("oneshot", cfg, limit_s=20)
        response: dict[str, Any] = res["response"]
        return response

    def status(self) -> dict[str, Any] | None:
        """The ``status`` tool's structuredContent, or None if it could not be read."""
        if self.proc.poll() is not None:
            return None
        try:
            resp = self.call_tool("status")
        except Exception:
            return None
        result = resp.get("result") or {}
        sc = result.get("structuredContent")
        if isinstance(sc, dict):
            return sc
        for block in result.get("content") or []:
            if block.get("type") == "text":
                try:
                    doc = json.loads(block["text"])
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    return doc
        return None

    def metrics_text(self) -> str | None:
        """The admin listener's ``/metrics`` body, or None when it does not serve one."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5) as r:
                return str(r.read().decode())
        except (urllib.error.URLError, OSError):
            return None

    def max_loop_stall_s(self) -> dict[str, Any]:
        """The longest loop stall the daemon saw since it started, and where that came from.

        Looks for a ``*max*stall*`` gauge in ``/metrics``, then for ``max_loop_stall_s`` in the
        ``status`` tool's ``daemon`` section. ``value`` is None when the daemon exposes neither.
        """
        text = self.metrics_text()
        if text:
            for line in text.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if "stall" in name and "max" in name:
                    try:
                        value = float(line.rsplit(" ", 1)[1])
                        return {"value": value, "source": f"/metrics {name}"}
                    except ValueError:
                        pass
        st = self.status()
        daemon = (st or {}).get("daemon") or {}
        for key in ("max_loop_stall_s", "loop_max_stall_s"):
            if key in daemon:
                return {"value": daemon[key], "source": f"status.daemon.{key}"}
        loop = daemon.get("loop")
        if isinstance(loop, dict) and "max_stall_s" in loop:
            return {"value": loop["max_stall_s"], "source": "status.daemon.loop.max_stall_s"}
        return {
            "value": None,
            "source": "not exposed by this daemon (no stall gauge in /metrics or status)",
        }

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines for ``event`` seen so far."""
        out = []
        for line in list(self.lines):
            if f'"{event}"' in line:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


def mock_provider_env(mock: MockUpstream | None, **fields: Any) -> dict[str, str]:
    """``EXAI_PROVIDER_MOCK_*`` for the mock upstream; ``fields`` like ``rpm=600``."""
    if mock is None:
        return {}
    env = {
        "EXAI_PROVIDER_MOCK_BASE_URL": mock.base_url,
        "EXAI_PROVIDER_MOCK_MODELS": mock.models,
    }
    for key, value in fields.items():
        env[f"EXAI_PROVIDER_MOCK_{key.upper()}"] = str(value)
    return env


@contextlib.contextmanager
def exai_daemon(
    mock: MockUpstream | None = None,
    provider: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
    **settings: Any,
) -> Iterator[Daemon]:
    """Run ``exai serve`` as a process with :data:`BASE_ENV`, ``settings`` (``max_inflight=…``
    become ``EXAI_MAX_INFLIGHT``) and, with ``mock``, a provider named ``mock`` for it.
    ``args`` go on the command line (``--plugin tests.daemon_tools:register``)."""
    state = tempfile.mkdtemp(prefix="exai-bench-")
    env = dict(BASE_ENV)
    env["EXAI_STATE_DIR"] = state
    env.update(mock_provider_env(mock, **(provider or {})))
    for key, value in settings.items():
        env[f"EXAI_{key.upper()}"] = str(value)
    daemon = Daemon(env, state, args)
    try:
        yield daemon
    finally:
        daemon.stop(grace_s=15)
        shutil.rmtree(state, ignore_errors=True)


# ---------------------------------------------------------------------------- load processes
class LoadProcess:
    """A load generator ``python -m benchmarks.load.<module> <json config>``.

    It writes JSON lines on stdout (``{"event": ...}``); the last one is ``{"event": "result"}``.
    Lines written to its stdin are commands the module understands (``probe``, ``close``…).
    """

    def __init__(self, module: str, config: dict[str, Any]) -> None:
        self.module = module
        cmd = [sys.executable, "-m", f"benchmarks.load.{module}", json.dumps(config)]
        self.proc = subprocess.Popen(
            cmd,
            env=clean_env(),
            cwd=str(REPO),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_preexec,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._out = threading.Thread(target=self._read_out, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "text", "text": line.rstrip("\n")}
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self.stderr) < 2000:
                self.stderr.append(line.rstrip("\n"))

    def send(self, command: str) -> None:
        """Write one command line to the process's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_event(self, name: str, limit_s: float = 600.0) -> dict[str, Any]:
        """Wait for the first event called ``name`` (raise with stderr if the process ends)."""
        deadline = time.monotonic() + limit_s
        with self._cond:
            while True:
                for ev in self.events:
                    if ev.get("event") == name:
                        return ev
                done = self.proc.poll() is not None and not self._out.is_alive()
                left = deadline - time.monotonic()
                if done or left <= 0:
                    tail = "\n".join(self.stderr[-30:])
                    why = "ended" if done else "timed out"
                    raise RuntimeError(f"load process {self.module} {why} before {name!r}:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def progress(self) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == "progress"]

    def result(self, limit_s: float = 600.0) -> dict[str, Any]:
        """The final ``result`` event; the process is reaped."""
        ev = self.wait_event("result", limit_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        return ev

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def run_load(module: str, config: dict[str, Any], limit_s: float = 600.0) -> dict[str, Any]:
    """Run a load module to completion and return its result event."""
    lp = LoadProcess(module, config)
    try:
        return lp.result(limit_s)
    finally:
        lp.kill()


class RssSampler:
    """Samples a process's RSS every ``interval_s`` in a thread: ``samples`` of (t, bytes)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), int(self._proc.memory_info().rss)))
            except Exception:
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)


# ---------------------------------------------------------------------------- figures
def pct(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def latency_summary(lat_s: list[float]) -> dict[str, Any]:
    """n, p50/p95/p99/max/mean in milliseconds."""
    if not lat_s:
        return {"n": 0}

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "n": len(lat_s),
        "p50_ms": ms(pct(lat_s, 50)),
        "p95_ms": ms(pct(lat_s, 95)),
        "p99_ms": ms(pct(lat_s, 99)),
        "max_ms": ms(max(lat_s)),
        "mean_ms": ms(sum(lat_s) / len(lat_s)),
    }


def count(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, digits)


def chat_unavailable(d: Daemon) -> str | None:
    """None when ``chat`` answers through the mock provider, else why it does not."""
    try:
        resp = d.call_tool("chat", {"prompt": "warm-up", "model": "mock-fast"})
    except Exception as exc:
        return f"calling chat failed: {exc}"
    if "error" in resp:
        err = resp["error"]
        return f"chat is not served by this daemon: {err.get('message')} ({err.get('data')})"
    if (resp.get("result") or {}).get("isError"):
        return f"chat returned an error result: {json.dumps(resp['result'])[:300]}"
    return None


def loop_stalls(
    d: Daemon,
    since_wall: float,
    until_wall: float | None = None,
    poller: StallPoller | None = None,
) -> dict[str, Any]:
    """The longest loop stall of the daemon (its gauge since start) and the stalls it logged
    (steps over its ``stall_threshold_s``) between the two wall-clock times."""
    alive = d.proc.poll() is None
    if alive:
        gauge = d.max_loop_stall_s()
    elif poller is not None and poller.last is not None:
        gauge = dict(poller.last)
        gauge["source"] += ", last reading before the daemon exited"
    else:
        gauge = {"value": None, "source": "the daemon had exited; only its log is left"}
    until = until_wall if until_wall is not None else time.time() + 1
    during = [
        {"duration_s": e.get("duration_s"), "task": e.get("task")}
        for e in d.log_events("loop.stall")
        if since_wall - 0.5 <= float(e.get("ts", 0)) <= until
    ]
    during.sort(key=lambda e: -float(e["duration_s"] or 0))
    longest_logged = float(during[0]["duration_s"]) if during else None
    value = gauge["value"]
    if value is None:
        value = longest_logged
    return {
        "max_loop_stall_s": None if value is None else round(float(value), 4),
        "source": gauge["source"],
        "stalls_logged_during_load": len(during),
        "longest_logged_during_load": during[:10],
        "target_s": 0.05,
        "met": None if value is None else float(value) <= 0.05,
    }


def process_rss_mb(child: Child) -> float | None:
    try:
        return round(child.rss_bytes() / 2**20, 1)
    except Exception:
        return None


RESULTS = REPO / "benchmarks" / "results"


def save_figure(fig: Any, name: str) -> str:
    """Save a matplotlib figure as ``benchmarks/results/<name>.png``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path.relative_to(REPO))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cdf_points(lat_s: list[float]) -> tuple[list[float], list[float]]:
    """(latency ms, fraction) for a CDF plot, thinned to at most 2,000 points."""
    s = sorted(lat_s)
    n = len(s)
    if n == 0:
        return [], []
    step = max(1, n // 2000)
    xs = [s[i] * 1000 for i in range(0, n, step)] + [s[-1] * 1000]
    ys = [i / n for i in range(0, n, step)] + [1.0]
    return xs, ys


def plot_name(scenario: str) -> str:
    """``<UTC stamp>-<scenario>``: the plot sorts next to the runner's JSON of the same run."""
    from benchmarks.common import utc_stamp

    return f"{utc_stamp()}-{scenario}"


def machine_load() -> dict[str, Any]:
    """What else the machine was doing when the scenario started (1/5/15 min load average)."""
    try:
        la = os.getloadavg()
    except OSError:
        return {}
    return {"loadavg_1_5_15": [round(x, 2) for x in la], "cpus": os.cpu_count()}


def health(d: Child) -> dict[str, Any]:
    """Whether the process is still running; its exit code and last stderr lines if not."""
    code = d.proc.poll()
    if code is None:
        return {"alive": True}
    tail = [line for line in d.lines[-40:] if line.strip()]
    return {"alive": False, "exit_code": code, "stderr_tail": tail[-12:]}


class StallPoller:
    """Reads the daemon's longest-stall gauge every ``interval_s`` in a thread, so the figure
    survives a daemon that dies before the end of the scenario."""

    def __init__(self, d: Daemon, interval_s: float = 1.0) -> None:
        self.d = d
        self.interval_s = interval_s
        self.last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.d.proc.poll() is not None:
                return
            text = self.d.metrics_text()
            if text is None:
                continue
            for line in text.splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if not line.startswith("#") and "stall" in name and "max" in name:
                    with contextlib.suppress(ValueError):
                        value = float(line.rsplit(" ", 1)[1])
                        self.last = {"value": value, "source": f"/metrics {name} (polled)"}

    def __enter__(self) -> StallPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
