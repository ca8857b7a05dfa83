"""Docs stay true to the code: .env.example lists every setting and parses as-is."""

from __future__ import annotations

import re

from exai.config import PROVIDER_FIELDS, Settings, known_env_names
from tests.helpers import REPO


def test_env_example_lists_every_setting():
    text = (REPO / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))
    missing = [n for n in known_env_names() if not n.endswith("_FILE") and n not in names]
    assert missing == []
    for prefix in ("KIMI", "GLM"):
        for fld in PROVIDER_FIELDS:
            assert f"{prefix}_{fld.upper()}" in names


def test_env_example_loads_as_a_dotenv_file_with_empty_secrets():
    s = Settings.from_env({}, env_file=REPO / ".env.example", config_file="")
    assert s.tokens is None
    assert all(p.api_key is None for p in s.providers)
    assert s.provider("kimi").base_url.startswith("https://")


def test_readme_quick_start_is_two_commands():
    text = (REPO / "README.md").read_text()
    assert "make serve" in text and "make test" in text


def test_env_example_as_a_dotenv_file_changes_no_default():
    from_example = Settings.from_env({}, env_file=REPO / ".env.example", config_file="")
    defaults = Settings.from_env({}, env_file="", config_file="")
    assert from_example.display() == defaults.display()


def test_gen_env_example_reads_the_settings_of_its_own_tree(tmp_path):
    """scripts/gen_env_example.py describes the exai beside it, whatever the interpreter would
    import otherwise (an editable install of another checkout): a copy of the script in a tree
    whose ``exai.config`` has one setting prints that setting, not this checkout's."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gen_env_example.py", tmp_path / "scripts")
    (tmp_path / "exai").mkdir()
    (tmp_path / "exai" / "__init__.py").write_text("")
    (tmp_path / "exai" / "config.py").write_text(
        "import attrs\n"
        "@attrs.define\n"
        "class Settings:\n"
        "    only_here: int = attrs.field(default=7, metadata={'doc': 'a setting of this tree'})\n"
        "@attrs.define\n"
        "class ProviderSettings:\n"
        "    timeout_s: float = 1.0\n"
        "PROVIDER_FIELDS = ('timeout_s',)\n"
        "BUILTIN_PROVIDERS = {'kimi': {}, 'glm': {}}\n"
        "def env_name(f):\n"
        "    return 'EXAI_' + f.name.upper()\n"
    )
    out = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_env_example.py")],
        cwd=tmp_path.parent,  # neither tree on the path by the working directory
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "EXAI_ONLY_HERE=7" in out
    assert "EXAI_LOG_LEVEL" not in out
