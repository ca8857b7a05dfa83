"""Support for the tool-suite tests: a daemon in this trio run with the suite registered,
real loopback mock upstreams, the SQLite conversation store and the file sandbox."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs

from exai.config import Settings
from exai.providers import ProviderRouter
from exai.storage.service import ConversationService
from exai.testing import MockUpstream
from exai.tools import ToolRegistry, ToolSpec, default_registry
from exai.tools.sandbox import FileSandbox
from tests.helpers import Rpc, make_settings, running_daemon, ws
from tests.providers.conftest import provider_settings

WORKFLOW_TOOLS = ("thinkdeep", "analyze", "codereview", "debug")


def suite_registry(*replace: ToolSpec) -> ToolRegistry:
    """``default_registry()`` (which includes the suite), with ``replace`` standing in for
    same-named tools (a consensus with a short deadline, say)."""
    swap = {s.name: s for s in replace}
    return ToolRegistry([swap.get(spec.name, spec) for spec in _specs(default_registry())])


def _specs(reg: ToolRegistry) -> list[ToolSpec]:
    return [spec for name in reg.names() if (spec := reg.get(name)) is not None]


def suite_settings(
    tmp_path: Path,
    mocks: dict[str, MockUpstream],
    *,
    fast: Iterable[str],
    quality: Iterable[str],
    **overrides: Any,
) -> Settings:
    """Daemon settings with each mock as provider ``name`` serving its models, a private state
    directory (the SQLite store) and ``tmp_path/root`` as the only file root."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "providers": tuple(
            provider_settings(name, m.base_url, None, m.models, breaker_minimum_calls=20)
            for name, m in mocks.items()
        ),
        "fast_models": tuple(fast),
        "quality_models": tuple(quality),
        "default_model": "auto",
        "file_roots": (str(root),),
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


@attrs.define
class Env:
    """A running daemon and a connected client."""

    settings: Settings
    services: dict[str, Any]
    rpc: Rpc
    root: Path

    async def call(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """``tools/call``; the raw JSON-RPC response."""
        return await self.rpc.call(tool, args)

    async def ok(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """``tools/call`` that must succeed; its ``structuredContent`` (plus ``_text``)."""
        res = await self.rpc.call(tool, args)
        assert "result" in res, f"{tool} failed: {json.dumps(res.get('error'))}"
        assert res["result"]["isError"] is False, res
        out = dict(res["result"].get("structuredContent") or {})
        out["_text"] = res["result"]["content"][0]["text"]
        return out


@asynccontextmanager
async def suite_env(
    tmp_path: Path,
    mocks: dict[str, MockUpstream],
    *,
    fast: Iterable[str],
    quality: Iterable[str],
    registry: ToolRegistry | None = None,
    conversations: bool = True,
    **overrides: Any,
) -> AsyncIterator[Env]:
    settings = suite_settings(tmp_path, mocks, fast=fast, quality=quality, **overrides)
    async with AsyncExitStack() as stack:
        services: dict[str, Any] = {
            "providers": await stack.enter_async_context(ProviderRouter(settings)),
            "files": FileSandbox(settings),
        }
        if conversations:
            services["conversations"] = await stack.enter_async_context(
                ConversationService.open(settings)
            )
        daemon = await stack.enter_async_context(
            running_daemon(settings, registry or suite_registry(), services)
        )
        conn = await stack.enter_async_context(ws(daemon))
        yield Env(settings, services, Rpc(conn), tmp_path / "root")


def prompts(mock: MockUpstream) -> list[str]:
    """Every chat request's messages, each request's contents joined, in order."""
    return [
        "\n".join(str(m.get("content") or "") for m in r.json["messages"])
        for r in mock.chat_requests
    ]


def error_of(res: dict[str, Any]) -> dict[str, Any]:
    assert "error" in res, f"expected an error, got {json.dumps(res)[:500]}"
    err: dict[str, Any] = res["error"]
    return err
