"""How this installation's ``exai`` is run: one source (``exai.client.autostart.exai_words``) for
the daemon the bridge starts, the bridge's start hint, the command line's pasted commands
(``exai.cli.hints``) and the service unit (``exai.cli.service``).

Each test builds a fake installation in ``tmp_path`` (a ``bin/`` with a ``python`` and maybe an
``exai`` script; a space in its path so quoting shows) and passes its interpreter explicitly or
through ``sys.executable``; nothing is run.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from exai.cli import hints, service
from exai.client import autostart
from exai.client.autostart import exai_script, exai_words


def _installation(tmp_path: Path, *, script: bool) -> tuple[str, str]:
    """``(python, exai script)`` paths of a fake virtualenv; the script exists if ``script``."""
    bin_dir = tmp_path / "my env" / "bin"
    bin_dir.mkdir(parents=True)
    python, exai = bin_dir / "python", bin_dir / "exai"
    python.write_text("")
    if script:
        exai.write_text("#!/bin/sh\n")
        exai.chmod(0o755)
    return str(python), str(exai)


def test_the_script_beside_the_interpreter_runs_this_exai(tmp_path: Path) -> None:
    python, exai = _installation(tmp_path, script=True)
    assert exai_script(python) == exai
    assert exai_words(python) == [exai]


def test_without_a_runnable_script_it_is_the_interpreter_with_dash_m(tmp_path: Path) -> None:
    python, exai = _installation(tmp_path, script=False)
    assert exai_words(python) == [python, "-m", "exai.cli"]
    Path(exai).write_text("#!/bin/sh\n")  # there, but not executable
    assert exai_script(python) is None
    assert exai_words(python) == [python, "-m", "exai.cli"]
    assert exai_words("") == ["python3", "-m", "exai.cli"]  # (Python could not tell)


@pytest.mark.parametrize("script", [True, False], ids=["script", "no-script"])
def test_the_bridge_and_the_command_line_name_the_same_exai(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: bool
) -> None:
    python, _ = _installation(tmp_path, script=script)
    words = exai_words(python)
    monkeypatch.setattr(sys, "executable", python)
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/site-packages/exai/cli/__main__.py"])
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))  # (PATH finds no exai)
    # the bridge: the list it starts the daemon with, and the hint it shows, quoted
    assert exai_words() == words
    hint = autostart.start_hint("ws://127.0.0.1:8079/mcp")
    assert hint == f"{shlex.join(words)} serve"
    assert shlex.split(hint) == [*words, "serve"]
    # the command line: its pasted commands and the service unit
    assert hints.exai_command() == shlex.join(words)
    assert service.exai_argv() == [*words, "serve"]


def test_the_command_line_names_the_running_exai_script_and_plain_exai_when_path_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python, exai = _installation(tmp_path, script=True)
    running = tmp_path / "other" / "exai"  # (a script the user ran, not beside the interpreter)
    running.parent.mkdir()
    running.write_text("#!/bin/sh\n")
    running.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    assert hints.exai_executable(str(running), python) == str(running)
    assert hints.exai_command(str(running), python) == shlex.quote(str(running))
    monkeypatch.setenv("PATH", os.path.dirname(exai))
    assert hints.exai_command("", python) == "exai"
