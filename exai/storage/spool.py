"""The local write spool: turns that could not reach the primary store, kept durably until
they can.

Format: an append-only file of lines ``<crc32 hex> <json>\\n``; each JSON record is one write,
``{"thread_id", "base", "turns": [...]}`` (``base``: how many turns the writer saw in the thread
before this write; 0 means the spool holds the thread from its first turn). Each append is
written and ``fsync``'d in a worker thread before :meth:`Spool.append` returns.

Guarantees:

- **Durable**: an append that returned survives ``kill -9`` and power loss (fsync).
- **Torn tails are harmless**: a record cut short by a crash (no newline, bad checksum) is
  skipped on open and the file is truncated back to its last whole record before anything new
  is appended, so a torn record can never swallow the next one.
- **Bounded**: at most ``max_bytes``; an append that does not fit raises
  :class:`~exai.errors.StorageUnavailableError` and writes nothing.
- **Replay is idempotent**: :meth:`Spool.replay` re-applies records in order through a writer
  that skips turns it already has (the store's idempotency keys), then drops the applied prefix
  (truncate, or rewrite the unapplied tail to a temporary file and rename it over). A crash
  anywhere in between replays some records again, which is a no-op: nothing lost, nothing
  duplicated.
- **One owner**: the spool holds an exclusive ``flock`` on ``<file>.lock`` while open, so two
  processes never share a spool file. :func:`open_spool` picks the first free file of a family
  and adopts (moves into its own file) the records of family members no live process holds.

Every file operation runs through :func:`anyio.to_thread.run_sync` under the spool's own
limiter of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs

from exai.errors import StorageUnavailableError, StoreError
from exai.storage.model import Turn

__all__ = ["Spool", "SpoolRecord", "open_spool"]


@attrs.frozen(kw_only=True)
class SpoolRecord:
    """One spooled write: ``turns`` of ``thread_id``; ``base`` turns preceded them."""

    thread_id: str
    base: int
    turns: tuple[Turn, ...]
    size_bytes: int = 0


def encode_record(thread_id: str, base: int, turns: list[Turn]) -> bytes:
    body = json.dumps(
        {"thread_id": thread_id, "base": base, "turns": [t.to_dict() for t in turns]},
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> SpoolRecord | None:
    """The record on one line (with its newline), or None when it is torn or corrupt."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        data = json.loads(body)
        return SpoolRecord(
            thread_id=data["thread_id"],
            base=int(data["base"]),
            turns=tuple(Turn.from_dict(t) for t in data["turns"]),
            size_bytes=len(line),
        )
    except (ValueError, KeyError, TypeError):
        return None


class Spool:
    """One spool file (see the module docstring).

    Args:
        path: the spool file; ``<path>.lock`` is its lock file.
        max_bytes: the bound on the file's size.

    Raises (``__aenter__``):
        BlockingIOError: another process holds this spool.
    """

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._limiter = anyio.CapacityLimiter(1)
        self._lock = anyio.Lock()  # appends vs. dropping a replayed prefix
        self._records: list[SpoolRecord] = []
        self._by_thread: dict[str, list[SpoolRecord]] = {}
        self._keys: set[str] = set()
        self._bytes = 0
        # group commit: appends queued while another task writes; that task writes them all
        self._queue: list[_Waiter] = []
        self._queued_bytes = 0
        self._queued_keys: set[str] = set()
        self._writing = False
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self.torn_records_dropped = 0
        self.appended = 0
        self.replayed = 0
        self.full_rejections = 0

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Spool:
        await self._io(self._open_sync)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True):
            await self._io(self._close_sync)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise
        self._lock_fd = lock_fd
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd = fd
        records, good_end, dropped = _read_records(fd)
        size = os.fstat(fd).st_size
        if good_end != size:
            # a torn tail from a crash: cut it off so the next append starts on a clean line
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        self._set_records(records)
        self._bytes = good_end
        self.torn_records_dropped = dropped

    def _close_sync(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            os.close(lock_fd)  # releases the flock

    # -- what is pending ----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Records waiting for replay."""
        return len(self._records)

    @property
    def size_bytes(self) -> int:
        """Bytes of the spool file."""
        return self._bytes

    def records(self) -> list[SpoolRecord]:
        """The pending records, oldest first."""
        return list(self._records)

    def pending(self, thread_id: str) -> list[SpoolRecord]:
        """The pending records of one thread, oldest first."""
        return list(self._by_thread.get(thread_id, ()))

    def has_pending(self, thread_id: str) -> bool:
        return thread_id in self._by_thread

    def _set_records(self, records: list[SpoolRecord]) -> None:
        self._records = records
        self._by_thread = {}
        self._keys = set()
        for r in records:
            self._index(r)

    def _index(self, record: SpoolRecord) -> None:
        self._by_thread.setdefault(record.thread_id, []).append(record)
        self._keys.update(t.idempotency_key for t in record.turns if t.idempotency_key)

    # -- writing ------------------------------------------------------------------------
    async def append(self, thread_id: str, turns: list[Turn], *, base: int) -> bool:
        """Append one write durably (fsync'd) before returning.

        Concurrent appends are committed together (one write and one fsync for all that
        queued while the previous fsync ran). Turns whose idempotency key is already pending
        are left out; returns False when nothing was left to append.

        Raises:
            StorageUnavailableError: the spool is full, or the disk refused the write
                (nothing of this write is kept).
        """
        fresh = [
            t
            for t in turns
            if t.idempotency_key not in self._keys and t.idempotency_key not in self._queued_keys
        ]
        if not fresh:
            return False
        line = encode_record(thread_id, base, fresh)
        if self._bytes + self._queued_bytes + len(line) > self.max_bytes:
            self.full_rejections += 1
            raise StorageUnavailableError(
                "the conversation store is unavailable and the local spool is full "
                f"({self._bytes} of {self.max_bytes} bytes); nothing was written",
                retry_after_s=5.0,
            )
        waiter = _Waiter(
            line,
            SpoolRecord(thread_id=thread_id, base=base, turns=tuple(fresh), size_bytes=len(line)),
        )
        self._queue.append(waiter)
        self._queued_bytes += len(line)
        self._queued_keys.update(t.idempotency_key for t in fresh if t.idempotency_key)
        # Shielded: once queued, the caller must learn whether its bytes reached the disk.
        with anyio.CancelScope(shield=True):
            if self._writing:
                await waiter.done.wait()
            else:
                await self._write_queued()
        if waiter.error is not None:
            raise waiter.error
        return True

    async def _write_queued(self) -> None:
        self._writing = True
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                data = b"".join(w.line for w in batch)
                error: StorageUnavailableError | None = None
                async with self._lock:
                    try:
                        await self._io(self._write_sync, data, self._bytes)
                    except (OSError, StoreError) as exc:
                        error = StorageUnavailableError(
                            f"the conversation store is unavailable and the spool cannot be "
                            f"written ({exc}); nothing was written",
                            retry_after_s=5.0,
                        )
                    else:
                        for w in batch:
                            self._records.append(w.record)
                            self._index(w.record)
                        self._bytes += len(data)
                        self.appended += len(batch)
                    self._queued_bytes -= len(data)
                    for w in batch:
                        self._queued_keys.difference_update(
                            t.idempotency_key for t in w.record.turns if t.idempotency_key
                        )
                        w.error = error
                        w.done.set()
        finally:
            self._writing = False

    def _write_sync(self, data: bytes, at: int) -> None:
        if self._fd is None:
            raise StoreError("the spool is not open")
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            # never leave a partial record for the next append to run into
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, at)
            raise

    # -- replay -------------------------------------------------------------------------
    async def replay(self, apply: Callable[[SpoolRecord], Awaitable[Any]]) -> int:
        """Apply every pending record, oldest first, then drop the applied ones.

        ``apply`` must be idempotent (the store skips turns whose key it has). When it raises,
        the records applied so far are dropped and the error propagates; the rest stay.

        Returns:
            the number of records applied.
        """
        snapshot = list(self._records)
        done = 0
        try:
            for record in snapshot:
                await apply(record)
                done += 1
        finally:
            if done:
                with anyio.CancelScope(shield=True):
                    await self._drop_prefix(done)
        return done

    async def _drop_prefix(self, n: int) -> None:
        async with self._lock:
            dropped = self._records[:n]
            cut = sum(r.size_bytes for r in dropped)
            if cut == self._bytes:
                await self._io(self._truncate_sync)
            else:
                await self._io(self._rewrite_tail_sync, cut)
            self._set_records(self._records[n:])
            self._bytes -= cut
            self.replayed += n

    def _truncate_sync(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def _rewrite_tail_sync(self, offset: int) -> None:
        assert self._fd is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        tail_fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pos = offset
            while True:
                chunk = os.pread(self._fd, 1 << 20, pos)
                if not chunk:
                    break
                os.write(tail_fd, chunk)
                pos += len(chunk)
            os.fsync(tail_fd)
        finally:
            os.close(tail_fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(str(self.path), os.O_RDWR | os.O_APPEND)

    def status(self) -> dict[str, Any]:
        """Depth, size, bound and counters."""
        return {
            "path": str(self.path),
            "depth": self.depth,
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "threads": len(self._by_thread),
            "appended": self.appended,
            "replayed": self.replayed,
            "full_rejections": self.full_rejections,
            "torn_records_dropped": self.torn_records_dropped,
        }


@attrs.define
class _Waiter:
    line: bytes
    record: SpoolRecord
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: StorageUnavailableError | None = None


def _read_records(fd: int) -> tuple[list[SpoolRecord], int, int]:
    """(whole records, offset after the last whole record, records dropped)."""
    records: list[SpoolRecord] = []
    data = b""
    pos = 0
    while True:
        chunk = os.pread(fd, 1 << 20, pos)
        if not chunk:
            break
        data += chunk
        pos += len(chunk)
    good_end = 0
    dropped = 0
    offset = 0
    for line in data.splitlines(keepends=True):
        offset += len(line)
        rec = decode_line(line)
        if rec is None:
            dropped += 1
            continue
        records.append(rec)
        good_end = offset
    return records, good_end, dropped


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _spool_family(directory: Path, stem: str) -> list[Path]:
    return sorted(p for p in directory.glob(f"{stem}*.spool") if p.is_file())


@asynccontextmanager
async def open_spool(directory: Path, stem: str, *, max_bytes: int) -> AsyncIterator[Spool]:
    """Open the first spool file of the family ``<directory>/<stem>[.N].spool`` that no other
    process holds, and adopt the records of family members left by dead processes.

    Adoption appends an orphan's records to the opened spool (fsync'd), then deletes the
    orphan; a crash in between leaves both copies, which replay de-duplicates.
    """
    await anyio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
    spool: Spool | None = None
    for n in range(64):
        path = directory / (f"{stem}.spool" if n == 0 else f"{stem}.{n}.spool")
        candidate = Spool(path, max_bytes=max_bytes)
        try:
            await candidate.__aenter__()
        except BlockingIOError:
            continue
        spool = candidate
        break
    if spool is None:
        raise StoreError(f"no free spool file in {directory} (64 daemons share it?)")
    try:
        await _adopt_orphans(spool, directory, stem)
        yield spool
    finally:
        await spool.__aexit__(None, None, None)


async def _adopt_orphans(spool: Spool, directory: Path, stem: str) -> None:
    family = await anyio.to_thread.run_sync(_spool_family, directory, stem)
    for path in family:
        if path == spool.path:
            continue
        orphan = Spool(path, max_bytes=1 << 62)
        try:
            await orphan.__aenter__()
        except BlockingIOError:
            continue  # a live daemon owns it
        try:
            for record in orphan.records():
                await spool.append(record.thread_id, list(record.turns), base=record.base)
            # unlinked while its lock is still held, so no other process adopts it twice
            await anyio.to_thread.run_sync(_remove_spool, path)
        except StorageUnavailableError:
            pass  # ours is full: leave the orphan for a later start
        finally:
            await orphan.__aexit__(None, None, None)


def _remove_spool(path: Path) -> None:
    # the lock file stays: removing it could let two processes lock two different inodes
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
