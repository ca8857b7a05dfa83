"""Exactly-once across daemons: one daemon runs a keyed call, a retry elsewhere joins it.

A ``tools/call`` with an idempotency key (every call ``exai bridge`` forwards has one) may be
re-sent to another daemon while the first one still runs it: the bridge's connection broke (the
balancer restarted, a network blip, a daemon closing sessions on drain) but the daemon did not.
Each daemon already answers a retry of a *finished* call from the result stored in Redis; this
module makes a retry of a *running* one wait for that result instead of running the call again:

* **claim** (one script, replacing the plain result lookup): the stored result if there is one;
  else the run key ``<prefix>idem:{<key>}:run`` is set to this daemon's instance id and this
  daemon runs the call (*owner*); else another daemon runs it (*running*, with its id).
* **join**: a daemon that found the call running elsewhere polls (backoff 50 ms → 1 s, bounded
  by the call's deadline) until the result appears — the answer is the owner's — or the run key
  is gone without a result (the owner cancelled it), and then claims again.
* **owner liveness**: each daemon keeps ``<prefix>alive:{<instance>}`` alive (TTL
  ``alive_ttl_s``, renewed three times per TTL in the background). A joiner that finds the
  owner's key gone (SIGKILL, power loss) takes the call over at once instead of waiting for the
  owner's deadline.
* **finish** (one script, replacing the plain result write): the owner stores the result (first
  one wins, TTL ``result_ttl_s``) and drops its run key; a cancelled call only drops the key, so
  a joiner runs it. A finish Redis did not take (it was away for a moment) is sent again with
  each liveness beat until it is (at most :data:`MAX_UNFINISHED` holding at most
  :data:`MAX_UNFINISHED_BYTES`, oldest out): a joiner would
  otherwise wait for the run key's whole TTL, the owner alive and its result never there.

Keys carry the call's key as a Redis Cluster hash tag (the result and run keys share a slot);
the liveness check is a separate round trip, so no script spans slots.

A large result (its long strings over :data:`LARGE_RESULT_CHARS` in all) is not stored as one
JSON text — ``json.dumps`` of a 4 MiB answer was one loop step of ≈ 0.1 s on the owner, and the
claim's decode + ``json.loads`` another on the reader (issue 18: no loop stall over 50 ms) —
but as :data:`PIECES_MAGIC`, a small header, the JSON of its *skeleton* (each string over
:data:`exai.server.pieces.LONG_CHARS` replaced by a placeholder) and those strings as raw UTF-8,
encoded and decoded :data:`~exai.server.pieces.PIECE_CHARS` characters /
:data:`~exai.server.pieces.STEP_BYTES` bytes at a time with a checkpoint between
(:func:`encode_result`, :func:`decode_result`). The value is valid UTF-8 and not JSON, so a
daemon of an older version (a rolling restart) reading it takes it for "unavailable" and runs
the call itself (as during a Redis outage), never for another result; this version reads both
formats. A small result is stored as plain JSON, as before. A long string holding a lone
surrogate (not UTF-8) sends the whole result the plain way.

A value over :data:`TRANSFER_BYTES` (1 MiB) also goes to and from Redis in round trips of at
most that much: asyncio's ``writelines`` joins a command whole and its transport buffers the
rest whole, redis-py's pure-Python reader (no hiredis here) copies a bulk reply whole (the
``StreamReader`` buffer, ``readexactly``, its ``tail + data``) — each one step of the
trio-asyncio loop, ≈ 60 ms for a 32 MiB SET on a loaded machine, and a 96 MiB value did not
fit the 0.5 s bound of one round trip at all. The owner appends the pieces to an upload key of
its own (same hash tag), then one script renames it to the result (first one wins); a claim
that finds a result over 1 MiB reads it with ``GETRANGE``, 1 MiB at a time, into one buffer;
each read checks the result's size and first :data:`GUARD_BYTES` (its random token), so a
result that expired and was replaced between two reads is "unavailable", never a mix of two.
A stored value is not trusted: its header's sizes are checked against it before anything is
decoded, and a stored string fills at most :data:`MAX_REFS` placeholders, so reading a value
costs work and memory bounded by its size, and no result over :data:`MAX_RESULT_BYTES` is
stored or read (tests/server/test_shared_hostile.py).

Redis unreachable (or slow past ``call_bound_s``): :meth:`SharedCalls.claim` says so and the
caller runs the call itself — during a Redis outage a call retried onto another daemon may run
twice (docs/deploy.md). Nothing waits on Redis longer than the bound, and after a few failures
the breaker ``redis-calls`` answers "unavailable" at once until Redis answers again.
"""

from __future__ import annotations

import codecs
import json
import secrets
from collections import OrderedDict
from typing import Any, Final, Literal, Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from exai.errors import CircuitOpenError
from exai.logs import log_event
from exai.resilience.breaker import CircuitBreaker
from exai.server.pieces import LONG_CHARS, PIECE_CHARS, STEP_BYTES

__all__ = [
    "CLAIM_SCRIPT",
    "FINISH_SCRIPT",
    "LARGE_RESULT_CHARS",
    "PIECES_MAGIC",
    "Claim",
    "SharedCalls",
    "decode_result",
    "encode_result",
]

#: KEYS: result, run. ARGV: this daemon's id, run key TTL (ms), the largest result returned
#: whole (bytes). Returns {"result", <value>} | {"large", <its size>} | {"owner", ""} |
#: {"running", <owner id>}.
CLAIM_SCRIPT = """
local n = redis.call('STRLEN', KEYS[1])
if n > tonumber(ARGV[3]) then return {'large', tostring(n)} end
local r = redis.call('GET', KEYS[1])
if r then return {'result', r} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'owner', ''} end
local who = redis.call('GET', KEYS[2])
if who == ARGV[1] or not who then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'owner', ''}
end
return {'running', who}
"""

#: KEYS: run. ARGV: the dead owner's id, this daemon's id, run key TTL (ms). 1 when taken over.
TAKEOVER_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

#: KEYS: result, run. ARGV: this daemon's id, result json ('' = none), result TTL (ms).
FINISH_SCRIPT = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

#: KEYS: upload. ARGV: a piece, the upload's TTL (ms), '1' for the first piece.
UPLOAD_SCRIPT = """
if ARGV[3] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('APPEND', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

#: KEYS: result, run, upload. ARGV: this daemon's id, result TTL (ms), the upload's size.
#: The uploaded result becomes the result (first one wins) when it is whole; 1, else 0.
FINISH_UPLOADED_SCRIPT = """
local whole = redis.call('STRLEN', KEYS[3]) == tonumber(ARGV[3])
if whole and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('RENAME', KEYS[3], KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('DEL', KEYS[3])
end
if not whole then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

#: KEYS: result. ARGV: first, last byte, the result's size, its first bytes as read before.
#: A piece of a large result; false when the result is no longer the one being read (its size
#: or its first bytes changed: it expired, and another daemon stored another in its place).
READ_SCRIPT = """
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[3]) then return false end
if #ARGV[4] > 0 and redis.call('GETRANGE', KEYS[1], 0, #ARGV[4] - 1) ~= ARGV[4] then
  return false
end
return redis.call('GETRANGE', KEYS[1], ARGV[1], ARGV[2])
"""

#: the first bytes of a large result that every later read of it checks: they hold the
#: pieces format's random token (a value stored in its place by another finish differs)
GUARD_BYTES: Final = 128

#: a result larger than this goes to and from Redis in pieces of this size, one round trip
#: each: asyncio copies a command's arguments whole (``writelines``' join, the transport's
#: buffer) and redis-py's reader a reply whole, in one step each
TRANSFER_BYTES: Final = 1024 * 1024

#: the largest result shared through Redis (bytes stored): a larger one is not stored, and a
#: claim does not read one (Redis holds values up to 512 MB: the buffer is never that large)
MAX_RESULT_BYTES: Final = 128 * 1024 * 1024

#: an upload left half-done (Redis went away) is dropped this long after its last piece
UPLOAD_TTL_S: Final = 60

#: finishes kept to send again while Redis is away (oldest dropped beyond)
MAX_UNFINISHED = 1024
#: ... and the bytes their values may hold (oldest dropped beyond; the newest is always kept):
#: 1,024 large answers of a Redis outage were gigabytes. A joiner of a dropped one waits for
#: its run key's TTL, as when its owner could not store it
MAX_UNFINISHED_BYTES = 64 * 1024 * 1024

ClaimKind = Literal["result", "owner", "running", "unavailable"]


@attrs.frozen
class Claim:
    """What :meth:`SharedCalls.claim` found: a stored ``result``, this daemon is the ``owner``,
    another daemon (``owner_id``) has it ``running``, or Redis is ``unavailable``."""

    kind: ClaimKind
    result: dict[str, Any] | None = None
    owner_id: str = ""


class ScriptRunner(Protocol):
    async def run_script(self, script: str, keys: Any, args: Any) -> Any: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(
        self, key: str, value: bytes | str, *, ex_s: float | None = None, nx: bool = False
    ) -> bool: ...


class SharedCalls:
    """See the module docstring.

    Args:
        redis: the daemon's bridged Redis client (``run_script``, ``get``, ``set``).
        key_prefix: ``settings.redis_key_prefix``.
        instance_id: this daemon run's id (``Daemon.instance_id``).
        result_ttl_s: how long a finished call's result is kept (``idempotency_ttl_s``).
        alive_ttl_s: how soon a dead daemon's running calls may be taken over.
        call_bound_s: the longest one Redis round trip may take.

    Use as an async context manager: it owns the task keeping this daemon's liveness key.
    """

    def __init__(
        self,
        redis: ScriptRunner,
        *,
        key_prefix: str,
        instance_id: str,
        result_ttl_s: float,
        alive_ttl_s: float = 3.0,
        call_bound_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.prefix = key_prefix
        self.instance_id = instance_id
        self.result_ttl_s = result_ttl_s
        self.alive_ttl_s = alive_ttl_s
        self.call_bound_s = call_bound_s
        self._tg: anyio.abc.TaskGroup | None = None
        self.breaker = CircuitBreaker(
            "redis-calls",
            minimum_calls=3,
            window_size=10,
            slow_call_duration_s=call_bound_s,
            open_duration_s=1.0,
            max_open_duration_s=30.0,
            record=lambda exc: isinstance(exc, Exception),
        )
        #: key → the value of a finish Redis did not take, sent again with each beat
        self._unfinished: OrderedDict[str, str | list[bytes]] = OrderedDict()
        #: the bytes those values hold (bounded by MAX_UNFINISHED_BYTES, oldest out)
        self._unfinished_bytes = 0
        self.rejected = 0
        self.joined = 0
        self.taken_over = 0
        self.errors = 0

    async def __aenter__(self) -> SharedCalls:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        await self._beat()
        tg.start_soon(self._alive)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    # -- keys ------------------------------------------------------------------------------
    def result_key(self, key: str) -> str:
        # the key IdempotencyResults uses, so plain readers and writers still agree
        return f"{self.prefix}idem:{{{key}}}"

    def run_key(self, key: str) -> str:
        return f"{self.prefix}idem:{{{key}}}:run"

    def upload_key(self, key: str, upload: str) -> str:
        """Where one upload of a large result is put together (renamed to the result)."""
        return f"{self.prefix}idem:{{{key}}}:up:{self.instance_id}:{upload}"

    def alive_key(self, instance: str) -> str:
        return f"{self.prefix}alive:{{{instance}}}"

    # -- the protocol ----------------------------------------------------------------------
    async def claim(self, key: str, run_ttl_s: float) -> Claim:
        """The stored result, or ownership of the run, or who runs it (one round trip)."""
        reply = await self._run(
            CLAIM_SCRIPT,
            [self.result_key(key), self.run_key(key)],
            [self.instance_id, str(max(1, int(run_ttl_s * 1000))), str(TRANSFER_BYTES)],
        )
        if not isinstance(reply, list) or len(reply) != 2:
            return Claim("unavailable")
        kind = _text(reply[0])
        if kind == "large":
            size = int(_text(reply[1]))
            if size > MAX_RESULT_BYTES:  # (no daemon stores one: a value not to allocate)
                return Claim("unavailable")
            value = await self._read_large(key, size)
            if value is None:
                return Claim("unavailable")
            reply[1], kind = value, "result"
        if kind == "result":
            try:
                doc = await decode_result(reply[1])
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                return Claim("unavailable")
            return Claim("result", doc) if isinstance(doc, dict) else Claim("unavailable")
        if kind == "owner":
            return Claim("owner")
        return Claim("running", owner_id=_text(reply[1]))

    async def join(self, key: str, run_ttl_s: float, first: Claim) -> Claim:
        """Wait while another daemon runs ``key``: its result, or ownership once it stopped
        or died (bound the wait with a cancel scope: the call's deadline)."""
        claim = first
        delay = 0.05
        self.joined += 1
        while claim.kind == "running":
            if not await self._is_alive(claim.owner_id):
                took = await self._run(
                    TAKEOVER_SCRIPT,
                    [self.run_key(key)],
                    [claim.owner_id, self.instance_id, str(max(1, int(run_ttl_s * 1000)))],
                )
                if took is not None and int(took) == 1:
                    self.taken_over += 1
                    log_event("call.taken_over", owner=claim.owner_id)
                    return Claim("owner")
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)
            claim = await self.claim(key, run_ttl_s)
        return claim

    async def finish(self, key: str, payload: dict[str, Any] | None) -> None:
        """Store the owner's result (``None``: cancelled, store nothing) and drop its run key."""
        data: str | list[bytes] = "" if payload is None else await encode_result(payload)
        if not await self._store(key, data):
            self._forget(key)
            self._unfinished[key] = data
            self._unfinished_bytes += _size(data)
            while len(self._unfinished) > MAX_UNFINISHED or (
                self._unfinished_bytes > MAX_UNFINISHED_BYTES and len(self._unfinished) > 1
            ):
                self._forget(next(iter(self._unfinished)))

    def _forget(self, key: str) -> None:
        data = self._unfinished.pop(key, None)
        if data is not None:
            self._unfinished_bytes -= _size(data)

    async def _store(self, key: str, data: str | list[bytes]) -> bool:
        """One finish: ``data`` stored (``""``: none) and the run key dropped; False when Redis
        did not take it. A value over :data:`TRANSFER_BYTES` (or in pieces) is uploaded about
        :data:`TRANSFER_BYTES` at a time beside the result key, then renamed to it (first one
        wins)."""
        keys = [self.result_key(key), self.run_key(key)]
        ttl = str(max(1, int(self.result_ttl_s * 1000)))
        if _size(data) > MAX_RESULT_BYTES:
            # no reader would take it: the run key dropped, a joiner runs the call itself
            return await self._run(FINISH_SCRIPT, keys, [self.instance_id, "", ttl]) is not None
        if isinstance(data, str) and len(data) <= TRANSFER_BYTES:
            return await self._run(FINISH_SCRIPT, keys, [self.instance_id, data, ttl]) is not None
        pieces = [data.encode("utf-8")] if isinstance(data, str) else data
        upload = self.upload_key(key, secrets.token_hex(4))
        up_ttl = str(UPLOAD_TTL_S * 1000)
        size = 0
        group: list[bytes | memoryview] = []
        grouped = 0
        chunks = (
            view[at : at + TRANSFER_BYTES]
            for piece in pieces
            for view in (memoryview(piece),)
            for at in range(0, len(piece), TRANSFER_BYTES)
        )
        for chunk in [*chunks, None]:
            if chunk is not None and grouped + len(chunk) <= TRANSFER_BYTES:
                group.append(chunk)
                grouped += len(chunk)
                continue
            if group:
                arg = group[0] if len(group) == 1 else b"".join(group)
                first = "1" if size == 0 else ""
                if await self._run(UPLOAD_SCRIPT, [upload], [arg, up_ttl, first]) is None:
                    return False
                size += grouped
            group, grouped = ([chunk], len(chunk)) if chunk is not None else ([], 0)
        done = await self._run(
            FINISH_UPLOADED_SCRIPT, [*keys, upload], [self.instance_id, ttl, str(size)]
        )
        return done is not None and int(done) == 1

    async def _read_large(self, key: str, size: int) -> bytearray | None:
        """A stored result of ``size`` bytes read :data:`TRANSFER_BYTES` at a time; ``None``
        when Redis did not answer or the result changed meanwhile (expired, or expired and
        replaced by another daemon's: each read checks the size and the first
        :data:`GUARD_BYTES`, which hold the pieces format's random token — never a value
        made of two results)."""
        value = bytearray(size)
        guard = b""
        for at in range(0, size, TRANSFER_BYTES):
            end = min(size, at + TRANSFER_BYTES)
            piece = await self._run(
                READ_SCRIPT, [self.result_key(key)], [str(at), str(end - 1), str(size), guard]
            )
            if not isinstance(piece, bytes | bytearray) or len(piece) != end - at:
                return None
            value[at:end] = piece
            guard = bytes(value[:GUARD_BYTES])
        return value

    async def _finish_again(self) -> None:
        """Send the finishes Redis did not take, oldest first, until one fails again."""
        while self._unfinished:
            key, data = next(iter(self._unfinished.items()))
            if not await self._store(key, data):
                return
            if self._unfinished.get(key) is data:
                self._forget(key)

    # -- internals -------------------------------------------------------------------------
    async def _is_alive(self, instance: str) -> bool:
        try:
            with anyio.move_on_after(self.call_bound_s):
                return await self.redis.get(self.alive_key(instance)) is not None
        except Exception:
            self.errors += 1
        return True  # cannot tell: assume alive, keep waiting

    async def _beat(self) -> None:
        try:
            with anyio.move_on_after(self.call_bound_s):
                await self.redis.set(self.alive_key(self.instance_id), "1", ex_s=self.alive_ttl_s)
        except Exception:
            self.errors += 1

    async def _alive(self) -> None:
        while True:
            await anyio.sleep(self.alive_ttl_s / 3)
            await self._beat()
            await self._finish_again()

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """One bounded script round trip behind the breaker; ``None`` when Redis did not
        answer (or the breaker is open: a Redis that hangs costs a few calls the bound, then
        none until it answers again)."""
        try:
            async with self.breaker:
                with anyio.fail_after(self.call_bound_s):
                    return await self.redis.run_script(script, keys, args)
        except CircuitOpenError:
            self.rejected += 1
        except Exception:  # unreachable, timed out, or a bad reply: no shared state now
            self.errors += 1
        return None

    def status(self) -> dict[str, Any]:
        return {
            "joined": self.joined,
            "taken_over": self.taken_over,
            "errors": self.errors,
            "rejected": self.rejected,
            "unfinished": len(self._unfinished),
            "unfinished_bytes": self._unfinished_bytes,
            "breaker": self.breaker.state,
        }


def _size(data: str | list[bytes]) -> int:
    """What a value kept to send again holds (characters of a str: bytes for the ASCII JSON)."""
    return len(data) if isinstance(data, str) else sum(map(len, data))


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes | bytearray) else str(v)


#: the start of a result stored in pieces (a NUL first: no JSON text starts so, and it is UTF-8)
PIECES_MAGIC: Final = b"\x00exai-result-pieces:1\n"
#: a result whose long strings hold more characters than this in all is stored in pieces
LARGE_RESULT_CHARS: Final = 64 * 1024
#: the most placeholders one stored string fills (the same string object carried more often
#: is stored again): a stored value, once read, is at most this many times its own size —
#: a value with one string and a million placeholders for it is refused, not expanded
MAX_REFS: Final = 4


def _plain(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), default=str)


def _swap(node: Any, long: list[str], seen: dict[int, list[int]], token: str) -> Any:
    """``node`` with every exact ``str`` over :data:`LONG_CHARS` replaced by a placeholder
    (``token``, its index, NUL); one string carried twice (the same object) is kept once, up
    to :data:`MAX_REFS` placeholders per stored string (a reader refuses more)."""
    t = type(node)
    if t is str:
        if len(node) <= LONG_CHARS:
            return node
        entry = seen.get(id(node))
        if entry is None or entry[1] >= MAX_REFS:
            entry = seen[id(node)] = [len(long), 0]
            long.append(node)
        entry[1] += 1
        return f"{token}{entry[0]}\x00"
    if t is dict:
        return {key: _swap(value, long, seen, token) for key, value in node.items()}
    if t is list or t is tuple:
        return [_swap(value, long, seen, token) for value in node]
    return node


def _unswap(node: Any, long: list[str], refs: list[int], token: str) -> Any:
    t = type(node)
    if t is str:
        if node.startswith(token) and node.endswith("\x00"):
            index = int(node[len(token) : -1])
            if not 0 <= index < len(long):
                raise ValueError("a placeholder for no string")
            refs[index] += 1
            if refs[index] > MAX_REFS:  # a stored value that grows without bound once read
                raise ValueError("a string placed more often than a result places it")
            return long[index]
        return node
    if t is dict:
        return {key: _unswap(value, long, refs, token) for key, value in node.items()}
    if t is list:
        return [_unswap(value, long, refs, token) for value in node]
    return node


async def encode_result(payload: dict[str, Any]) -> str | list[bytes]:
    """What :meth:`SharedCalls.finish` stores for ``payload``: its JSON (a small result, as
    before), or — a large one — the pieces format (module docstring) as a list of pieces (the
    value is their concatenation), made with a checkpoint after every :data:`STEP_BYTES`."""
    long: list[str] = []
    token = f"\x00exai-piece:{secrets.token_hex(8)}:"
    try:
        skeleton = _swap(payload, long, {}, token)
    except RecursionError:
        return _plain(payload)
    if sum(map(len, long)) <= LARGE_RESULT_CHARS:
        return _plain(payload)
    await anyio.lowlevel.checkpoint()
    skel = json.dumps(skeleton, separators=(",", ":"), default=str).encode("ascii")
    parts: list[bytes] = []
    sizes: list[int] = []
    step = 0
    for value in long:
        size = 0
        for start in range(0, len(value), PIECE_CHARS):
            try:
                part = value[start : start + PIECE_CHARS].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: JSON escapes it, raw UTF-8 cannot
                return _plain(payload)
            parts.append(part)
            size += len(part)
            step += len(part)
            if step >= STEP_BYTES:
                step = 0
                await anyio.lowlevel.checkpoint()
        sizes.append(size)
    head = json.dumps({"token": token, "skeleton": len(skel), "strings": sizes}).encode("ascii")
    return [PIECES_MAGIC + head + b"\n" + skel, *parts]


async def decode_result(value: Any) -> Any:
    """The result stored as ``value`` (bytes from Redis), in either format; a large one is
    decoded :data:`STEP_BYTES` at a time with a checkpoint between.

    Raises:
        ValueError: not a stored result (bad JSON, bad UTF-8, a malformed header).
    """
    if not isinstance(value, bytes | bytearray) or not value.startswith(PIECES_MAGIC):
        return json.loads(value if isinstance(value, bytes | bytearray) else _text(value))
    view = memoryview(value)
    at = value.index(b"\n", len(PIECES_MAGIC)) + 1
    head = json.loads(bytes(view[len(PIECES_MAGIC) : at]))
    if type(head) is not dict:
        raise ValueError("a malformed result header")
    token, skel_size, sizes = head.get("token"), head.get("skeleton"), head.get("strings")
    # every size checked against the value before anything is decoded: a size that lies
    # (negative, past the end) must not read any byte twice or past the value
    if (
        type(token) is not str
        or not token
        or type(skel_size) is not int
        or type(sizes) is not list
        or skel_size < 2
        or not all(type(size) is int and size > LONG_CHARS for size in sizes)
        or at + skel_size + sum(sizes) != len(value)
    ):
        raise ValueError("a malformed result header")
    skeleton = json.loads(bytes(view[at : at + skel_size]))
    at += skel_size
    long: list[str] = []
    for size in sizes:
        end = at + size
        decoder = codecs.getincrementaldecoder("utf-8")()
        parts: list[str] = []
        for start in range(at, end, STEP_BYTES):
            parts.append(decoder.decode(view[start : min(end, start + STEP_BYTES)]))
            await anyio.lowlevel.checkpoint()
        parts.append(decoder.decode(b"", final=True))
        long.append("".join(parts))
        at = end
    if at != len(value):
        raise ValueError("trailing bytes after a result")
    doc = _unswap(skeleton, long, [0] * len(long), token)
    await anyio.lowlevel.checkpoint()
    return doc
