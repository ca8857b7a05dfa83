"""Spool records the store refuses for good, set aside: appended and fsync'd to
``<spool>.rejected`` so a poison record cannot block every record behind it, and is never lost.

:func:`set_aside` writes one record (through a worker thread, one at a time, bounded by the
caller's deadline); an operator can read the file and apply what is in it by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from exai.errors import StoreUnavailableError
from exai.storage.spool import SpoolRecord, encode_record

__all__ = ["rejected_path", "set_aside"]

_REJECT_LIMITER = anyio.CapacityLimiter(1)


def _append_rejected(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def rejected_path(spool_path: Path) -> Path:
    """Where the records the store refused are kept, beside the spool."""
    return Path(str(spool_path) + ".rejected")


async def set_aside(spool_path: Path, record: SpoolRecord, bound_s: float) -> None:
    """Append ``record`` to the rejected file beside the spool and fsync it.

    Raises:
        StoreUnavailableError: the disk did not answer within ``bound_s`` (the record stays in
            the spool and is tried again later).
    """
    line = encode_record(
        record.thread_id,
        record.base,
        list(record.turns),
        owner=record.owner,
        creation_key=record.creation_key,
    )
    try:
        with anyio.fail_after(bound_s):
            await anyio.to_thread.run_sync(
                _append_rejected,
                rejected_path(spool_path),
                line,
                limiter=_REJECT_LIMITER,
                abandon_on_cancel=True,
            )
    except (TimeoutError, OSError) as disk:
        raise StoreUnavailableError("the spool's disk did not answer in time") from disk
