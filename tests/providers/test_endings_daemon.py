"""How a provider ends an answer, as an MCP client sees it, and what the daemon stores.

The same rows as ``test_endings.py`` (issue 13), through a daemon (in this trio run) with the
SQLite conversation store: a ``chat`` call over WebSocket against two mock upstreams on
loopback. For each row: what the client gets (the answer, or ``error.data.reason``), how many
requests each upstream saw (retries and fallbacks), and the turns stored — an answer that is
not complete is never stored, and a fallback's stored answer holds none of the failed one's text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from exai.config import Settings
from exai.providers import ProviderRouter
from exai.resilience.retry import RetryBudget
from exai.storage.service import ConversationService
from exai.testing import MockUpstream
from exai.tools import default_registry
from exai.tools.sandbox import FileSandbox
from tests.helpers import Rpc, make_settings, running_daemon, ws
from tests.providers.conftest import provider_settings
from tests.providers.test_endings import CAP, OUTCOME_OF_A, QUOTA_HOLD_S, ROWS, Row

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def chat_daemon(
    tmp_path: Path,
) -> AsyncIterator[tuple[Rpc, MockUpstream, MockUpstream, Settings]]:
    async with (
        MockUpstream(models=("mock-a",)) as a,
        MockUpstream(models=("mock-b",)) as b,
    ):
        kw: dict[str, Any] = {"stall_timeout_s": 300.0, "quota_hold_s": QUOTA_HOLD_S}
        settings = make_settings(
            tmp_path,
            providers=(
                provider_settings("a", a.base_url, None, ("mock-a",), **kw),
                provider_settings("b", b.base_url, None, ("mock-b",), **kw),
            ),
            fast_models=("mock-a", "mock-b"),
            quality_models=("mock-b", "mock-a"),
            default_model="auto",
            max_answer_bytes=CAP,
        )
        async with AsyncExitStack() as stack:
            router = ProviderRouter(
                settings,
                attempts=3,
                initial_backoff_s=0.01,
                retry_budget=RetryBudget(ratio=1.0, min_retries_per_s=10),
            )
            services: dict[str, Any] = {
                "providers": await stack.enter_async_context(router),
                "files": FileSandbox(settings),
                "conversations": await stack.enter_async_context(
                    ConversationService.open(settings)
                ),
            }
            daemon = await stack.enter_async_context(
                running_daemon(settings, default_registry(), services)
            )
            conn = await stack.enter_async_context(ws(daemon))
            yield Rpc(conn), a, b, settings


def _stored_turns(settings: Settings) -> list[tuple[str, str]]:
    path = settings.effective_storage_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return [(str(r), str(c)) for r, c in db.execute("SELECT role, content FROM turns")]


async def stored_turns(settings: Settings) -> list[tuple[str, str]]:
    return await trio.to_thread.run_sync(_stored_turns, settings)


def _expect(row: Row, pinned: bool) -> tuple[str, int, int]:
    if pinned:
        return row.alone, row.a_alone, 0
    return row.with_fallback, row.a, row.b


@pytest.mark.parametrize("pinned", [False, True], ids=["with-fallback", "pinned-to-a"])
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
async def test_what_an_mcp_client_sees_and_what_is_stored(tmp_path, row, pinned):
    async with chat_daemon(tmp_path) as (rpc, a, b, settings):
        a.push(row.fault())
        model = "a/mock-a" if pinned else "mock-a"
        with trio.fail_after(60):  # only turns a hang into a failure
            res = await rpc.call("chat", {"prompt": "hello", "model": model})
        expected, n_a, n_b = _expect(row, pinned)
        assert (len(a.chat_requests), len(b.chat_requests)) == (n_a, n_b)
        turns = await stored_turns(settings)
    if expected in ("ok", "b"):
        assert "result" in res and res["result"]["isError"] is False, res
        answer = "mock:mock-a: hello" if expected == "ok" else "mock:mock-b: hello"
        structured = res["result"]["structuredContent"]
        assert structured["content"] == answer
        attempts = structured["attempts"]
        assert len(attempts) == n_a + n_b  # every try, the answer last
        if len(attempts) > 1:  # a failed first: the client is told how, in a's own words
            assert attempts[0]["outcome"] == OUTCOME_OF_A[row.name]
            assert row.says in attempts[0]["detail"]
        assert turns == [("user", "hello"), ("assistant", answer)]
    else:
        assert "error" in res, res
        data = res["error"]["data"]
        assert data["reason"] == expected, res
        assert row.says in res["error"]["message"]
        assert turns == []  # nothing partial, filtered or truncated is ever stored
