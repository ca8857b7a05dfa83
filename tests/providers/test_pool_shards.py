"""The provider's connection pool is split into small httpx shards, used evenly."""

from __future__ import annotations

import pytest
import trio

from exai.providers.client import SHARD_CONNECTIONS, OpenAIClient
from exai.testing import MockUpstream
from tests.providers.conftest import provider_settings

pytestmark = pytest.mark.anyio


async def test_requests_spread_over_shards_and_stay_within_pool_max():
    async with MockUpstream(models=("mock-a",), latency_s=0.3) as mock:
        settings = provider_settings("a", mock.base_url, None, ("mock-a",), pool_max=40)
        async with OpenAIClient(settings) as client, trio.open_nursery() as nursery:
            assert len(client._shards) == -(-40 // SHARD_CONNECTIONS) == 3
            answers = []

            async def one() -> None:
                body = {"model": "mock-a", "messages": [{"role": "user", "content": "x"}]}
                answers.append(await client.chat(body))

            for _ in range(30):
                nursery.start_soon(one)
            with trio.fail_after(5):
                while mock.active < 30:
                    await trio.sleep(0.01)
            assert sorted(client._inflight) == [10, 10, 10]
        assert len(answers) == 30
        assert client._shards == []  # closed on exit
