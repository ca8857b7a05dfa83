"""Fixtures of the provider tests.

Two kinds of upstream:

* :class:`ScriptedUpstream` — an ``httpx.MockTransport`` handler (no sockets), so router logic
  can be tested under ``MockClock``;
* ``two_mocks`` — two real :class:`exai.testing.MockUpstream` servers on loopback, provider
  ``a`` (model ``mock-a``) and provider ``b`` (model ``mock-b``), for the behaviour that is about
  HTTP (streams, stalls, disconnects, headers). ``mock_settings`` builds the settings for them;
  the daemon-level tests reuse both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import httpx
import pytest

from exai.config import ProviderSettings, Secret, Settings

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-fedcba9876543210"


def provider_settings(
    name: str, base_url: str, key: str | None, models: tuple[str, ...], **kw: Any
) -> ProviderSettings:
    values: dict[str, Any] = {
        "name": name,
        "kind": "openai",
        "base_url": base_url,
        "api_key": Secret(key) if key else None,
        "models": models,
        "breaker_minimum_calls": 3,
        "breaker_window": 10,
        "breaker_open_s": 1.0,
        "breaker_max_open_s": 4.0,
        "stall_timeout_s": 5.0,
    }
    values.update(kw)
    return ProviderSettings(**values)


def settings_with(
    *providers: ProviderSettings,
    fast: tuple[str, ...] = ("mock-a", "mock-b"),
    quality: tuple[str, ...] = ("mock-b", "mock-a"),
) -> Settings:
    """Test settings: only the given providers (no Kimi/GLM), with the given model classes."""
    base = Settings.from_env({}, env_file="", config_file="")
    return attrs.evolve(
        base,
        providers=tuple(providers),
        fast_models=fast,
        quality_models=quality,
        default_model="auto",
    )


def completion(
    content: str,
    *,
    model: str = "m",
    usage: tuple[int, int] = (10, 5),
    finish: str = "stop",
    **message: Any,
) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
    }


@attrs.define
class ScriptedUpstream:
    """An OpenAI-compatible upstream for ``httpx.MockTransport``.

    ``script`` holds responses served in order (a callable gets the request); when empty, a
    normal answer ``"<name>:<model>: <last user message>"`` is served.
    """

    name: str
    script: list[httpx.Response | Callable[[httpx.Request], httpx.Response]] = attrs.field(
        factory=list
    )
    requests: list[httpx.Request] = attrs.field(factory=list)
    usage: tuple[int, int] = (10, 5)

    def push(self, *responses: httpx.Response | Callable[[httpx.Request], httpx.Response]) -> None:
        self.script.extend(responses)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            r = self.script.pop(0)
            return r(request) if callable(r) else r
        body = json.loads(request.content)
        last = body["messages"][-1]["content"]
        return httpx.Response(
            200, json=completion(f"{self.name}:{body['model']}: {last}", usage=self.usage)
        )

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    @property
    def chats(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path.endswith("/completions")]


@pytest.fixture
def scripted() -> tuple[ScriptedUpstream, ScriptedUpstream]:
    return ScriptedUpstream("a"), ScriptedUpstream("b")


@pytest.fixture
async def two_mocks() -> AsyncIterator[tuple[Any, Any]]:
    """Two real mock upstreams on loopback: provider ``a`` and provider ``b``."""
    from exai.testing import MockUpstream

    async with (
        MockUpstream(models=("mock-a",), api_key=KEY_A) as a,
        MockUpstream(models=("mock-b",), api_key=KEY_B) as b,
    ):
        yield a, b


def mock_settings(a: Any, b: Any, **kw: Any) -> Settings:
    """Settings for ``two_mocks``: providers ``a`` and ``b`` as extra OpenAI endpoints."""
    return settings_with(
        provider_settings("a", a.base_url, KEY_A, ("mock-a",), **kw),
        provider_settings("b", b.base_url, KEY_B, ("mock-b",), **kw),
    )
