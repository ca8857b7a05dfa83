"""Child process for the two-process RedisTokenBucket test (not a test module).

Usage: python redis_hammer.py KEY_PREFIX KEY RATE CAPACITY DURATION_S START_AT_US

Waits until Redis's clock reaches START_AT_US (so that every child starts together), then
until Redis's clock reaches START_AT_US + DURATION_S (so that every child stops together, even
one that started late on a busy machine) hammers the shared bucket from four tasks (two waiting
in ``acquire``, two polling ``try_acquire``) and prints ``{"admitted": N, "end_us": T}`` as JSON
on stdout, ``T`` being Redis's clock after its last admission.
"""

from __future__ import annotations

import json
import sys

import anyio
import redis.asyncio as aredis

from exai.resilience import RedisTokenBucket


async def main(
    prefix: str, key: str, rate: float, capacity: float, duration_s: float, start_us: int
) -> None:
    client = aredis.Redis(host="127.0.0.1", port=6379)
    try:
        bucket = RedisTokenBucket(client, key, rate, capacity, key_prefix=prefix)
        while True:
            sec, usec = await client.time()
            now_us = sec * 1_000_000 + usec
            if now_us >= start_us:
                break
            await anyio.sleep(min(0.005, (start_us - now_us) / 1e6))
        # the end on Redis's clock, as a deadline on ours (a child that started late stops
        # with the others, rather than a duration after its own start)
        left_s = duration_s - (now_us - start_us) / 1e6
        admitted = 0

        async def waiting() -> None:
            nonlocal admitted
            while True:
                await bucket.acquire()
                admitted += 1

        async def polling() -> None:
            nonlocal admitted
            while True:
                wait = await bucket.try_acquire()
                if wait == 0.0:
                    admitted += 1
                else:
                    await anyio.sleep(wait)

        with anyio.move_on_after(max(0.0, left_s)):
            async with anyio.create_task_group() as tg:
                for task in (waiting, waiting, polling, polling):
                    tg.start_soon(task)
        # Redis's clock once nothing more can be admitted: the limiter's promise is a rate per
        # second of *that* clock (its script reads TIME), whatever this process's clock did
        sec, usec = await client.time()
        print(json.dumps({"admitted": admitted, "end_us": sec * 1_000_000 + usec}), flush=True)
    finally:
        await client.aclose()


if __name__ == "__main__":
    prefix, key, rate, capacity, duration, start = sys.argv[1:7]
    anyio.run(
        main,
        prefix,
        key,
        float(rate),
        float(capacity),
        float(duration),
        int(start),
        backend="asyncio",
    )
