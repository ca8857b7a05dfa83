"""Turn and Thread values."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exai.storage.model import ROLES, Thread, Turn, turn_key


def _thread(**kw: object) -> Thread:
    return Thread(id="t1", created_at=100.0, updated_at=100.0, expires_at=200.0, **kw)


def test_turn_round_trips_through_a_dict() -> None:
    turn = Turn(
        role="assistant",
        content="héllo",
        tool="chat",
        provider="kimi",
        model="k2",
        files=["/a", "/b"],
        created_at=1.5,
        thread_id="t1",
        seq=3,
        idempotency_key="k#0",
    )
    assert Turn.from_dict(turn.to_dict()) == turn
    assert turn.files == ("/a", "/b")
    assert turn.size_bytes == len("héllo".encode())


def test_turn_rejects_an_unknown_role() -> None:
    with pytest.raises(ValueError):
        Turn(role="robot", content="x")


def test_thread_round_trips_through_json() -> None:
    thread = _thread(turns=(Turn(role="user", content="q", created_at=100.0, seq=1),))
    assert Thread.from_json(thread.to_json()) == thread


def test_with_turns_numbers_new_turns_and_refreshes_expiry() -> None:
    thread = _thread().with_turns(
        [Turn(role="user", content="a", created_at=150.0, idempotency_key="k#0")], ttl_s=60.0
    )
    assert [t.seq for t in thread.turns] == [1]
    assert thread.updated_at == 150.0
    assert thread.expires_at == 210.0


def test_with_turns_skips_turns_whose_key_is_already_there() -> None:
    turn = Turn(role="user", content="a", created_at=150.0, idempotency_key=turn_key("k", 0))
    once = _thread().with_turns([turn], ttl_s=60.0)
    assert once.with_turns([turn], ttl_s=60.0) is once


def test_expired_is_decided_by_the_given_clock() -> None:
    thread = _thread()
    assert not thread.expired(199.9)
    assert thread.expired(200.0)


def test_the_storage_package_exports_its_public_api_lazily() -> None:
    import subprocess
    import sys

    import exai.storage

    for name in exai.storage.__all__:
        assert getattr(exai.storage, name) is not None, name
    # a fresh interpreter: importing the package does not load trio-asyncio
    probe = "import sys, exai.storage; print('trio_asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@given(
    role=st.sampled_from(ROLES),
    content=st.text(max_size=20),
    tool=st.text(max_size=5),
    files=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    created_at=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    key=st.none() | st.text(max_size=8),
    thread_id=st.text(max_size=8),
    seq=st.none() | st.integers(min_value=1, max_value=10**6),
)
def test_placing_a_turn_is_what_evolve_makes(
    role: str,
    content: str,
    tool: str,
    files: tuple[str, ...],
    created_at: float | None,
    key: str | None,
    thread_id: str,
    seq: int | None,
) -> None:
    turn = Turn(
        role=role,
        content=content,
        tool=tool,
        provider="p",
        model="m",
        files=files,
        created_at=created_at,
        thread_id="before",
        seq=7,
        idempotency_key=key,
    )
    assert turn.placed(thread_id, seq) == attrs.evolve(turn, thread_id=thread_id, seq=seq)


def test_placed_copies_every_field_of_a_turn() -> None:
    # Turn.placed names each field: a field added to Turn must be added there too
    assert [f.name for f in attrs.fields(Turn)] == [
        "role",
        "content",
        "tool",
        "provider",
        "model",
        "files",
        "created_at",
        "thread_id",
        "seq",
        "idempotency_key",
    ]


_turns = st.lists(
    st.builds(
        Turn,
        role=st.sampled_from(sorted(ROLES)),
        content=st.text(max_size=8),
        created_at=st.none() | st.floats(min_value=0, max_value=2e9),
        idempotency_key=st.none() | st.sampled_from(["a", "b", "c"]),
    ),
    max_size=5,
)


@given(
    before=_turns,
    extra=_turns,
    owner=st.none() | st.text(max_size=8),
    creation_key=st.none() | st.text(max_size=8),
    created_at=st.floats(min_value=0, max_value=2e9),
    ttl_s=st.floats(min_value=0, max_value=1e7),
)
def test_with_turns_is_what_evolve_makes(
    before: list[Turn],
    extra: list[Turn],
    owner: str | None,
    creation_key: str | None,
    created_at: float,
    ttl_s: float,
) -> None:
    # with_turns builds its copy field by field (c5e401e: evolve looked each one up)
    thread = Thread(
        id="t1",
        turns=[t.placed("t1", i + 1) for i, t in enumerate(before)],
        created_at=created_at,
        updated_at=created_at,
        expires_at=created_at + 5,
        owner=owner,
        creation_key=creation_key,
    )
    got = thread.with_turns(extra, ttl_s=ttl_s)
    if got is thread:
        return  # (nothing new: the thread itself)
    expected = attrs.evolve(
        thread, turns=got.turns, updated_at=got.updated_at, expires_at=got.updated_at + ttl_s
    )
    assert got == expected
    assert type(got.turns) is tuple  # (the converter ran)


def test_with_turns_copies_every_field_of_a_thread() -> None:
    # Thread.with_turns names each field: a field added to Thread must be added there too
    assert [f.name for f in attrs.fields(Thread)] == [
        "id",
        "turns",
        "created_at",
        "updated_at",
        "expires_at",
        "owner",
        "creation_key",
    ]
