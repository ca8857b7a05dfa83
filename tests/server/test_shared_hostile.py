"""A stored shared answer that lies, or changes while it is read, is never taken for a result.

The pieces format (exai/server/shared_calls.py) carries a header of sizes and a skeleton of
placeholders: a value in Redis written by anything else (a hostile or broken writer, a bug) must
be refused in work bounded by its own size — a size that lies must not make the reader decode a
byte twice, and a placeholder repeated a million times must not turn one stored string into a
million in the answer. A large value is read in several GETRANGEs: one that expires and is
replaced by another daemon's result between two of them must not be read as a mix of both.
"""

from __future__ import annotations

import json
from typing import Any

import anyio.lowlevel
import pytest

from exai.server import shared_calls as sc_mod
from exai.server.shared_calls import Claim, decode_result, encode_result
from tests.server.test_shared_calls import _calls, _redis
from tests.storage.conftest import redis_prefix  # noqa: F401

pytestmark = pytest.mark.anyio

N = 70_000  # one long string's bytes (ASCII), over LONG_CHARS
#: what SharedCalls.claim takes for "unavailable" (the caller runs the call itself)
REFUSED = (ValueError, TypeError, KeyError, IndexError, RecursionError)
TOKEN = "\x00exai-piece:0123456789abcdef:"


def _value(sizes: list[Any], skeleton: Any, body: bytes, skel_size: Any = None) -> bytes:
    skel = json.dumps(skeleton).encode()
    size = len(skel) if skel_size is None else skel_size
    head = json.dumps({"token": TOKEN, "skeleton": size, "strings": sizes}).encode()
    return sc_mod.PIECES_MAGIC + head + b"\n" + skel + body


def _ref(i: int) -> str:
    return f"{TOKEN}{i}\x00"


HOSTILE = {
    # each odd size steps back over the string just read: the old reader decoded it again
    # for every pair (2,000 × 70 KB here; a 1 MB header could ask for gigabytes)
    "sizes-that-step-back": _value([N, -N] * 2000, {"a": _ref(0)}, b"x" * N),
    "size-past-the-end": _value([10 * N], {"a": _ref(0)}, b"x" * N),
    "sizes-not-ints": _value(["70000"], {"a": _ref(0)}, b"x" * N),
    "skeleton-size-negative": _value([N], {"a": _ref(0)}, b"x" * N, skel_size=-5),
    "many-empty-strings": _value([0] * 100_000, {"a": 1}, b""),
    "placeholder-of-no-string": _value([N], {"a": _ref(7)}, b"x" * N),
    "header-not-an-object": sc_mod.PIECES_MAGIC + b"[1, 2]\n{}",
    # one stored string placed 20,000 times: 1.4 GB once the answer is written out
    "one-string-placed-everywhere": _value([N], [_ref(0)] * 20_000, b"x" * N),
    "bad-utf-8": _value([N], {"a": _ref(0)}, b"\xff" * N),
}


@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_stored_value_is_refused_in_work_bounded_by_its_size(
    value: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = 0
    checkpoint = anyio.lowlevel.checkpoint

    async def counting() -> None:
        nonlocal steps
        steps += 1
        await checkpoint()

    monkeypatch.setattr(anyio.lowlevel, "checkpoint", counting)
    with pytest.raises(REFUSED):
        await decode_result(value)
    # one checkpoint per STEP_BYTES decoded: never more than the value's own bytes
    assert steps <= len(value) // sc_mod.STEP_BYTES + 3


async def test_a_string_carried_many_times_is_read_back_exactly() -> None:
    """The writer stores a string carried more than MAX_REFS times again, so the reader's
    bound refuses only values no writer makes."""
    text = "é" * N
    answer = {"result": {"content": [{"type": "text", "text": text}] * 25, "s": text}}
    value = await encode_result(answer)
    assert isinstance(value, list)
    assert await decode_result(b"".join(value)) == answer


async def test_a_large_result_replaced_between_two_reads_is_not_read_as_a_mix(
    redis_prefix: str,  # noqa: F811
) -> None:
    """The result expires after the claim's 'large' answer and another daemon stores its own
    (same size, another answer) before the second GETRANGE: the claim gets one result whole or
    "unavailable" (the caller runs the call), never the first's header with the second's text."""
    size = sc_mod.TRANSFER_BYTES + sc_mod.TRANSFER_BYTES // 2
    first = {"result": {"text": "a" * size}}
    second = {"result": {"text": "b" * size}}
    async with _redis() as redis, _calls(redis, redis_prefix, "daemon-a") as a:
        key = "alice:replaced"
        assert await a.claim(key, 30) == Claim("owner")
        await a.finish(key, first)
        replacement = b"".join(await encode_result(second))  # type: ignore[arg-type]
        stored = await redis.get(a.result_key(key))
        assert stored is not None and len(stored) == len(replacement)

        class Replacing:
            """The real Redis; after the first piece is read, the result is another's."""

            reads = 0

            async def run_script(self, script: str, keys: Any, args: Any) -> Any:
                reply = await redis.run_script(script, keys, args)
                if script == sc_mod.READ_SCRIPT:
                    Replacing.reads += 1
                    if Replacing.reads == 1:
                        await redis.set(a.result_key(key), replacement, ex_s=60)
                return reply

            async def get(self, k: str) -> bytes | None:
                return await redis.get(k)

            async def set(self, k: str, v: bytes | str, **kw: Any) -> bool:
                return await redis.set(k, v, **kw)

        async with _calls(Replacing(), redis_prefix, "daemon-b") as b:  # type: ignore[arg-type]
            got = await b.claim(key, 30)
        assert Replacing.reads >= 1
        assert got.kind == "unavailable" or got.result in (first, second)


class _Away:
    """Redis away: every round trip fails."""

    async def run_script(self, script: str, keys: Any, args: Any) -> Any:
        raise ConnectionError("redis is away")

    async def get(self, key: str) -> bytes | None:
        raise ConnectionError("redis is away")

    async def set(self, key: str, value: bytes | str, **kw: Any) -> bool:
        raise ConnectionError("redis is away")


async def test_finishes_kept_while_redis_is_away_are_bounded_in_bytes() -> None:
    """A finish Redis did not take is kept to send again; 1,024 of them were kept whatever
    their size (80 answers of 1 MiB: 80 MiB here, gigabytes for a daemon of large answers
    through an outage). The bytes are bounded too, oldest out, the newest kept."""
    big = "x" * (1024 * 1024)
    async with sc_mod.SharedCalls(
        _Away(),  # type: ignore[arg-type]
        key_prefix="t:",
        instance_id="daemon-a",
        result_ttl_s=60,
    ) as a:
        for i in range(80):
            await a.finish(f"alice:{i}", {"result": {"text": big, "i": i}})
        kept = a._unfinished
        held = sum(len(v) if isinstance(v, str) else sum(map(len, v)) for v in kept.values())
        assert held <= 64 * 1024 * 1024 + 2 * len(big)
        assert "alice:79" in kept  # the newest is kept


async def test_a_result_over_the_largest_shared_size_is_neither_stored_nor_read(
    redis_prefix: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A claim allocated a buffer of whatever size the stored value had (Redis holds up to
    512 MB): over MAX_RESULT_BYTES (2 MiB here) the claim says "unavailable" without reading
    it, and a finish that large stores nothing (the run key dropped: a joiner runs the call)."""
    monkeypatch.setattr(sc_mod, "MAX_RESULT_BYTES", 2 * 1024 * 1024, raising=False)
    answer = {"result": {"text": "x" * (3 * 1024 * 1024)}}
    async with _redis() as redis, _calls(redis, redis_prefix, "daemon-a") as a:
        value = b"".join(await encode_result(answer))  # type: ignore[arg-type]
        await redis.set(a.result_key("alice:huge"), value, ex_s=60)  # (another's, or hostile)
        assert await a.claim("alice:huge", 30) == Claim("unavailable")
        assert await a.claim("alice:mine", 30) == Claim("owner")
        await a.finish("alice:mine", answer)
        assert await redis.get(a.result_key("alice:mine")) is None
        assert await redis.get(a.run_key("alice:mine")) is None
