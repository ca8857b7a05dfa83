"""The stored form of a finished call's answer: its text kept once, and its size in memory.

A tool's result carries its answer twice: as the text content and inside ``structuredContent``.
:func:`compact` keeps the text blocks as references into ``structuredContent`` for every long
string they repeat; :func:`expand` rebuilds them; :func:`approx_size` is what the stored form
costs. Used by :class:`exai.server.calls.CallRegistry`. Pure functions: no I/O, no time.
"""

from __future__ import annotations

import sys
from typing import Any

import attrs

__all__ = ["approx_size", "compact", "expand"]


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
#: strings longer than this are not looked for: comparing them (and joining them back,
#: :func:`expand`) is one step that grows with the answer (issue 18: ≈ 0.1 s for 16 MiB on a
#: loaded machine); such an answer is stored with its text whole (its bytes are counted)
_SPLICE_MAX_CHARS = 4 * 1024 * 1024
#: characters of text one :func:`compact` may scan looking for strings, all blocks together
#: (each string looked for costs the text up to where it is found, or the whole text): a
#: ``structuredContent`` of many long strings the text does not hold cost one scan each, in one
#: step — 1,000 strings of 1 KiB against a 3 MiB text took 3.7 s. ≈ 25 ms of CPU at ≈ 1.5 ms
#: per MiB; the strings not looked for once it is spent stay in the text (their bytes counted)
_SPLICE_SCAN_CHARS = 16 * 1024 * 1024


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


#: characters of a long string looked for first (see :func:`_find`)
_PROBE_CHARS = 64
#: places of the probe checked for the whole string before giving up on the text
_PROBE_TRIES = 8
#: characters compared at a time (a slice of this many is the only copy made)
_COMPARE_CHARS = 256 * 1024


def _stripped_length(value: str) -> int:
    """``len(value.rstrip())``, without copying ``value`` (its end, 1 Ki characters at a time)."""
    end = len(value)
    while end:
        start = max(0, end - 1024)
        kept = len(value[start:end].rstrip())
        if kept:
            return start + kept
        end = start
    return 0


def _matches(text: str, at: int, value: str, length: int) -> bool:
    """``text[at:at + length] == value[:length]``, a slice of ``value`` at a time."""
    if at + length > len(text):
        return False
    for start in range(0, length, _COMPARE_CHARS):
        stop = min(start + _COMPARE_CHARS, length)
        if not text.startswith(value[start:stop], at + start):
            return False
    return True


def _find(text: str, value: str, length: int) -> int:
    """``text.find(value[:length])`` for a long ``value``, without copying either: its first
    characters are looked for, and each place they are found is compared with the rest (a
    ``memcmp`` a slice at a time). ``str.find`` of a multi-MiB string costs ≈ 1.5 ms per MiB
    and ``rstrip`` copies it whole (issue 18: one step stored a 16 MiB answer); this ≈ 0.2 ms
    per MiB. A text where the probe recurs without the string is given up after a few tries:
    it is then stored whole."""
    probe = value[: min(_PROBE_CHARS, length)]
    at = text.find(probe)
    for _ in range(_PROBE_TRIES):
        if at < 0 or _matches(text, at, value, length):
            return at
        at = text.find(probe, at + 1)
    return -1


#: what one string looked for in one text block costs the budget at least (characters): the
#: pairs of (block, string) looked at are bounded too, not only the characters scanned — 10,000
#: tiny text blocks against 1,000 strings were 10 million looks, one step of 8 s, for a budget
#: that counted only the (tiny) texts scanned
_SPLICE_TRY_CHARS = 1024


def _splice(
    text: str, strings: list[tuple[tuple[str | int, ...], str, int]], budget: list[int]
) -> _Spliced | None:
    """``text`` as pieces referring to the long strings it contains (``strings``: path, value,
    its length without trailing whitespace — which tools often strip — longest first; without
    overlap), looked for while ``budget[0]`` (characters scanned, see
    :data:`_SPLICE_SCAN_CHARS`; each look at least :data:`_SPLICE_TRY_CHARS`) lasts."""
    if len(text) < _SPLICE_MIN_CHARS:
        return None  # (holds no string long enough: nothing to look for, nothing charged)
    spans: list[tuple[int, int, _Ref]] = []
    for path, value, length in strings:
        if budget[0] <= 0:
            break
        if length > len(text):
            budget[0] -= _SPLICE_TRY_CHARS
            continue
        at = _find(text, value, length)
        budget[0] -= max(_SPLICE_TRY_CHARS, len(text) if at < 0 else at + length)
        if at < 0 or any(at < end and start < at + length for start, end, _ in spans):
            continue
        spans.append((at, at + length, _Ref(path, length)))
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
    kept as references into ``structuredContent`` for every string of at least 1 KiB (and at
    most 4 Mi characters) they repeat, longest first, while a scan budget lasts (16 Mi
    characters, each string looked for in each block at least 1 Ki of them: one step stays
    short whatever ``structuredContent`` and ``content`` hold); :func:`expand`
    rebuilds them. Payloads with nothing repeated come back as they are.
    """
    result = payload.get("result")
    if not isinstance(result, dict):
        return payload
    structured, content = result.get("structuredContent"), result.get("content")
    if not isinstance(structured, dict) or not isinstance(content, list):
        return payload
    if not any(
        isinstance(b, dict)
        and isinstance(b.get("text"), str)
        and len(b["text"]) >= _SPLICE_MIN_CHARS
        for b in content
    ):
        return payload  # no text block long enough to repeat a long string: nothing to search
    budget = [_SPLICE_SCAN_CHARS]
    strings: list[tuple[tuple[str | int, ...], str, int]] = []
    for path, value in _long_strings(structured):
        # each string's length without its trailing whitespace, once (not once per block)
        length = _stripped_length(value)
        budget[0] -= len(value) - length
        if _SPLICE_MIN_CHARS <= length <= _SPLICE_MAX_CHARS:
            strings.append((path, value, length))
    if not strings:
        return payload
    strings.sort(key=lambda item: -len(item[1]))
    blocks: list[Any] = []
    changed = False
    for block in content:
        text = block.get("text") if isinstance(block, dict) else None
        spliced = _splice(text, strings, budget) if isinstance(text, str) else None
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
    pop, extend, getsizeof = stack.pop, stack.extend, sys.getsizeof
    while stack:
        node = pop()
        total += getsizeof(node)
        t = type(node)
        if t is str or t is int or t is float or t is bool or node is None:
            continue  # (the common leaves, without the isinstance checks below)
        if isinstance(node, dict):
            extend(node.keys())
            extend(node.values())
        elif isinstance(node, list | tuple):
            extend(node)
        elif isinstance(node, _Spliced):
            extend(node.pieces)
    return total
