"""A daemon plugin that makes the disk hang on cue: ``exai serve --plugin
tests.adversarial.hung_disk:register``.

While the file ``<state dir>/hang-sqlite`` exists, every SQLite write blocks in its worker thread
(where a dead disk's ``fsync`` would block); while ``<state dir>/hang-spool`` exists, so does every
spool write. Removing the file lets the blocked threads go on. The flag is looked at from the
worker thread, never from the event loop.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from exai.config import Settings
from exai.storage.spool import Spool
from exai.storage.sqlite import SQLiteStore


def _hang_while(flag: Path, fn: Any) -> Any:
    @functools.wraps(fn)
    def hung(*args: Any, **kw: Any) -> Any:
        while flag.exists():  # a blocked system call, as far as the daemon can tell
            time.sleep(0.05)
        return fn(*args, **kw)

    return hung


def register(registry: Any, settings: Settings) -> None:
    state = settings.state_path
    SQLiteStore._append_sync = _hang_while(state / "hang-sqlite", SQLiteStore._append_sync)  # type: ignore[method-assign]
    Spool._write_sync = _hang_while(state / "hang-spool", Spool._write_sync)  # type: ignore[method-assign]
