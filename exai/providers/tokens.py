"""How many tokens a text is: the one estimate behind every token budget exai keeps.

Used for a provider's token-per-minute reservation before a request is sent (settled against
the usage the provider reports), for the usage of an answer that reported none, for how much
of a thread's history goes with a prompt, and for how much of a file fits a model's context.

:data:`CHARS_PER_TOKEN` is 3, on the generous side on purpose: English averages about 4
characters a token, code and other languages fewer (Chinese, which Kimi and GLM serve, is
closer to 1.5). An estimate that is too high reserves a little more of the TPM budget and
leaves a little room unused in a context window; one that is too low overshoots both.
"""

from __future__ import annotations

import math

__all__ = ["CHARS_PER_TOKEN", "chars_for", "estimate", "for_chars"]

#: characters counted as one token
CHARS_PER_TOKEN = 3


def for_chars(n_chars: int) -> int:
    """Tokens of a text of ``n_chars`` characters (at least 1)."""
    return max(1, math.ceil(n_chars / CHARS_PER_TOKEN))


def estimate(text: str) -> int:
    """Tokens of ``text`` (at least 1)."""
    return for_chars(len(text))


def chars_for(tokens: int) -> int:
    """Characters that fit in ``tokens`` tokens."""
    return max(0, tokens) * CHARS_PER_TOKEN
