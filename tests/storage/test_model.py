"""Turn and Thread values."""

from __future__ import annotations

import pytest

from exai.storage.model import Thread, Turn, turn_key


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
