"""A child process for the kill -9 test of group commit: many concurrent calls write turns
through the default SQLite store (so their writes share transactions), and each call's key is
printed once ``add_turns`` has returned (durable).

    python -m tests.storage.group_commit_child STATE_DIR

It never exits on its own; the test kills it with SIGKILL.
"""

from __future__ import annotations

import sys

import anyio
import attrs
import trio

from exai.config import Settings
from exai.storage.model import Turn
from exai.storage.service import ConversationService

WRITERS = 32
#: calls per writer and thread: two writers share each thread, 2 × 10 calls × 2 turns = 40 turns
CALLS_PER_THREAD = 10


async def main(state_dir: str) -> None:
    settings = attrs.evolve(Settings.from_env({}, env_file="", config_file=""), state_dir=state_dir)
    out = anyio.wrap_file(sys.stdout)
    async with ConversationService.open(settings) as svc:

        async def writer(w: int) -> None:
            i = 0
            while True:
                key = f"w{w:02d}-{i:05d}"
                thread_id = f"thread-{w // 2:02d}-{i // CALLS_PER_THREAD:05d}"
                await svc.add_turns(
                    thread_id,
                    [
                        Turn(role="user", content=f"{key}:q"),
                        Turn(role="assistant", content=f"{key}:a"),
                    ],
                    key,
                )
                await out.write(f"{thread_id} {key}\n")
                await out.flush()
                i += 1

        async with trio.open_nursery() as nursery:
            for w in range(WRITERS):
                nursery.start_soon(writer, w)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
