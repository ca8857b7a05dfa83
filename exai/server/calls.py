"""Executions of ``tools/call`` and the exactly-once registry.

An :class:`Execution` is one run of a tool. It lives in the daemon's calls nursery, not in the
session that started it, so that a bridge which lost its connection can reconnect and *join*
the execution instead of running the tool again. Sessions attach to an execution as watchers
(to receive its progress and its result) and detach when they close.

Resource handling:
    An execution holds one slot of its session's limiter and one of the global limiter from
    before it starts until it ends (released in ``finally``). When its last watcher detaches,
    an execution started without an idempotency key is cancelled at once; one started with a
    key (a bridge that will re-send) is given ``orphan_grace_s`` to be adopted, then cancelled.

The :class:`CallRegistry` maps a key — the client's ``_meta["exai/idempotencyKey"]`` or, when
absent, ``session id + request id`` — to the running execution or to its finished response,
kept for ``ttl_s``, at most ``max_entries`` of them and ``max_bytes`` in all (oldest first
out), each answer's text stored once (:func:`compact`). Every entry carries the digest of the
request that made it (:func:`exai.server.protocol.call_digest`): the same key asking another
question is another call, never answered from this one.
"""

from __future__ import annotations

import itertools
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
import trio

__all__ = ["CallRegistry", "Execution", "Finished", "Watcher", "approx_size", "compact", "expand"]

_ids = itertools.count(1)


@attrs.define(eq=False)
class Watcher:
    """A session waiting for an execution: where to send progress (``None`` = no progress)."""

    send_progress: Callable[[dict[str, Any]], None]
    progress_token: str | int | None


@attrs.define(eq=False)
class Execution:
    """One run of a tool, joined by every request with the same key and digest.

    Attributes:
        key: the exactly-once key (``k:<identity>:<idempotency key>`` or
            ``s:<session>:<request id>``).
        digest: :func:`exai.server.protocol.call_digest` of the request that started it.
        deadline: when the call must have finished (``trio.current_time()`` clock), fixed at
            admission: time spent waiting for a slot counts against it.
        payload_bytes: the answer's size as stored (:func:`approx_size`), once done.
    """

    key: str
    tool: str
    client_key: bool
    digest: str = ""
    deadline: float = float("inf")
    payload_bytes: int = 0
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: the wait for a shared result and slots before the run: shielded from the responder
    #: that started it (other requests may have joined), cancelled only by :meth:`cancel`
    wait_scope: trio.CancelScope = attrs.field(factory=lambda: trio.CancelScope(shield=True))
    done: trio.Event = attrs.field(factory=trio.Event)
    adopted: trio.Event = attrs.field(factory=trio.Event)
    orphaned: trio.Event = attrs.field(factory=trio.Event)
    watchers: list[Watcher] = attrs.field(factory=list)
    payload: dict[str, Any] | None = None  # {"result": …} or {"error": …}
    cancelled: bool = False
    started_at: float = 0.0
    progress_value: float = 0.0
    number: int = attrs.field(factory=lambda: next(_ids))

    @property
    def shared_key(self) -> str:
        """The key of this call's result in the store shared by daemons (client keys only)."""
        return f"{self.key.removeprefix('k:')}#{self.digest}"

    @property
    def call_key(self) -> str:
        """The key a tool makes its own writes idempotent with: a request id reused for
        another question (another digest) is another call."""
        return f"{self.key}~{self.digest}"

    def attach(self, watcher: Watcher) -> None:
        self.watchers.append(watcher)
        self.orphaned = trio.Event()
        self.adopted.set()

    def detach(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)
        if not self.watchers and not self.done.is_set():
            if self.client_key:
                # give a reconnecting bridge time to re-send and adopt this execution
                self.adopted = trio.Event()
                self.orphaned.set()
            else:
                self.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        self.wait_scope.cancel()
        self.scope.cancel()

    def progress(
        self,
        message: str | None,
        *,
        make: Callable[..., dict[str, Any]],
        value: float | None = None,
        total: float | None = None,
    ) -> None:
        """Send a progress notification to every watcher that asked for progress.

        The MCP spec wants the value to strictly increase. A tool's own ``value`` (and
        ``total``) is passed on when it is above the last one sent; otherwise — a heartbeat,
        or a tool going backwards — the last value plus a thousandth is sent, without a total.
        """
        if value is not None and value > self.progress_value:
            self.progress_value = float(value)
        else:
            self.progress_value = round(self.progress_value + 0.001, 6)
            total = None
        for w in list(self.watchers):
            if w.progress_token is not None:
                w.send_progress(make(w.progress_token, self.progress_value, total, message))


@attrs.frozen
class Finished:
    """A finished call's answer as the registry gives it back."""

    digest: str
    payload: dict[str, Any]
    nbytes: int


@attrs.frozen
class _Ref:
    """Part of a text block stored as a reference to a string of ``structuredContent``."""

    path: tuple[str | int, ...]
    length: int


@attrs.frozen
class _Spliced:
    """A text block's text stored as pieces: plain strings and :class:`_Ref`."""

    pieces: tuple[str | _Ref, ...]


#: strings shorter than this are not worth a reference
_SPLICE_MIN_CHARS = 1024
#: how many nodes of ``structuredContent`` are searched for strings the text repeats
_SPLICE_MAX_NODES = 1000


def _long_strings(structured: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Strings of ``structured`` at least ``_SPLICE_MIN_CHARS`` long, with their paths."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), structured)]
    seen = 0
    while stack and seen < _SPLICE_MAX_NODES:
        path, node = stack.pop()
        seen += 1
        if isinstance(node, str):
            if len(node) >= _SPLICE_MIN_CHARS:
                found.append((path, node))
        elif isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in enumerate(node))
    return found


def _splice(text: str, strings: list[tuple[tuple[str | int, ...], str]]) -> _Spliced | None:
    """``text`` as pieces referring to the long strings it contains (longest first, without
    overlap; a string is matched without its trailing whitespace, which tools often strip)."""
    spans: list[tuple[int, int, _Ref]] = []
    for path, value in sorted(strings, key=lambda item: -len(item[1])):
        core = value.rstrip()
        if len(core) < _SPLICE_MIN_CHARS:
            continue
        at = text.find(core)
        if at < 0 or any(at < end and start < at + len(core) for start, end, _ in spans):
            continue
        spans.append((at, at + len(core), _Ref(path, len(core))))
    if not spans:
        return None
    pieces: list[str | _Ref] = []
    pos = 0
    for start, end, ref in sorted(spans, key=lambda s: s[0]):
        if start > pos:
            pieces.append(text[pos:start])
        pieces.append(ref)
        pos = end
    if pos < len(text):
        pieces.append(text[pos:])
    return _Spliced(tuple(pieces))


def compact(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with its answer text stored once.

    A tool's result carries its answer twice: as the text content and inside
    ``structuredContent`` (``chat``'s ``content``, ``consensus``'s answers). The text blocks are
    kept as references into ``structuredContent`` for every string of at least 1 KiB they
    repeat; :func:`expand` rebuilds them. Payloads with nothing repeated come back as they are.
    """
    result = payload.get("result")
    if not isinstance(result, dict):
        return payload
    structured, content = result.get("structuredContent"), result.get("content")
    if not isinstance(structured, dict) or not isinstance(content, list):
        return payload
    strings = _long_strings(structured)
    if not strings:
        return payload
    blocks: list[Any] = []
    changed = False
    for block in content:
        text = block.get("text") if isinstance(block, dict) else None
        spliced = _splice(text, strings) if isinstance(text, str) else None
        if spliced is not None:
            block = {**block, "text": spliced}
            changed = True
        blocks.append(block)
    if not changed:
        return payload
    return {**payload, "result": {**result, "content": blocks}}


def expand(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload :func:`compact` was given (a new dict; the stored one is not changed)."""
    result = payload.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("content"), list):
        return payload
    content = result["content"]
    if not any(isinstance(b, dict) and isinstance(b.get("text"), _Spliced) for b in content):
        return payload
    structured = result["structuredContent"]
    blocks = []
    for block in content:
        if isinstance(block, dict) and isinstance(block.get("text"), _Spliced):
            parts = []
            for piece in block["text"].pieces:
                if isinstance(piece, _Ref):
                    node: Any = structured
                    for step in piece.path:
                        node = node[step]
                    parts.append(node[: piece.length])
                else:
                    parts.append(piece)
            block = {**block, "text": "".join(parts)}
        blocks.append(block)
    return {**payload, "result": {**result, "content": blocks}}


def approx_size(value: Any) -> int:
    """Bytes ``value`` holds in memory: ``sys.getsizeof`` of every str, container and scalar
    reached (shared objects counted each time they are reached)."""
    total = 0
    stack = [value]
    while stack:
        node = stack.pop()
        total += sys.getsizeof(node)
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, _Spliced):
            stack.extend(node.pieces)
    return total


class CallRegistry:
    """Running executions and finished answers by key, bounded in count, bytes and time.

    Finished answers are kept for ``ttl_s``, at most ``max_entries`` of them and ``max_bytes``
    in all (:func:`approx_size` of the stored form, the answer text stored once: see
    :func:`compact`); the oldest go first. An answer larger than ``max_bytes`` on its own is not
    kept: a re-send of its request runs again, as after the TTL.
    """

    def __init__(
        self, *, ttl_s: float, max_entries: int, max_bytes: int, orphan_grace_s: float
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.orphan_grace_s = orphan_grace_s
        self.running: dict[str, Execution] = {}
        # key → (expires_at, digest, compacted payload, bytes)
        self._finished: OrderedDict[str, tuple[float, str, dict[str, Any], int]] = OrderedDict()
        self.nbytes = 0
        #: answers dropped before their TTL to stay within the byte or count budget
        self.evicted = 0
        #: answers too large to keep at all
        self.too_large = 0

    def finished(self, key: str) -> Finished | None:
        """The stored answer of ``key`` (expanded), or ``None``."""
        item = self._finished.get(key)
        if item is None:
            return None
        expires_at, digest, payload, nbytes = item
        if expires_at <= trio.current_time():
            self._drop(key)
            return None
        return Finished(digest, expand(payload), nbytes)

    def store(self, key: str, digest: str, payload: dict[str, Any]) -> int:
        """Keep ``payload`` for ``key``; returns its size in bytes as stored."""
        now = trio.current_time()
        stored = compact(payload)
        nbytes = approx_size(stored)
        if key in self._finished:
            self._drop(key)
        if nbytes > self.max_bytes:
            self.too_large += 1
        else:
            self._finished[key] = (now + self.ttl_s, digest, stored, nbytes)
            self.nbytes += nbytes
        while self._finished:
            oldest_key, (exp, _, _, _) = next(iter(self._finished.items()))
            over = len(self._finished) > self.max_entries or self.nbytes > self.max_bytes
            if not over and exp > now:
                break
            self._drop(oldest_key)
            if over:
                self.evicted += 1
        return nbytes

    def _drop(self, key: str) -> None:
        item = self._finished.pop(key, None)
        if item is not None:
            self.nbytes -= item[3]

    def shrink(self, keep_fraction: float = 1.0) -> int:
        """Drop expired answers, then the oldest until at most ``keep_fraction`` of
        ``max_bytes`` is held (memory pressure). Returns how many were dropped."""
        now = trio.current_time()
        expired = [k for k, (exp, _, _, _) in self._finished.items() if exp <= now]
        for k in expired:
            self._drop(k)
        dropped = len(expired)
        while self._finished and self.nbytes > keep_fraction * self.max_bytes:
            self._drop(next(iter(self._finished)))
            self.evicted += 1
            dropped += 1
        return dropped

    def __len__(self) -> int:
        return len(self._finished)

    async def orphan_watch(self, ex: Execution) -> None:
        """Cancel ``ex`` when it has had no watcher for ``orphan_grace_s``."""
        while True:
            await ex.orphaned.wait()
            with trio.move_on_after(self.orphan_grace_s):
                await ex.adopted.wait()
            if not ex.watchers:
                ex.cancel()
                return
