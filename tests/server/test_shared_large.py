"""A large keyed answer shared across daemons leaves both loops free (issue 18: no loop stall
over 50 ms).

The owner's :meth:`SharedCalls.finish` encoded the whole answer (``json.dumps``) in one step and
the claim on another daemon decoded it (bytes → ``str`` → ``json.loads``) in another: ≈ 0.1 s
each for a 4 MiB non-ASCII answer, growing with it. Here a pair of daemons' SharedCalls (one
trio run, the real Redis, a prefix of this test's own) share a 16 MiB answer under the stall
detector at its default 0.1 s (tests/stall_plugin.py): the owner finishes, the other claims.
The owner's SET and the claim's GET
were also one step each in asyncio (writelines joins the command, the transport buffers it;
redis-py's reader copies the reply whole): a large value now goes in round trips of at most
``TRANSFER_BYTES``. The stored format of a large answer is also read back exactly (awkward
characters, a lone surrogate), an old value (plain JSON) is still read, and a reader of the
old format takes the new one for "unavailable", never for something else.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from exai.server import shared_calls as sc_mod
from exai.server.shared_calls import Claim
from tests.server.test_shared_calls import _calls, _redis
from tests.storage.conftest import redis_prefix  # noqa: F401

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
#: 2-, 3- and 4-byte UTF-8, JSON escapes and control characters
AWKWARD_UNIT = 'a"\\\x00\x1f\x7fé€\u2028\U0001f600\n'


def _answer(text: str) -> dict[str, Any]:
    # the text carried twice, as a tool's answer is (content and structuredContent)
    return {
        "result": {
            "content": [{"type": "text", "text": text}],
            "structuredContent": {"answer": text, "n": 1, "ok": True, "none": None},
            "isError": False,
        }
    }


@pytest.fixture(scope="module")
def big_answer() -> dict[str, Any]:
    # 16 MiB of UTF-8 (2-byte characters), made outside the loop's steps
    return _answer("é" * (8 * MiB))


async def test_a_16_mib_shared_answer_is_finished_and_claimed_in_short_steps(
    redis_prefix: str,  # noqa: F811
    big_answer: dict[str, Any],
) -> None:
    async with (
        _redis() as redis,
        _calls(redis, redis_prefix, "daemon-a") as a,
        _calls(redis, redis_prefix, "daemon-b") as b,
    ):
        assert await a.claim("alice:big", 30) == Claim("owner")
        await a.finish("alice:big", big_answer)
        # taken (in round trips of at most TRANSFER_BYTES each: the old code's one SET of
        # ≈ 96 MiB of escaped JSON did not fit the 0.5 s bound of a round trip here)
        assert a.errors == 0 and a.status()["unfinished"] == 0
        # (the upload was renamed to the result: nothing is left beside it)
        assert await redis.scan_delete(a.result_key("alice:big") + ":up:*") == 0
        assert await redis.get(a.run_key("alice:big")) is None
        got = await b.claim("alice:big", 30)  # (a joiner's poll, or a re-send, on daemon-b)
        assert got.kind == "result"
        assert got == Claim("result", big_answer)
        # first one wins: a second finish (a takeover's) leaves the stored result as it is
        await b.finish("alice:big", _answer("x" * (2 * MiB)))
        assert await a.claim("alice:big", 30) == Claim("result", big_answer)


@pytest.mark.parametrize(
    "text",
    [
        AWKWARD_UNIT * 20_000,  # several pieces, every width of UTF-8
        AWKWARD_UNIT * 9_000 + "\ud800" + "x" * 70_000,  # a lone surrogate
        "x" * 300_000,  # ASCII
    ],
    ids=["awkward", "lone-surrogate", "ascii"],
)
async def test_a_large_shared_answer_is_read_back_exactly(
    redis_prefix: str,  # noqa: F811
    text: str,
) -> None:
    answer = _answer(text)
    answer["result"]["other"] = [text[:1000], text[5:], {"k": text[::-1]}]
    async with (
        _redis() as redis,
        _calls(redis, redis_prefix, "daemon-a") as a,
        _calls(redis, redis_prefix, "daemon-b") as b,
    ):
        assert await a.claim("alice:exact", 30) == Claim("owner")
        await a.finish("alice:exact", answer)
        assert await b.claim("alice:exact", 30) == Claim("result", answer)


async def test_a_small_answer_is_stored_as_plain_json_as_before(
    redis_prefix: str,  # noqa: F811
) -> None:
    answer = _answer("é" * 1000)
    async with _redis() as redis, _calls(redis, redis_prefix, "daemon-a") as a:
        assert await a.claim("alice:small", 30) == Claim("owner")
        await a.finish("alice:small", answer)
        stored = await redis.get(a.result_key("alice:small"))
    assert stored == json.dumps(answer, separators=(",", ":"), default=str).encode()


async def test_an_old_daemons_large_value_is_still_read(
    redis_prefix: str,  # noqa: F811
) -> None:
    """Rolling restart: a value an old daemon wrote (plain JSON, however large) is read."""
    answer = _answer("é" * 200_000)
    old = json.dumps(answer, separators=(",", ":"), default=str)
    async with _redis() as redis, _calls(redis, redis_prefix, "daemon-b") as b:
        await redis.set(b.result_key("alice:old"), old, ex_s=60)
        assert await b.claim("alice:old", 30) == Claim("result", answer)


async def test_an_old_daemon_takes_a_new_large_value_for_unavailable(
    redis_prefix: str,  # noqa: F811
) -> None:
    """Rolling restart: an old daemon's claim (``json.loads`` of the value decoded as UTF-8)
    fails on the new format — its claim says "unavailable", never a wrong result."""
    answer = _answer("é" * 200_000)
    async with _redis() as redis, _calls(redis, redis_prefix, "daemon-a") as a:
        assert await a.claim("alice:new", 30) == Claim("owner")
        await a.finish("alice:new", answer)
        stored = await redis.get(a.result_key("alice:new"))
    assert stored is not None
    text = stored.decode()  # (the old claim's _text: valid UTF-8, no error before the parse)
    with pytest.raises(ValueError):
        json.loads(text)
    assert stored.startswith(sc_mod.PIECES_MAGIC)
