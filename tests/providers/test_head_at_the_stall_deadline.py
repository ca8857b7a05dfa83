"""An upstream head that arrives in the very step its stall deadline passes is a head, not a
stall (54672dc bounded the wait for the head and the reads of the stream with one cancel scope:
when the head came as its deadline passed, the scope was already cancelled, so the first read of
the body raised inside it and the call was reported "stream stalled … (after 0 chunks)" — a
retryable failure counted against the provider's breaker — though the head had come in time and
the body was there).

The clock moves only when the test jumps it, in the same step in which the head is handed over:
trio then finds the deadline passed with the request's task already woken by its head.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from exai.providers.client import OpenAIClient

from .conftest import provider_settings

STALL_S = 5.0


def _sse() -> list[bytes]:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "mock-a",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}],
    }
    end = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "mock-a",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    return [f"data: {json.dumps(c)}\n\n".encode() for c in (chunk, end)] + [b"data: [DONE]\n\n"]


class _SocketLikeBody(httpx.AsyncByteStream):
    """A body whose every read is a checkpoint, as a socket's is."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in _sse():
            await trio.lowlevel.checkpoint()
            yield piece


@pytest.mark.parametrize("anyio_backend", [("trio", {"clock": trio.testing.MockClock()})])
@pytest.mark.anyio
async def test_a_head_that_arrives_as_its_deadline_passes_is_read_not_reported_a_stall() -> None:
    asked = trio.Event()
    head_ready = trio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.set()
        await head_ready.wait()
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_SocketLikeBody()
        )

    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)

    async def head_at_the_deadline() -> None:
        await asked.wait()
        await trio.testing.wait_all_tasks_blocked()
        # (one step: the clock reaches the deadline and the head is handed over)
        clock.jump(STALL_S)
        head_ready.set()

    settings = provider_settings(
        "a", "http://upstream.invalid/v1", "k", ("mock-a",), stall_timeout_s=STALL_S
    )
    body = {"model": "mock-a", "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with (
        OpenAIClient(settings, transport=httpx.MockTransport(handler)) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(head_at_the_deadline)
        completion = await client.chat(body)
    assert completion["choices"][0]["message"]["content"] == "hi"
    assert completion["choices"][0]["finish_reason"] == "stop"
