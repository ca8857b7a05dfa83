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
