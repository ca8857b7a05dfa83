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
- **Per record**: a record applied to the store is marked at once (:meth:`Spool.mark_applied`:
  ``depth`` and ``replayed`` move, reads and ordering stop seeing it); the file is cut back
  (:meth:`Spool.compact`) once the applied prefix is worth a rewrite, or whole.

Every file operation runs through :func:`anyio.to_thread.run_sync` under the spool's own
limiter of one, **bounded** by ``io_timeout_s`` (a hung disk never holds a caller or the
shutdown longer). A timed-out operation is abandoned (its thread may still finish), and the
next operation first puts the file back in a known state: after an abandoned append the file
is cut back to its last confirmed record (the writers were told "not written", so nothing of
theirs is kept); after an abandoned compaction the records are re-read from the file (whatever
the rewrite did, the file then says what is pending; re-applying a record is a no-op).
Appends are written by one writer task that the spool owns (group commit), so no caller has to
shield its cancel scope to finish a write for others.
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
import anyio.abc
import anyio.to_thread
import attrs

from exai.config.dirs import make_dirs
from exai.errors import ExaiError, StorageUnavailableError, StoreError
from exai.resilience.backoff import Wakeup
from exai.storage.model import Turn

__all__ = ["Spool", "SpoolRecord", "open_spool"]

#: the applied prefix is cut from the file once it is this large (and at least half the file),
#: or whenever every record is applied (a truncate, nothing to copy)
COMPACT_MIN_BYTES = 1 << 20


@attrs.frozen(kw_only=True)
class SpoolRecord:
    """One spooled write: ``turns`` of ``thread_id``; ``base`` turns preceded them.

    ``owner`` and ``creation_key`` are the thread's owner and the key that created it (for a
    write that may create the thread); ``seq`` is the record's number in this spool (0 until
    it is written).
    """

    thread_id: str
    base: int
    turns: tuple[Turn, ...]
    size_bytes: int = 0
    owner: str | None = None
    creation_key: str | None = None
    seq: int = 0


def encode_record(
    thread_id: str,
    base: int,
    turns: list[Turn],
    *,
    owner: str | None = None,
    creation_key: str | None = None,
) -> bytes:
    data: dict[str, Any] = {
        "thread_id": thread_id,
        "base": base,
        "turns": [t.to_dict() for t in turns],
    }
    if owner is not None:
        data["owner"] = owner
    if creation_key is not None:
        data["creation_key"] = creation_key
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode()
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
        owner = data.get("owner")
        ck = data.get("creation_key")
        return SpoolRecord(
            thread_id=data["thread_id"],
            base=int(data["base"]),
            turns=tuple(Turn.from_dict(t) for t in data["turns"]),
            size_bytes=len(line),
            owner=owner if isinstance(owner, str) else None,
            creation_key=ck if isinstance(ck, str) else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


@attrs.define
class _Entry:
    record: SpoolRecord
    applied: bool = False


class Spool:
    """One spool file (see the module docstring).

    Args:
        path: the spool file; ``<path>.lock`` is its lock file.
        max_bytes: the bound on the file's size.
        io_timeout_s: the bound on one file operation (a write and its fsync, a compaction).

    Raises (``__aenter__``):
        BlockingIOError: another process holds this spool.
    """

    def __init__(self, path: Path, *, max_bytes: int, io_timeout_s: float = 5.0) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.io_timeout_s = io_timeout_s
        self._limiter = anyio.CapacityLimiter(1)
        self._lock = anyio.Lock()  # the writer vs. compaction (both change the file)
        self._entries: dict[int, _Entry] = {}  # by seq, in file order (applied ones too)
        self._next_seq = 1
        self._pending = 0
        self._by_thread: dict[str, list[SpoolRecord]] = {}
        self._by_creation: dict[str, str] = {}
        self._keys: set[str] = set()
        self._bytes = 0
        # group commit: appends queue here; the writer task writes whatever queued at once
        self._queue: list[_Waiter] = []
        self._queued_bytes = 0
        self._queued_keys: set[str] = set()
        self._queued = Wakeup()
        self._tg: anyio.abc.TaskGroup | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        # what an abandoned (timed-out) file operation may have left behind: "append" or
        # "reload"; the next operation repairs it first
        self._dirty: str | None = None
        self.torn_records_dropped = 0
        self.appended = 0
        self.replayed = 0
        self.full_rejections = 0
        self.io_timeouts = 0
        self.compactions = 0

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Spool:
        await self._io(self._open_sync)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(self._writer)
        self._tg = tg
        return self

    async def __aexit__(self, *exc: object) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            for w in self._queue:  # never written: say so
                w.error = _unavailable("the spool is closing")
                w.done.set()
            self._queue.clear()
            with contextlib.suppress(ExaiError, OSError):
                await self._io(self._close_sync)

    async def _io(self, fn: Callable[..., Any], *args: Any, dirty: str | None = None) -> Any:
        """``fn(*args)`` in the spool's worker thread, bounded by ``io_timeout_s``.

        Repairs what an earlier abandoned operation may have left first. ``dirty`` says what
        this operation leaves behind if it is abandoned (None: nothing).

        Raises:
            StorageUnavailableError: the disk did not answer in time.
        """
        try:
            with anyio.fail_after(self.io_timeout_s):
                if self._dirty is not None:
                    await self._repair()
                return await anyio.to_thread.run_sync(
                    fn, *args, limiter=self._limiter, abandon_on_cancel=True
                )
        except TimeoutError:
            self.io_timeouts += 1
            if dirty is not None and self._dirty != "reload":
                self._dirty = dirty
            raise _unavailable(
                f"the spool's disk did not answer within {self.io_timeout_s:g}s"
            ) from None

    async def _repair(self) -> None:
        kind = self._dirty
        if kind == "append":
            await anyio.to_thread.run_sync(
                self._cut_to_sync, self._bytes, limiter=self._limiter, abandon_on_cancel=True
            )
        else:
            records, good_end = await anyio.to_thread.run_sync(
                self._reload_sync, limiter=self._limiter, abandon_on_cancel=True
            )
            self._set_records(records)
            self._bytes = good_end
        self._dirty = None

    def _open_sync(self) -> None:
        make_dirs(self.path.parent)
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

    def _cut_to_sync(self, end: int) -> None:
        fd = self._require_fd()
        if os.fstat(fd).st_size != end:
            os.ftruncate(fd, end)
            os.fsync(fd)

    def _reload_sync(self) -> tuple[list[SpoolRecord], int]:
        fd = self._require_fd()
        records, good_end, _ = _read_records(fd)
        if os.fstat(fd).st_size != good_end:
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        return records, good_end

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StoreError("the spool is not open")
        return self._fd

    # -- what is pending ----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Records waiting for replay."""
        return self._pending

    @property
    def size_bytes(self) -> int:
        """Bytes of the spool file."""
        return self._bytes

    def records(self) -> list[SpoolRecord]:
        """The pending records, oldest first."""
        return [e.record for e in self._entries.values() if not e.applied]

    def pending(self, thread_id: str) -> list[SpoolRecord]:
        """The pending records of one thread, oldest first."""
        return list(self._by_thread.get(thread_id, ()))

    def has_pending(self, thread_id: str) -> bool:
        return thread_id in self._by_thread

    def is_pending(self, record: SpoolRecord) -> bool:
        entry = self._entries.get(record.seq)
        return entry is not None and not entry.applied and entry.record is record

    def thread_for_creation_key(self, creation_key: str) -> str | None:
        """The thread a pending record created under ``creation_key``, if any."""
        return self._by_creation.get(creation_key)

    def _set_records(self, records: list[SpoolRecord]) -> None:
        self._entries = {}
        self._by_thread = {}
        self._by_creation = {}
        self._keys = set()
        self._pending = 0
        for r in records:
            self._add(r)

    def _add(self, record: SpoolRecord) -> SpoolRecord:
        record = attrs.evolve(record, seq=self._next_seq)
        self._next_seq += 1
        self._entries[record.seq] = _Entry(record)
        self._pending += 1
        self._by_thread.setdefault(record.thread_id, []).append(record)
        if record.creation_key:
            self._by_creation.setdefault(record.creation_key, record.thread_id)
        self._keys.update(t.idempotency_key for t in record.turns if t.idempotency_key)
        return record

    def mark_applied(self, record: SpoolRecord) -> bool:
        """Record that ``record`` is in the store: it leaves ``depth``, :meth:`pending` and
        the reads at once (``replayed`` moves); its bytes leave the file at the next
        :meth:`compact`. False when it was not pending (applied already, or unknown)."""
        entry = self._entries.get(record.seq)
        if entry is None or entry.applied or entry.record is not record:
            return False
        entry.applied = True
        self._pending -= 1
        self.replayed += 1
        mine = self._by_thread.get(record.thread_id)
        if mine is not None:
            with contextlib.suppress(ValueError):
                mine.remove(record)
            if not mine:
                del self._by_thread[record.thread_id]
        ck = record.creation_key
        if (
            ck
            and self._by_creation.get(ck) == record.thread_id
            and not any(r.creation_key == ck for r in mine or ())
        ):
            del self._by_creation[ck]
        self._keys.difference_update(t.idempotency_key for t in record.turns if t.idempotency_key)
        return True

    @property
    def compactable_bytes(self) -> int:
        """Bytes of the applied records at the head of the file (what :meth:`compact` cuts)."""
        total = 0
        for e in self._entries.values():
            if not e.applied:
                break
            total += e.record.size_bytes
        return total

    # -- writing ------------------------------------------------------------------------
    async def append(
        self,
        thread_id: str,
        turns: list[Turn],
        *,
        base: int,
        owner: str | None = None,
        creation_key: str | None = None,
    ) -> bool:
        """Append one write durably (fsync'd) before returning.

        Concurrent appends are committed together (one write and one fsync for all that
        queued while the previous fsync ran). Turns whose idempotency key is already pending
        are left out; returns False when nothing was left to append. Bounded by the caller's
        deadline and, for the disk, by ``io_timeout_s``. A caller cancelled before its record
        went to the disk leaves nothing behind; one cancelled later may find its record
        replayed (idempotently) after all.

        Raises:
            StorageUnavailableError: the spool is full, or the disk refused the write or did
                not answer in time (nothing of this write is kept).
        """
        if self._tg is None:
            raise StoreError("the spool is not open")
        fresh = [
            t
            for t in turns
            if t.idempotency_key not in self._keys and t.idempotency_key not in self._queued_keys
        ]
        if not fresh:
            return False
        line = encode_record(thread_id, base, fresh, owner=owner, creation_key=creation_key)
        if self._bytes + self._queued_bytes + len(line) > self.max_bytes:
            self.full_rejections += 1
            raise StorageUnavailableError(
                "the conversation store is unavailable and the local spool is full "
                f"({self._bytes} of {self.max_bytes} bytes); nothing was written",
                retry_after_s=5.0,
            )
        waiter = _Waiter(
            line,
            SpoolRecord(
                thread_id=thread_id,
                base=base,
                turns=tuple(fresh),
                size_bytes=len(line),
                owner=owner,
                creation_key=creation_key,
            ),
        )
        self._queue.append(waiter)
        self._queued_bytes += len(line)
        self._queued_keys.update(t.idempotency_key for t in fresh if t.idempotency_key)
        self._queued.set()
        try:
            await waiter.done.wait()
        except BaseException:
            if waiter in self._queue:  # not taken by the writer yet: never written
                self._queue.remove(waiter)
                self._unqueue(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        return True

    def _unqueue(self, waiter: _Waiter) -> None:
        self._queued_bytes -= len(waiter.line)
        self._queued_keys.difference_update(
            t.idempotency_key for t in waiter.record.turns if t.idempotency_key
        )

    async def _writer(self) -> None:
        while True:
            if not self._queue:
                self._queued.clear()
                await self._queued.wait()
                continue
            batch, self._queue = self._queue, []
            data = b"".join(w.line for w in batch)
            error: StorageUnavailableError | None = None
            async with self._lock:
                try:
                    await self._io(self._write_sync, data, self._bytes, dirty="append")
                except StorageUnavailableError as exc:
                    error = exc
                except (OSError, StoreError) as exc:
                    error = _unavailable(f"the spool cannot be written ({_oserror(exc)})")
                else:
                    for w in batch:
                        self._add(w.record)
                    self._bytes += len(data)
                    self.appended += len(batch)
            for w in batch:
                self._unqueue(w)
                w.error = error
                w.done.set()

    def _write_sync(self, data: bytes, at: int) -> None:
        fd = self._require_fd()
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError:
            # never leave a partial record for the next append to run into
            with contextlib.suppress(OSError):
                os.ftruncate(fd, at)
            raise

    # -- replay -------------------------------------------------------------------------
    async def replay(self, apply: Callable[[SpoolRecord], Awaitable[Any]]) -> int:
        """Apply every pending record, oldest first, marking each applied as it lands.

        ``apply`` must be idempotent (the store skips turns whose key it has). When it raises,
        the error propagates and the records not yet applied stay pending. Records another
        task applied meanwhile (:meth:`mark_applied`) are skipped. The file is compacted as
        the applied prefix grows and once more at the end.

        Returns:
            the number of records this call applied.
        """
        done = 0
        try:
            for record in self.records():
                if not self.is_pending(record):
                    continue
                await apply(record)
                if self.mark_applied(record):
                    done += 1
                await self.maybe_compact()
        finally:
            await self.maybe_compact(final=True)
        return done

    async def maybe_compact(self, *, final: bool = False) -> int:
        """Compact when the applied prefix is worth a rewrite (at least ``COMPACT_MIN_BYTES``
        and half the file), or whenever there is one and ``final``. Never raises: a compaction
        that fails or runs out of time leaves the records to be re-applied (no-ops) later."""
        cut = self.compactable_bytes
        if not cut or not (final or (cut >= COMPACT_MIN_BYTES and 2 * cut >= self._bytes)):
            return 0
        with anyio.CancelScope(shield=True):  # bounded by io_timeout_s
            try:
                return await self.compact()
            except (ExaiError, OSError):
                pass
        return 0

    async def compact(self) -> int:
        """Cut the applied records at the head of the file; the bytes cut.

        Raises:
            StorageUnavailableError: the disk did not answer in time (the records then stay
                in the file and are re-applied, as no-ops, after a restart).
        """
        async with self._lock:
            prefix = []
            for e in self._entries.values():
                if not e.applied:
                    break
                prefix.append(e)
            if not prefix:
                return 0
            cut = sum(e.record.size_bytes for e in prefix)
            if cut >= self._bytes:
                await self._io(self._cut_to_sync, 0, dirty="reload")
            else:
                await self._io(self._rewrite_tail_sync, cut, self._bytes, dirty="reload")
            for e in prefix:
                del self._entries[e.record.seq]
            self._bytes -= cut
            self.compactions += 1
            return cut

    def _rewrite_tail_sync(self, offset: int, end: int) -> None:
        fd = self._require_fd()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tail_fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            pos = offset
            while pos < end:
                chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                if not chunk:
                    break
                os.write(tail_fd, chunk)
                pos += len(chunk)
            os.fsync(tail_fd)
        finally:
            os.close(tail_fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        os.close(fd)
        self._fd = os.open(str(self.path), os.O_RDWR | os.O_APPEND)

    def status(self) -> dict[str, Any]:
        """Depth, size, bound and counters."""
        return {
            "file": self.path.name,  # (no server path: clients read status)
            "depth": self.depth,
            "bytes": self._bytes,
            "max_bytes": self.max_bytes,
            "threads": len(self._by_thread),
            "appended": self.appended,
            "replayed": self.replayed,
            "full_rejections": self.full_rejections,
            "torn_records_dropped": self.torn_records_dropped,
            "io_timeouts": self.io_timeouts,
            "compactions": self.compactions,
        }


@attrs.define
class _Waiter:
    line: bytes
    record: SpoolRecord
    done: anyio.Event = attrs.field(factory=anyio.Event)
    error: StorageUnavailableError | None = None


def _unavailable(why: str) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"the conversation store is unavailable and {why}; nothing was written",
        retry_after_s=5.0,
    )


def _oserror(exc: BaseException) -> str:
    """An OS error without the file name (never a server path in a client-visible message)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _read_records(fd: int) -> tuple[list[SpoolRecord], int, int]:
    """(whole records, offset after the last whole record, records dropped)."""
    records: list[SpoolRecord] = []
    chunks: list[bytes] = []
    pos = 0
    while True:
        chunk = os.pread(fd, 1 << 20, pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    data = b"".join(chunks)
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
async def open_spool(
    directory: Path, stem: str, *, max_bytes: int, io_timeout_s: float = 5.0
) -> AsyncIterator[Spool]:
    """Open the first spool file of the family ``<directory>/<stem>[.N].spool`` that no other
    process holds, and adopt the records of family members left by dead processes.

    Adoption appends an orphan's records to the opened spool (fsync'd), then deletes the
    orphan; a crash in between leaves both copies, which replay de-duplicates.
    """
    await anyio.to_thread.run_sync(
        lambda: make_dirs(directory)  # (turns: private)
    )
    spool: Spool | None = None
    for n in range(64):
        path = directory / (f"{stem}.spool" if n == 0 else f"{stem}.{n}.spool")
        candidate = Spool(path, max_bytes=max_bytes, io_timeout_s=io_timeout_s)
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
        size = await anyio.to_thread.run_sync(_file_size, path)
        if spool.size_bytes + size > spool.max_bytes:
            continue  # ours cannot take it whole: leave the orphan for a later start
        orphan = Spool(path, max_bytes=1 << 62, io_timeout_s=spool.io_timeout_s)
        try:
            await orphan.__aenter__()
        except BlockingIOError:
            continue  # a live daemon owns it
        try:
            for record in orphan.records():
                await spool.append(
                    record.thread_id,
                    list(record.turns),
                    base=record.base,
                    owner=record.owner,
                    creation_key=record.creation_key,
                )
            # unlinked while its lock is still held, so no other process adopts it twice
            await anyio.to_thread.run_sync(_remove_spool, path)
        except StorageUnavailableError:
            pass  # ours is full: leave the orphan for a later start
        finally:
            await orphan.__aexit__(None, None, None)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remove_spool(path: Path) -> None:
    # the lock file stays: removing it could let two processes lock two different inodes
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
