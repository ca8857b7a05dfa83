"""Must-show 2: two daemons' services sharing one PostgreSQL database and one Redis."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from exai.storage.aio_bridge import open_asyncio_bridge
from exai.storage.model import Turn
from exai.storage.service import ConversationService
from tests.storage.conftest import pg_settings, redis_url

pytestmark = pytest.mark.anyio


async def test_a_thread_started_on_one_daemon_is_continued_on_the_other_with_a_correct_cache(
    tmp_path: Path, pg_database: str, pg_schema: str, redis_prefix: str, stall_detector: object
) -> None:
    base = pg_settings(
        tmp_path, pg_database, pg_schema, redis_url=redis_url(), redis_key_prefix=redis_prefix
    )
    settings_a = attrs.evolve(base, state_dir=str(tmp_path / "a"))
    settings_b = attrs.evolve(base, state_dir=str(tmp_path / "b"))
    async with (
        open_asyncio_bridge() as bridge,
        ConversationService.open(settings_a, bridge=bridge) as a,
        ConversationService.open(settings_b, bridge=bridge) as b,
    ):
        assert a.cache is not None and b.cache is not None

        thread = await a.start_or_continue(None, "chat")
        await a.add_turns(
            thread,
            [Turn(role="user", content="q1"), Turn(role="assistant", content="a1")],
            "a-call-1",
        )

        # B has never seen it: a cache miss that fills the cache from Postgres
        on_b = await b.start_or_continue(thread.id, "codereview")
        assert [t.content for t in on_b.turns] == ["q1", "a1"]
        assert (b.cache.misses, b.cache.fills) == (1, 1)

        # A reads it now from the cache B filled
        hits = a.cache.hits
        again = await a.start_or_continue(thread.id, "chat")
        assert a.cache.hits == hits + 1
        assert again == on_b

        # B continues; its write invalidates the cached copy for both daemons
        await b.add_turns(
            on_b,
            [
                Turn(role="user", content="q2", tool="codereview"),
                Turn(role="assistant", content="a2", tool="codereview"),
            ],
            "b-call-1",
        )
        after = await a.start_or_continue(thread.id, "thinkdeep")
        assert [(t.seq, t.content) for t in after.turns] == [
            (1, "q1"),
            (2, "a1"),
            (3, "q2"),
            (4, "a2"),
        ]
        # ... and the refreshed copy is cached again
        hits = b.cache.hits
        from_cache = await b.start_or_continue(thread.id, "chat")
        assert b.cache.hits == hits + 1
        assert from_cache == after

        status = a.status()
    assert status["primary"]["kind"] == "postgres"
    assert status["redis"]["breaker"]["state"] == "closed"
    assert status["redis"]["cache"]["hits"] >= 1
