"""The ``chat`` and ``listmodels`` tools over the provider router (no daemon, no sockets)."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import attrs
import httpx
import pytest
import trio.testing

from exai.config import Secret
from exai.errors import ToolError
from exai.providers import ProviderRouter
from exai.storage.model import Turn
from exai.tools.base import ToolContext
from exai.tools.chat import CHAT
from exai.tools.listmodels import LISTMODELS
from exai.tools.progress import PROGRESS_INTERVAL_S

from .conftest import KEY_A, KEY_B, ScriptedUpstream, provider_settings, settings_with


@pytest.fixture
def anyio_backend() -> tuple[str, dict]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


SETTINGS = settings_with(
    provider_settings("a", "http://a.test/v1", KEY_A, ("mock-a",)),
    provider_settings("b", "http://b.test/v1", KEY_B, ("mock-b",)),
)


def _ctx(router: ProviderRouter, **services: Any) -> tuple[ToolContext, list[tuple]]:
    sent: list[tuple] = []

    async def progress(progress=None, total=None, message=None) -> None:
        sent.append((anyio.current_time(), progress, message))

    ctx = ToolContext(
        settings=SETTINGS,
        services={"providers": router, **services},
        progress=progress,
        request_id=7,
        session_id="s1",
    )
    return ctx, sent


def _router(a: ScriptedUpstream, b: ScriptedUpstream) -> ProviderRouter:
    return ProviderRouter(SETTINGS, transports={"a": a.transport, "b": b.transport})


@pytest.mark.anyio
async def test_chat_answers_and_says_which_model_and_provider_served_it(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        ctx, _ = _ctx(router)
        result = await CHAT.handler({"prompt": "hello", "temperature": 0.3}, ctx)
    assert result.structured is not None
    assert result.structured["content"] == "a:mock-a: hello"
    assert (result.structured["model"], result.structured["provider"]) == ("mock-a", "a")
    assert "model: mock-a (provider a)" in result.text
    assert ctx.annotations["provider"] == "a" and ctx.annotations["model"] == "mock-a"
    assert ctx.annotations["key_fingerprint"] == Secret(KEY_A).fingerprint()
    body = a.chats[0]
    assert body["temperature"] == 0.3 and body["stream"] is True
    assert body["messages"][0]["role"] == "system"


@pytest.mark.anyio
async def test_chat_streams_progress_at_a_bounded_rate(scripted):
    a, b = scripted

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(40):  # 40 chunks over 2 s
            await anyio.sleep(0.05)
            c = {"choices": [{"delta": {"content": f"w{i} "}}]}
            yield f"data: {json.dumps(c)}\n\n".encode()
        c = {"choices": [{"delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(c)}\n\ndata: [DONE]\n\n".encode()

    sse = {"content-type": "text/event-stream"}
    a.push(lambda r: httpx.Response(200, content=chunks(), headers=sse))
    async with _router(a, b) as router:
        ctx, sent = _ctx(router)
        result = await CHAT.handler({"prompt": "stream please"}, ctx)
    assert result.structured is not None and result.structured["content"].startswith("w0 w1")
    streamed = [s for s in sent if s[1]]
    assert 4 <= len(streamed) <= 2.0 / PROGRESS_INTERVAL_S + 1
    values = [s[1] for s in streamed]
    assert values == sorted(values) and len(set(values)) == len(values)
    gaps = [y[0] - x[0] for x, y in itertools.pairwise(streamed)]
    assert min(gaps) >= PROGRESS_INTERVAL_S


@pytest.mark.anyio
async def test_chat_reports_a_fallback_in_its_answer(scripted):
    a, b = scripted
    a.push(httpx.Response(503))
    async with _router(a, b) as router:
        ctx, _ = _ctx(router)
        result = await CHAT.handler({"prompt": "hi"}, ctx)
    assert result.structured is not None and result.structured["provider"] == "b"
    assert "fell back after: a/mock-a upstream_unavailable" in result.text


@pytest.mark.anyio
async def test_chat_accepts_files_and_says_they_are_not_read_yet(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        ctx, _ = _ctx(router)
        result = await CHAT.handler({"prompt": "hi", "files": ["/etc/hostname"]}, ctx)
    assert result.structured is not None
    assert "not read yet" in result.structured["note"]


@pytest.mark.anyio
async def test_chat_without_conversations_refuses_a_continuation(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        ctx, _ = _ctx(router)
        with pytest.raises(ToolError, match="continuation"):
            await CHAT.handler({"prompt": "hi", "continuation_id": "t1"}, ctx)


@attrs.define
class _FakeThread:
    id: str
    turns: tuple = ()


@attrs.define
class _FakeConversations:
    """The conversation service's API, as the chat tool uses it."""

    added: list = attrs.field(factory=list)
    thread: _FakeThread = attrs.field(
        factory=lambda: _FakeThread(
            "t1",
            turns=(Turn(role="user", content="earlier"), Turn(role="assistant", content="yes")),
        )
    )

    async def start_or_continue(
        self, continuation_id: str | None, tool: str, *, call_key: str = "", owner: str = ""
    ) -> _FakeThread:
        return self.thread

    def check_room(self, thread: _FakeThread, *, turns: int, sizes: dict) -> None:
        return None

    async def add_turns(
        self, thread: _FakeThread, turns: list, key: str, *, owner: str = ""
    ) -> _FakeThread:
        self.added.extend((thread.id, t, key) for t in turns)
        return _FakeThread(thread.id, turns=(*thread.turns, *turns))

    def turns_remaining(self, thread: _FakeThread) -> int:
        return 12 - len(thread.turns)


@pytest.mark.anyio
async def test_chat_continues_a_thread_and_stores_both_turns(scripted):
    a, b = scripted
    conv = _FakeConversations()
    async with _router(a, b) as router:
        ctx, _ = _ctx(router, conversations=conv)
        result = await CHAT.handler({"prompt": "and now?", "continuation_id": "t1"}, ctx)
    sent = a.chats[0]["messages"]
    assert [m["content"] for m in sent[1:]] == ["earlier", "yes", "and now?"]
    # both turns in one atomic write under the call's key
    assert [(t.role, key) for _, t, key in conv.added] == [
        ("user", "chat:s1:7"),
        ("assistant", "chat:s1:7"),
    ]
    assert conv.added[1][1].model == "mock-a"
    assert result.structured is not None
    assert result.structured["continuation_id"] == "t1"
    assert result.structured["remaining_turns"] == 8


@pytest.mark.anyio
async def test_listmodels_shows_models_breaker_states_limits_and_auto_chains(scripted):
    a, b = scripted
    async with _router(a, b) as router:
        router.providers["a"].breaker.open_until(30)
        ctx, _ = _ctx(router)
        result = await LISTMODELS.handler({}, ctx)
    data = result.structured
    assert data is not None
    assert data["providers"]["a"]["breaker"] == "open"
    assert data["providers"]["a"]["retry_after_s"] == pytest.approx(30)
    assert data["providers"]["b"]["breaker"] == "closed"
    assert data["providers"]["b"]["models"] == ["mock-b"]
    assert data["auto"]["fast (simple tools, early steps)"][0] == "a/mock-a"
    assert KEY_A not in result.text and KEY_B not in result.text
