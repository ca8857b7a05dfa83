"""The history that goes with a prompt: the newest turns of a thread that fit a token budget.

Shared by the tools that continue a conversation (``chat``, the workflow tools' expert
analysis, ``consensus``). Tokens are counted with the one estimate of
:mod:`exai.providers.tokens`.
"""

from __future__ import annotations

from typing import Any

from exai.providers import tokens

__all__ = ["PER_MESSAGE_TOKENS", "build_history"]

#: what each message costs beyond its content (role, separators)
PER_MESSAGE_TOKENS = 4


def build_history(thread: Any, token_budget: int) -> list[dict[str, str]]:
    """The newest turns of ``thread`` that fit in ``token_budget``, oldest first, as chat
    messages (``{"role", "content"}``). Each turn costs its content's estimate plus
    :data:`PER_MESSAGE_TOKENS`. A turn that does not fit ends the walk back in time, so the
    history is always the most recent contiguous slice.

    Args:
        thread: anything with ``turns`` (each with ``role`` and ``content``), oldest first.
        token_budget: tokens the history may take.
    """
    picked: list[Any] = []
    used = 0
    for turn in reversed(thread.turns):
        cost = tokens.estimate(turn.content) + PER_MESSAGE_TOKENS
        if used + cost > token_budget:
            break
        picked.append(turn)
        used += cost
    picked.reverse()
    return [{"role": t.role, "content": t.content} for t in picked]
