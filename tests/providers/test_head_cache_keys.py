"""The provider pool's cache of request heads holds no rotated key (54672dc cached each distinct
head, the ``Authorization`` line included, and dropped them only once 64 had accumulated: a key
rotated away stayed in memory, in every head sent with it, until then)."""

from __future__ import annotations

import attrs
import pytest

from exai.config import Secret
from exai.providers import ChatRequest, ProviderRouter

from .conftest import provider_settings, settings_with

pytestmark = pytest.mark.anyio

OLD = "key-before-rotation-000000"
NEW = "key-after-rotation-1111111"


def _ask() -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "hello"}], model="mock-a")


async def test_a_rotated_key_leaves_no_cached_request_head_that_holds_it() -> None:
    from exai.testing import MockUpstream

    async with MockUpstream(models=("mock-a",)) as upstream:
        before = settings_with(provider_settings("a", upstream.base_url, OLD, ("mock-a",)))
        async with ProviderRouter(before) as router:
            await router.complete(_ask())
            pool = router.providers["a"].client._pool
            assert pool is not None
            heads = pool._heads  # (the cache: H11Pool._head)
            assert any(OLD.encode() in head for head in heads.values())
            # the reload's path for a rotated key (exai.server.reload -> update_settings)
            rotated = attrs.evolve(before.providers[0], api_key=Secret(NEW))
            router.update_settings(attrs.evolve(before, providers=(rotated,)))
            assert not any(OLD.encode() in head for head in heads.values())
            assert not any(OLD.encode() in repr(key).encode() for key in heads)
            await router.complete(_ask())
            assert any(NEW.encode() in head for head in heads.values())
            assert not any(OLD.encode() in head for head in heads.values())
    sent = [r.headers["authorization"] for r in upstream.chat_requests]
    assert sent == [f"Bearer {OLD}", f"Bearer {NEW}"]


async def test_a_request_waiting_for_a_connection_across_a_rotation_caches_no_old_head() -> None:
    # its head is made (and cached) as its headers are built, before it waits for a connection:
    # made once it had one, after the rotation cleared the cache, it put the old key back
    import trio
    import trio.testing

    from exai.providers.client import OpenAIClient
    from exai.testing import Fault, MockUpstream

    async with MockUpstream(models=("mock-a",)) as upstream:
        settings = provider_settings("a", upstream.base_url, OLD, ("mock-a",), pool_max=1)
        body = {"model": "mock-a", "messages": [{"role": "user", "content": "x"}]}
        upstream.push(Fault.hang())
        async with OpenAIClient(settings) as client, trio.open_nursery() as nursery:
            pool = client._pool
            assert pool is not None
            holder = trio.CancelScope()

            async def hold_the_connection() -> None:
                with holder:
                    await client.chat(body)

            nursery.start_soon(hold_the_connection)
            with trio.fail_after(10):
                while not upstream.chat_requests:
                    await trio.sleep(0.01)
            answers = []

            async def wait_for_the_connection() -> None:
                answers.append(await client.chat(body))

            nursery.start_soon(wait_for_the_connection)
            await trio.testing.wait_all_tasks_blocked()
            client.settings = attrs.evolve(settings, api_key=Secret(NEW))
            holder.cancel()  # (its connection is closed: the waiting request gets one)
        assert len(answers) == 1
        assert not any(OLD.encode() in head for head in pool._heads.values())
