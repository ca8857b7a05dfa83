"""docs/deploy.md shows the HAProxy configuration the scale-out tests run, byte for byte."""

from __future__ import annotations

import re

from tests.scaleout.cluster import HAPROXY_CFG, REPO


def test_the_documented_haproxy_configuration_is_the_tested_one() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```haproxy\n(.*?)```", doc, re.S)
    assert blocks == [HAPROXY_CFG.read_text()]


def test_every_test_the_deploy_page_names_exists() -> None:
    doc = (REPO / "docs" / "deploy.md").read_text()
    for path, name in re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", doc):
        text = (REPO / path).read_text()
        if name:
            assert f"def {name}(" in text, f"{path}::{name}"
