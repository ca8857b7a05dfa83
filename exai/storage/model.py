"""Conversation values: :class:`Turn` and :class:`Thread`.

Both are frozen attrs classes. Timestamps are wall-clock epoch seconds because they are *data*
that outlives the process and is shared between daemons (the event-loop clock means nothing to
another process). Code that decides with them (TTL) takes its ``now`` from a clock function that
tests replace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

__all__ = ["ROLES", "Thread", "Turn", "turn_key"]

#: the roles a stored turn may have.
ROLES = ("user", "assistant", "system", "tool")


def _files(v: Iterable[str]) -> tuple[str, ...]:
    if not v:
        return ()
    if isinstance(v, str):
        return (v,)
    return tuple(str(x) for x in v)


def turn_key(idempotency_key: str, index: int) -> str:
    """The key of the ``index``-th turn written by the call keyed ``idempotency_key``."""
    return f"{idempotency_key}#{index}"


@attrs.frozen(kw_only=True)
class Turn:
    """One turn of a conversation.

    Attributes:
        role: ``user``, ``assistant``, ``system`` or ``tool``.
        content: the text of the turn.
        tool: the exai tool that produced it (``chat``, ``codereview``, …).
        provider: the provider that answered (empty for user turns).
        model: the model that answered (empty for user turns).
        files: absolute paths the turn embedded.
        created_at: wall-clock epoch seconds; ``None`` until the service stamps it.
        thread_id: the thread it belongs to; set by the service.
        seq: 1-based position in the thread; assigned by the store (``None`` before).
        idempotency_key: unique per turn; a second write with the same key is a no-op.
    """

    role: str = attrs.field(validator=attrs.validators.in_(ROLES))
    content: str
    tool: str = ""
    provider: str = ""
    model: str = ""
    files: tuple[str, ...] = attrs.field(default=(), converter=_files)
    created_at: float | None = None
    thread_id: str = ""
    seq: int | None = None
    idempotency_key: str | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes of content, as counted against ``conversation_max_bytes``."""
        return len(self.content.encode("utf-8"))

    def placed(self, thread_id: str, seq: int | None) -> Turn:
        """This turn in thread ``thread_id`` at position ``seq`` (what ``attrs.evolve`` makes,
        for a fraction of its cost: a chat call places four turns)."""
        return Turn(
            role=self.role,
            content=self.content,
            tool=self.tool,
            provider=self.provider,
            model=self.model,
            files=self.files,
            created_at=self.created_at,
            thread_id=thread_id,
            seq=seq,
            idempotency_key=self.idempotency_key,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (spool records and the Redis cache)."""
        return {
            "role": self.role,
            "content": self.content,
            "tool": self.tool,
            "provider": self.provider,
            "model": self.model,
            "files": list(self.files),
            "created_at": self.created_at,
            "thread_id": self.thread_id,
            "seq": self.seq,
            "idempotency_key": self.idempotency_key,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Turn:
        """The inverse of :meth:`to_dict`."""
        return cls(
            role=data["role"],
            content=data["content"],
            tool=data.get("tool", ""),
            provider=data.get("provider", ""),
            model=data.get("model", ""),
            files=tuple(data.get("files", ())),
            created_at=data.get("created_at"),
            thread_id=data.get("thread_id", ""),
            seq=data.get("seq"),
            idempotency_key=data.get("idempotency_key"),
        )


def _turn_tuple(v: Iterable[Turn]) -> tuple[Turn, ...]:
    return tuple(v)


@attrs.frozen(kw_only=True)
class Thread:
    """A conversation thread: its turns in order and its lifetime.

    Attributes:
        id: the ``continuation_id``.
        turns: oldest first.
        created_at: wall-clock epoch seconds of the first turn (or of creation).
        updated_at: wall-clock epoch seconds of the last turn.
        expires_at: after this instant the thread is gone (``updated_at`` + TTL).
        owner: the client identity that created it; None for a thread written before
            ownership was recorded (nobody's: see docs/security.md).
        creation_key: the key the thread is created under (see
            :func:`exai.storage.service.creation_key`); only set on a new thread.
    """

    id: str
    turns: tuple[Turn, ...] = attrs.field(default=(), converter=_turn_tuple)
    created_at: float
    updated_at: float
    expires_at: float
    owner: str | None = None
    creation_key: str | None = None

    @property
    def size_bytes(self) -> int:
        """Bytes of content of all turns."""
        return sum(t.size_bytes for t in self.turns)

    def expired(self, now: float) -> bool:
        """True when the thread's TTL has passed at wall-clock ``now``."""
        return now >= self.expires_at

    def with_turns(self, extra: Iterable[Turn], *, ttl_s: float) -> Thread:
        """This thread with ``extra`` appended (seq numbered on), as the store would return it."""
        turns = list(self.turns)
        keys = {t.idempotency_key for t in turns if t.idempotency_key}
        updated = self.updated_at
        for t in extra:
            if t.idempotency_key and t.idempotency_key in keys:
                continue
            turns.append(t.placed(self.id, len(turns) + 1))
            if t.idempotency_key:
                keys.add(t.idempotency_key)
            if t.created_at is not None:
                updated = max(updated, t.created_at)
        if len(turns) == len(self.turns):
            return self
        # (what ``attrs.evolve`` makes, built directly: evolve looks every field up each call)
        return Thread(
            id=self.id,
            turns=turns,
            created_at=self.created_at,
            updated_at=updated,
            expires_at=updated + ttl_s,
            owner=self.owner,
            creation_key=self.creation_key,
        )

    def to_json(self) -> str:
        """Compact JSON (the Redis cache value)."""
        return json.dumps(
            {
                "id": self.id,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "expires_at": self.expires_at,
                "owner": self.owner,
                "turns": [t.to_dict() for t in self.turns],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Thread:
        """The inverse of :meth:`to_json`.

        Raises:
            KeyError: a value without ``owner`` (cached by an exai that did not record owners:
                the cache treats it as a miss and reads the store).
        """
        data = json.loads(text)
        owner = data["owner"]
        return cls(
            id=data["id"],
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            expires_at=data["expires_at"],
            owner=owner if isinstance(owner, str) else None,
            turns=tuple(Turn.from_dict(t) for t in data["turns"]),
        )
