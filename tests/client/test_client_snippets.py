"""The README's Claude Code, Cursor and VS Code snippets for the Streamable HTTP door, tried.

Each snippet (a ```json block after a ``<!-- client: NAME -->`` marker in README.md) is checked
against the format its client documents, its variables are expanded as that client does, and
the official MCP SDK then connects with exactly that URL (on the test daemon's port) and those
headers, lists the tools and calls ``version`` — what the editor does on start. The editors
themselves cannot run here; their config formats, as documented:

* Claude Code — https://code.claude.com/docs/en/mcp: ``mcpServers.<name>`` with ``"type":
  "http"``, ``url``, ``headers``; ``${VAR}`` (and ``${VAR:-default}``) expanded from the
  environment, in ``headers`` too.
* Cursor — https://cursor.com/docs/mcp: ``mcpServers.<name>`` with ``url`` (a remote server)
  and ``headers``; ``${env:NAME}`` expanded.
* VS Code — https://code.visualstudio.com/docs/copilot/reference/mcp-configuration:
  ``servers.<name>`` with ``"type": "http"``, ``url``, ``headers``; ``inputs`` of
  ``promptString`` (``id``, ``description``, ``password``) referred to as ``${input:id}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx2
import jsonschema
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from exai.config import Secret
from tests.helpers import REPO, make_settings, running_daemon

pytestmark = pytest.mark.anyio

TOKEN = "editor-" + "e" * 40

_HEADERS = {"type": "object", "additionalProperties": {"type": "string"}}
_URL = {"type": "string", "pattern": "^https?://"}

#: the documented shape of each client's file, as far as the snippet uses it
SCHEMAS: dict[str, dict[str, Any]] = {
    "claude-code": {
        "type": "object",
        "required": ["mcpServers"],
        "additionalProperties": False,
        "properties": {
            "mcpServers": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "type": "object",
                    "required": ["type", "url"],
                    "additionalProperties": False,
                    "properties": {"type": {"const": "http"}, "url": _URL, "headers": _HEADERS},
                },
            }
        },
    },
    "cursor": {
        "type": "object",
        "required": ["mcpServers"],
        "additionalProperties": False,
        "properties": {
            "mcpServers": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": {
                    "type": "object",
                    "required": ["url"],
                    "additionalProperties": False,
                    "properties": {"url": _URL, "headers": _HEADERS},
                },
            }
        },
    },
    "vscode": {
        "type": "object",
        "required": ["servers"],
        "additionalProperties": False,
        "properties": {
            "inputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "id", "description"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"const": "promptString"},
                        "id": {"type": "string"},
                        "description": {"type": "string"},
                        "password": {"type": "boolean"},
                    },
                },
            },
            "servers": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"pattern": "^[a-zA-Z][a-zA-Z0-9_-]*$"},
                "additionalProperties": {
                    "type": "object",
                    "required": ["type", "url"],
                    "additionalProperties": False,
                    "properties": {"type": {"const": "http"}, "url": _URL, "headers": _HEADERS},
                },
            },
        },
    },
}


def snippets() -> dict[str, dict[str, Any]]:
    text = (REPO / "README.md").read_text()
    found = re.findall(r"<!-- client: ([\w-]+) -->.*?```json\n(.*?)```", text, re.S)
    return {name: json.loads(block) for name, block in found}


def _claude(value: str, env: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value
    )


def _cursor(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{env:(\w+)\}", lambda m: env.get(m.group(1), ""), value)


def _vscode(value: str, inputs: dict[str, str]) -> str:
    return re.sub(r"\$\{input:([\w-]+)\}", lambda m: inputs[m.group(1)], value)


def server_of(name: str, doc: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The snippet's one server: its URL and its headers with the variables expanded as the
    client expands them (the user's environment holds EXAI_TOKEN; VS Code asked for it)."""
    env = {"EXAI_TOKEN": TOKEN}
    expand: Callable[[str], str]
    if name == "vscode":
        inputs = {i["id"]: TOKEN for i in doc.get("inputs", [])}
        (server,) = doc["servers"].values()
        expand = lambda v: _vscode(v, inputs)  # noqa: E731
    else:
        (server,) = doc["mcpServers"].values()
        expand = (
            (lambda v: _claude(v, env)) if name == "claude-code" else (lambda v: _cursor(v, env))
        )
    return expand(server["url"]), {k: expand(v) for k, v in server.get("headers", {}).items()}


def test_the_readme_has_a_snippet_for_each_client_in_its_documented_format() -> None:
    found = snippets()
    assert set(found) == set(SCHEMAS)
    for name, doc in found.items():
        jsonschema.validate(doc, SCHEMAS[name])
        url, headers = server_of(name, doc)
        assert urlsplit(url).path == "/mcp" and urlsplit(url).port == 8079  # the default port
        assert headers == {"Authorization": f"Bearer {TOKEN}"}
        # a variable left unexpanded would send its name as the token
        assert "${" not in json.dumps(headers)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_each_snippet_connects_to_the_daemon_with_the_official_sdk(tmp_path, name) -> None:
    url, headers = server_of(name, snippets()[name])
    settings = make_settings(tmp_path, tokens=Secret(f"editor:{TOKEN}"))
    async with running_daemon(settings) as daemon:
        port = urlsplit(daemon.url).port
        parts = urlsplit(url)
        here = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port}"))
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(streamable_http_client(here, http_client=http), mode="legacy") as client,
        ):
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"chat", "version", "thinkdeep"} <= names
            result = await client.call_tool("version", {})
            assert result.is_error is False
        # without the header the daemon refuses (tokens are configured)
        async with httpx2.AsyncClient() as bare:
            refused = await bare.post(here, json={}, headers={"Content-Type": "application/json"})
            assert refused.status_code == 401
