"""The LiteLLM proxy as a peer to measure exai against: its cached venv, its config, its process.

LiteLLM is never a dependency of exai and none of its code is in this repository. It is
installed, on first use, into its own virtual environment outside the repo —
``~/.cache/exai-bench/litellm-<version>-<hash of the lock>/`` (``EXAI_BENCH_CACHE`` moves the
cache) — from ``benchmarks/litellm-requirements.txt``, every package pinned, so each run measures
the same proxy. ``EXAI_BENCH_LITELLM=off`` skips it; a failed install is a skip with pip's
reason, never a failed benchmark.

How the proxy is run (what a fair operator would set for throughput):

* ``litellm --config <file> --host 127.0.0.1 --port <free> --num_workers 1`` (one uvicorn
  worker: one process, one event loop, as exai is one process and one loop);
* one model ``mock-fast`` = ``openai/mock-fast`` at the mock upstream's ``/v1``;
* no database (so no spend logs, no key table), no cache, no callbacks, no alerting;
  ``disable_spend_logs``, ``disable_error_logs``, ``telemetry: false``;
* ``LITELLM_LOG=ERROR`` (uvicorn's log level follows it: no access log line per request);
* ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (the model price map is read from the package, not
  fetched at start);
* a master key (``sk-…``): the proxy refuses to start without one, and checks it on every
  request, as a deployment would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from benchmarks.daemon import REPO, Child, free_port

LITELLM_VERSION = "1.110.2"
LOCK = REPO / "benchmarks" / "litellm-requirements.txt"
MASTER_KEY = "sk-exai-bench-master-key"
MODEL = "mock-fast"

#: set to one of these to skip the LiteLLM part of the peer benchmark
OFF_VALUES = ("0", "off", "no", "skip", "false")


def cache_root() -> Path:
    return Path(os.environ.get("EXAI_BENCH_CACHE") or "~/.cache/exai-bench").expanduser()


def venv_dir() -> Path:
    """Where the pinned LiteLLM lives: the version and a hash of the lock in the name, so a
    changed lock gets a fresh venv instead of an upgraded one."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:10]
    return cache_root() / f"litellm-{LITELLM_VERSION}-{digest}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure(install: bool = True, limit_s: float = 1200.0) -> tuple[Path | None, str | None]:
    """The LiteLLM venv's python, installing it when missing and ``install`` is true.

    Returns ``(python, None)``, or ``(None, reason)`` when LiteLLM cannot be used here (turned
    off, not installed and ``install`` false, or the install failed — pip's last lines).
    """
    if (os.environ.get("EXAI_BENCH_LITELLM") or "").strip().lower() in OFF_VALUES:
        return None, "skipped: EXAI_BENCH_LITELLM is set to off"
    venv = venv_dir()
    marker = venv / ".installed"
    if marker.exists() and _python(venv).exists():
        return _python(venv), None
    if not install:
        return None, f"LiteLLM {LITELLM_VERSION} is not installed in {venv} (install not allowed)"
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [base, "-m", "venv", str(venv)],
        [
            str(_python(venv)),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            str(LOCK),
        ],
    ]
    deadline = time.monotonic() + limit_s
    for cmd in steps:
        try:
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            return None, f"could not install LiteLLM {LITELLM_VERSION}: {exc}"
        if out.returncode != 0:
            tail = [
                line
                for line in (out.stderr + out.stdout).splitlines()
                if line.strip() and "is ignored: it is neither a file" not in line
            ][-8:]
            shutil.rmtree(venv, ignore_errors=True)
            return None, (
                f"could not install LiteLLM {LITELLM_VERSION} ({' '.join(cmd[-3:])}): "
                + " | ".join(tail)
            )
    marker.write_text(LITELLM_VERSION + "\n", encoding="utf-8")
    return _python(venv), None


def installed_version(python: Path) -> str | None:
    """``litellm``'s version in that venv (read from its metadata, without importing it)."""
    try:
        out = subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def config_text(upstream_v1: str) -> str:
    """The proxy's ``config.yaml`` (see the module docstring for why each setting)."""
    return f"""\
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream_v1}
      api_key: bench-upstream-key
litellm_settings:
  telemetry: false
  request_timeout: 600
general_settings:
  master_key: {MASTER_KEY}
  disable_spend_logs: true
  disable_error_logs: true
"""


#: the proxy's environment on top of a clean one
ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "NO_PROXY": "127.0.0.1,localhost",
}


class LiteLLMProxy(Child):
    """A running ``litellm`` proxy; ``url`` is its ``/v1/chat/completions``."""

    def __init__(self, python: Path, upstream_v1: str, workdir: str, start_limit_s: float) -> None:
        self.port = free_port()
        cfg = Path(workdir) / "litellm.yaml"
        cfg.write_text(config_text(upstream_v1), encoding="utf-8")
        self.config = cfg.read_text(encoding="utf-8")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EXAI_", "LITELLM_", "OPENAI_", "PYTHON"))
        }
        env.update(ENV)
        cmd = [
            str(python.parent / "litellm"),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num_workers",
            "1",
        ]
        super().__init__("litellm proxy", cmd, env, {}, cwd=workdir)  # no stray .env read
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        self._wait_ready(start_limit_s)

    def _wait_ready(self, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            url = self.base + "/health/liveliness"
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.25)
        tail = "\n".join(line for line in self.lines[-20:] if line.strip())
        self.stop()
        raise RuntimeError(f"the LiteLLM proxy did not start within {limit_s:.0f} s:\n{tail}")


@contextlib.contextmanager
def litellm_proxy(
    python: Path, upstream_v1: str, start_limit_s: float = 180.0
) -> Iterator[LiteLLMProxy]:
    """Run the proxy against ``upstream_v1`` (``http://127.0.0.1:PORT/v1``) until the block ends."""
    workdir = tempfile.mkdtemp(prefix="exai-bench-litellm-")
    try:
        proxy = LiteLLMProxy(python, upstream_v1, workdir, start_limit_s)
        try:
            yield proxy
        finally:
            proxy.stop(grace_s=10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
