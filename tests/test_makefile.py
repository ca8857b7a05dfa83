"""`make serve` on a fresh clone says what each step does before it runs it (issue 17, item 2).

The real Makefile runs against a stand-in Python: ``PYTHON`` points at a small script that
makes a virtualenv of stand-ins (``python``, ``pip``, ``exai`` that print how they were called),
so the recipe runs whole — venv, pip, install stamp, serve — without the network.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO

STAND_IN = """#!/bin/sh
# stand-in for "python3 -m venv DIR": DIR/bin/{python,pip,exai} print how they were called
dir="$3"
mkdir -p "$dir/bin"
cp "$0" "$dir/bin/python"
for tool in pip exai; do
  printf '#!/bin/sh\\necho "%s ran: $*"\\n' "$tool" > "$dir/bin/$tool"
  chmod +x "$dir/bin/$tool"
done
echo "python ran: $*"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_says_each_step_before_it_runs(tmp_path):
    python = tmp_path / "python3"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "serve",
            f"VENV={venv}",
            f"PYTHON={python}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == [
        f"make: creating the virtualenv {venv} with {python}",
        f"python ran: -m venv {venv}",
        f"make: upgrading pip in {venv}",
        "pip ran: install --quiet --quiet --upgrade pip",
        f"make: installing exai and its dependencies into {venv} (pip; about 30 s the first time)",
        "pip ran: install --quiet --quiet -e .[daemon]",
        "make: installed",
        f"make: starting the daemon: {venv}/bin/exai serve (Ctrl-C stops it)",
        "exai ran: serve",
    ]
    # a second run installs nothing again and says only that it starts
    again = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "serve",
            f"VENV={venv}",
            f"PYTHON={python}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.stdout.splitlines() == [
        f"make: starting the daemon: {venv}/bin/exai serve (Ctrl-C stops it)",
        "exai ran: serve",
    ]
