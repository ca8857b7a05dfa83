"""A large answer leaves the loop free on every door (issue 18: no loop stall over 50 ms).

A 16 MiB answer (its JSON ≈ 32 MiB: the text is carried twice) was one task step of
0.1-0.4 s on every door: encoded in one msgspec call, decoded to ``str``, then copied whole
several times to make one WebSocket frame or HTTP body; and, for an answer kept for a re-send,
compared (``str.find``) and pickled whole. Each test here reads one through a door with the
stall detector at its default 0.1 s (tests/stall_plugin.py); the client reads 64 KiB at a
time in the same trio run (benchmarks/load/large_answers.py). A moderate answer (several
pieces, awkward characters) is also read whole and checked to be the bytes the one-call
encoder writes for it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.load import large_answers as la
from exai.server import protocol as p
from exai.server.core import LARGE_ANSWER_BYTES
from tests.helpers import make_settings, registry_with, running_daemon

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
#: the answer of the stall tests (a quarter of a second of one step and more before)
LARGE = 16 * MiB
#: awkward characters for the moderate answer: JSON escapes, control characters, 2-, 3- and
#: 4-byte UTF-8, a JavaScript line separator
AWKWARD_UNIT = 'a"\\\x00\x1f\x7fé€\u2028\U0001f600\n'


def _settings(tmp_path: Any) -> Any:
    return make_settings(
        tmp_path,
        max_answer_bytes=64 * MiB,
        session_max_pending_bytes=256 * MiB,
        heartbeat_interval_s=0.05,  # (an SSE stream is begun by a keep-alive)
    )


@pytest.fixture(scope="module")
def big_answer() -> None:
    la.prepare(LARGE)  # made once, outside the daemon's steps (the tool is not the subject)


async def test_a_16_mib_answer_on_the_websocket_door_is_written_in_short_steps(
    tmp_path, big_answer
):
    async with running_daemon(_settings(tmp_path), registry_with(la.BIG)) as d:
        got = await la.ws_answer(d.url, {"bytes": LARGE})
    assert got.nbytes > 2 * LARGE and got.head.startswith(b'{"jsonrpc":"2.0","id":1,"result"')


async def test_a_16_mib_answer_kept_for_a_resend_is_stored_and_resent_in_short_steps(
    tmp_path, big_answer
):
    key = {"exai/idempotencyKey": "large-1"}
    async with running_daemon(_settings(tmp_path), registry_with(la.BIG)) as d:
        first = await la.ws_answer(d.url, {"bytes": LARGE}, meta=key)
        again = await la.ws_answer(d.url, {"bytes": LARGE}, meta=key)  # (the stored answer)
        assert len(d.calls) == 1  # (the answer was kept, and re-sent from the store)
    assert first.nbytes == again.nbytes > 2 * LARGE
    assert first.tail == again.tail


async def test_a_16_mib_answer_on_the_http_door_is_written_in_short_steps(tmp_path, big_answer):
    async with running_daemon(_settings(tmp_path), registry_with(la.BIG)) as d:
        got = await la.http_answer(d.url, {"bytes": LARGE}, accept="application/json")
    assert got.status == 200 and got.content_type == "application/json"
    assert got.nbytes > 2 * LARGE and got.tail.endswith(b"}")


async def test_a_16_mib_answer_in_an_sse_stream_is_written_in_short_steps(tmp_path, big_answer):
    accept = "application/json, text/event-stream"
    async with running_daemon(_settings(tmp_path), registry_with(la.BIG)) as d:
        got = await la.http_answer(d.url, {"bytes": LARGE, "seconds": 0.2}, accept=accept)
    assert got.status == 200 and got.content_type.startswith("text/event-stream")
    assert got.nbytes > 2 * LARGE and got.tail.endswith(b"}\n\n")


async def test_a_16_mib_answer_on_the_legacy_door_is_written_in_short_steps(
    tmp_path, big_answer
):
    async with running_daemon(_settings(tmp_path), registry_with(la.BIG)) as d:
        got = await la.legacy_answer(d.url, {"bytes": LARGE})
    assert got.nbytes > 2 * LARGE and b'"op":"call_tool_res"' in got.head


def _is_one_call_encoding(data: bytes) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(data)
    assert data == p.encode(msg).encode("utf-8")
    return msg


@pytest.mark.parametrize("surrogate", [False, True])
async def test_a_moderate_answer_is_the_bytes_the_one_call_encoder_writes(tmp_path, surrogate):
    # several pieces (a long string over LONG_CHARS, the answer over LARGE_ANSWER_BYTES),
    # through every door; a lone surrogate makes the whole text ASCII escapes, as before
    size = 3 * LARGE_ANSWER_BYTES  # (a string over 16 Ki characters is encoded in pieces)
    text, body = la.prepare(size, AWKWARD_UNIT + ("\ud800" if surrogate else ""))
    args = {"bytes": size, "unit": AWKWARD_UNIT, "surrogate": surrogate}
    async with running_daemon(_settings(tmp_path), registry_with(la.BIG)) as d:
        got = await la.ws_answer(d.url, args, keep=True)
        msg = _is_one_call_encoding(bytes(got.body or b""))
        assert msg["result"]["content"][0]["text"] == text
        assert msg["result"]["structuredContent"] == {"content": body}

        got = await la.http_answer(d.url, args, accept="application/json", keep=True)
        msg = _is_one_call_encoding(bytes(got.body or b""))
        assert msg["result"]["content"][0]["text"] == text

        sse = await la.http_answer(
            d.url, {**args, "seconds": 0.2}, accept="application/json, text/event-stream", keep=True
        )
        assert sse.content_type.startswith("text/event-stream")
        event = bytes(sse.body or b"").rsplit(b"event: message\ndata: ", 1)[1]
        assert event.endswith(b"\n\n")
        msg = _is_one_call_encoding(event[:-2])
        assert msg["result"]["content"][0]["text"] == text

        got = await la.legacy_answer(d.url, args, keep=True)
        msg = _is_one_call_encoding(bytes(got.body or b""))
        assert msg["op"] == "call_tool_res" and msg["text"] == text
