"""The history that goes with a prompt: the newest turns that fit a token budget."""

from __future__ import annotations

from exai.providers import tokens
from exai.storage.model import Thread, Turn
from exai.tools.history import build_history


def test_history_keeps_the_newest_turns_that_fit_oldest_first() -> None:
    thread = Thread(id="t", created_at=0.0, updated_at=0.0, expires_at=1.0).with_turns(
        [
            Turn(
                role="user" if i % 2 == 0 else "assistant",
                content=f"turn{i}-" * 10,
                created_at=float(i),
                idempotency_key=f"k#{i}",
            )
            for i in range(6)
        ],
        ttl_s=1.0,
    )
    per_turn = 20 + 4  # 60 characters / 3 characters a token + the per-message overhead
    history = build_history(thread, token_budget=3 * per_turn + 5)
    assert [m["content"][:5] for m in history] == ["turn3", "turn4", "turn5"]
    assert [m["role"] for m in history] == ["assistant", "user", "assistant"]
    assert build_history(thread, token_budget=per_turn - 1) == []
    assert len(build_history(thread, token_budget=10_000)) == 6


def test_one_estimate_counts_tokens_for_every_budget() -> None:
    """History, files and the providers' TPM reservation use the same characters per token."""
    from exai.providers.provider import estimate_tokens
    from exai.tools import sandbox

    assert sandbox.CHARS_PER_TOKEN == tokens.CHARS_PER_TOKEN
    assert tokens.estimate("x" * 300) == 300 // tokens.CHARS_PER_TOKEN
    message = [{"role": "user", "content": "x" * 3000}]
    assert estimate_tokens(message, 1) > tokens.estimate("x" * 3000)
