"""A child process for the kill -9 test: writes turns while the store is down, so every one
goes to the spool, and prints each call key once ``add_turns`` has returned (durable).

    python -m tests.storage.spool_child STATE_DIR

It never exits on its own; the test kills it with SIGKILL.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import anyio
import attrs
import trio

from exai.config import Settings
from exai.errors import StoreUnavailableError
from exai.storage.base import AppendResult
from exai.storage.model import Thread, Turn
from exai.storage.service import ConversationService


class DownStore:
    """A primary store that cannot be reached."""

    kind = "sqlite"

    async def __aenter__(self) -> DownStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def create_thread(self, thread_id: str, *, created_at: float) -> None:
        raise StoreUnavailableError("down")

    async def append_turns(self, thread_id: str, turns: Sequence[Turn], **kw: Any) -> AppendResult:
        raise StoreUnavailableError("down")

    async def append_batch(self, items: Sequence[Any]) -> list[AppendResult]:
        raise StoreUnavailableError("down")

    async def append_turn(self, turn: Turn, idempotency_key: str) -> bool:
        raise StoreUnavailableError("down")

    async def get_thread(self, thread_id: str) -> Thread | None:
        raise StoreUnavailableError("down")

    async def delete_expired(self, now: float) -> int:
        raise StoreUnavailableError("down")

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind}


async def main(state_dir: str) -> None:
    settings = attrs.evolve(Settings.from_env({}, env_file="", config_file=""), state_dir=state_dir)
    out = anyio.wrap_file(sys.stdout)
    async with ConversationService.open(settings, store=DownStore()) as svc:
        threads = [await svc.start_or_continue(None, "chat") for _ in range(3)]
        i = 0
        while True:
            key = f"call-{i:05d}"
            t = i % 3
            threads[t] = await svc.add_turns(
                threads[t],
                [Turn(role="user", content=f"{key}:q"), Turn(role="assistant", content=f"{key}:a")],
                key,
            )
            await out.write(f"{threads[t].id} {key}\n")
            await out.flush()
            i += 1


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
