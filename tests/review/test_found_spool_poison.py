"""Review finding: one spooled write the store can never accept blocks the whole spool."""

from __future__ import annotations

import anyio
import attrs
import pytest

from exai.config import Secret
from exai.errors import ExaiError
from exai.resilience import CircuitBreaker
from exai.storage.aio_bridge import open_asyncio_bridge
from exai.storage.model import Turn
from exai.storage.service import ConversationService
from exai.testing.faultproxy import FaultProxy
from tests.storage.conftest import PG_HOST, PG_PORT, make_settings, pg_url

pytestmark = pytest.mark.anyio


def quick_breaker(name: str) -> CircuitBreaker:
    return CircuitBreaker(
        name, minimum_calls=2, window_size=4, open_duration_s=0.1, max_open_duration_s=0.4
    )


async def test_a_spooled_turn_postgres_refuses_does_not_block_the_other_threads(
    tmp_path,
    pg_database,
    pg_schema,
):
    """While Postgres is cut, two calls succeed by spooling: one whose prompt holds a NUL
    character (valid JSON, refused by Postgres text columns), then one on another thread.
    Once Postgres is back the second thread's turns must reach it. Today replay stops at the
    first record on every attempt (a StoreError that is not "unavailable" is retried forever,
    in order), so every later spooled write, of every thread, stays in the spool for good."""
    async with FaultProxy(PG_HOST, PG_PORT) as proxy, open_asyncio_bridge() as bridge:
        settings = attrs.evolve(
            make_settings(tmp_path),
            storage_url=Secret(pg_url(pg_database, schema=pg_schema, port=proxy.port)),
            store_timeout_s=0.5,
        )
        async with ConversationService.open(
            settings,
            bridge=bridge,
            breaker=quick_breaker("store:postgres"),
            replay_min_delay_s=0.02,
            replay_max_delay_s=0.2,
        ) as svc:
            proxy.cut()
            poison = await svc.start_or_continue(None, "chat")
            await svc.add_turns(poison, [Turn(role="user", content="a\x00b")], "call-poison")
            other = await svc.start_or_continue(None, "chat")
            await svc.add_turns(other, [Turn(role="user", content="hello")], "call-other")
            assert svc.spool.depth == 2  # both calls were told their turns are durable
            proxy.restore()
            with anyio.move_on_after(5):
                while svc.spool.pending(other.id):
                    await anyio.sleep(0.05)
            stuck = svc.spool.pending(other.id)
            errors = svc.replay_errors
            try:
                # straight from the store, not merged with the spool
                stored = await svc._primary(svc.store.get_thread, other.id)
            except ExaiError:
                stored = None
    assert not stuck, f"thread {other.id} is still in the spool after 5 s ({errors} replay errors)"
    assert stored is not None and [t.content for t in stored.turns] == ["hello"]
