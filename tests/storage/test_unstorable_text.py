"""Text a store cannot hold (a lone surrogate a client sent as ``\\ud800``, NUL) never fails a
paid call and never poisons the replay: it is made storable before the write, and a record that
the store refuses anyway is set aside while the rest replays."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from exai.storage.model import Turn
from exai.storage.service import ConversationService
from exai.storage.spool import open_spool
from tests.storage.conftest import make_settings

pytestmark = pytest.mark.anyio


async def test_lone_surrogates_and_nul_in_a_turn_and_its_key_are_stored_not_refused(
    tmp_path: Path,
) -> None:
    async with ConversationService.open(make_settings(tmp_path)) as svc:
        thread = await svc.start_or_continue(None, "chat", call_key="k:a:\ud800", owner="a")
        thread = await svc.add_turns(
            thread,
            [Turn(role="user", content="q \ud800 \x00"), Turn(role="assistant", content="a")],
            "chat:k:a:\ud800",
            owner="a",
        )
        other = await svc.add_turns(
            thread, [Turn(role="user", content="next")], "chat:k:a:\udc00", owner="a"
        )
        stored = await svc.store.get_thread(thread.id)
        assert svc.spool.depth == 0
    assert stored is not None
    assert [t.content for t in stored.turns] == ["q \ufffd \ufffd", "a", "next"]
    assert len(other.turns) == 3  # two keys that differ only in a surrogate stay apart


async def test_a_spooled_record_the_store_refuses_is_set_aside_and_the_rest_replays(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    stem = (
        "turns-"
        + __import__("hashlib").sha256(settings.effective_storage_url.encode()).hexdigest()[:12]
    )
    # records written by an older exai, which did not clean text before spooling it
    async with open_spool(settings.state_path / "spool", stem, max_bytes=1 << 20) as spool:
        for key, text in (("bad", "x \ud800"), ("good", "fine")):
            turn = Turn(role="user", content=text, created_at=1.0, idempotency_key=f"{key}#0")
            await spool.append(f"thread-{key}", [turn], base=0, owner="anonymous")
    async with ConversationService.open(settings) as svc:
        with anyio.fail_after(30):
            await svc.wait_replayed()
        good = await svc.store.get_thread("thread-good")
        rejected = svc.replay_rejected
    assert good is not None and [t.content for t in good.turns] == ["fine"]
    assert rejected == 1
    assert (settings.state_path / "spool" / f"{stem}.spool.rejected").exists()


async def test_a_long_answer_is_made_storable_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 4 MiB answer went through one regular-expression pass (≈ 20 ns a character): a loop
    # step of ≈ 80 ms, found by an attack on a live daemon (loop.stall in add_turns). A clean
    # long text is now checked by C scans only, and one that needs replacing is replaced in
    # parts of at most 256 Ki characters, a checkpoint between two.
    from exai.storage import service

    passes: list[int] = []
    pattern = service._UNSTORABLE

    class Recording:
        def sub(self, repl: str, text: str) -> str:
            passes.append(len(text))
            return pattern.sub(repl, text)

        def search(self, text: str) -> object:
            passes.append(len(text))
            return pattern.search(text)

    monkeypatch.setattr(service, "_UNSTORABLE", Recording())
    part = 256 * 1024
    clean = "é" + "x" * (4 * 1024 * 1024)
    # bad characters on both sides of a part's edge and at the very end
    dirty = "y" * (part - 1) + "\x00\ud800" + "z" * (3 * part) + "\udfff"
    async with ConversationService.open(make_settings(tmp_path)) as svc:
        thread = await svc.start_or_continue(None, "chat", call_key="k:long")
        other = await svc.start_or_continue(None, "chat", call_key="k:long2")
        stored = []
        for t, answer, key in ((thread, clean, "chat:k:long"), (other, dirty, "chat:k:long2")):
            t = await svc.add_turns(
                t, [Turn(role="user", content="q"), Turn(role="assistant", content=answer)], key
            )
            stored.append(await svc.store.get_thread(t.id))
    assert passes and max(passes) <= part, max(passes)
    assert [[t.content for t in s.turns] for s in stored if s is not None] == [
        ["q", clean],
        ["q", "y" * (part - 1) + "\ufffd\ufffd" + "z" * (3 * part) + "\ufffd"],
    ]
