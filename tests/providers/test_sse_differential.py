"""exai's SSE reader against a well-kept reference parser (``httpx-sse``), differentially.

Hypothesis writes an event stream (data, event, id, retry, comment and unknown fields, lines
ended by LF, CRLF or CR, multi-byte UTF-8, fields with and without the space after the colon)
and chooses how its bytes are split into network chunks, down to single bytes and through the
middle of a UTF-8 sequence or a CRLF. :class:`exai.providers.sse.SSEDecoder` must produce the
same events as ``httpx_sse.EventSource`` reading the same chunks through ``httpx``.

Where the two differ on purpose, the generator stays inside their common ground: every event
block carries at least one ``data`` line (``httpx-sse`` also dispatches a block with only
``event``/``id``/``retry``, the WHATWG spec does not, and neither does exai), and a stream ends
with a blank line (an unterminated event is dropped by both).
"""

from __future__ import annotations

import itertools
import os

import httpx
from httpx_sse import EventSource
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exai.providers.sse import SSEDecoder

EXAMPLES = int(os.environ.get("EXAI_FUZZ_EXAMPLES", "300"))

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values: any text without line ends (surrogates cannot be encoded), including ':' and
# multi-byte characters; NUL included (an id holding NUL is ignored by the spec).
_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=12,
)
_name = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n:"),
    min_size=1,
    max_size=6,
)
_space = st.sampled_from(["", " "])


@st.composite
def _field(draw: st.DrawFn, name: st.SearchStrategy[str]) -> str:
    if draw(st.integers(0, 5)) == 0:
        return draw(name)  # a field with no colon: the whole line is its name, value ""
    return f"{draw(name)}:{draw(_space)}{draw(_value)}"


_data = _field(st.just("data"))
_other = st.one_of(
    _field(st.sampled_from(["event", "id", "retry"])),
    st.builds(lambda d: f"retry: {d}", st.integers(0, 10**6)),
    st.builds(lambda v: ":" + v, _value),  # a comment (": keep-alive")
    _field(_name),  # unknown fields are ignored
)


@st.composite
def _stream(draw: st.DrawFn) -> bytes:
    out: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        lines = draw(st.lists(_other, max_size=4))
        datas = draw(st.lists(_data, min_size=1, max_size=3))
        block = draw(st.permutations([*lines, *datas]))
        for line in [*block, ""]:
            out.append(line + draw(st.sampled_from(["\n", "\r\n", "\r"])))
    return "".join(out).encode("utf-8")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[i:j] for i, j in itertools.pairwise(bounds) if j > i]


def _ours(chunks: list[bytes]) -> list[tuple[str, str, str | None]]:
    dec = SSEDecoder()
    events = [ev for chunk in chunks for ev in dec.feed(chunk)]
    return [(e.data, e.event, e.id or None) for e in events]


def _reference(chunks: list[bytes]) -> list[tuple[str, str, str | None]]:
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=iter(chunks)
    )
    return [(e.data, e.event or "message", e.id or None) for e in EventSource(response).iter_sse()]


@fuzz
@given(stream=_stream(), data=st.data())
def test_the_sse_reader_agrees_with_httpx_sse_however_the_bytes_are_split(stream, data):
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=12), label="cuts")
    chunks = _split(stream, cuts)
    assert _ours(chunks) == _reference(chunks)


@fuzz
@given(stream=_stream())
def test_the_sse_reader_agrees_with_httpx_sse_byte_by_byte(stream):
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert _ours(chunks) == _reference([stream])


@st.composite
def _provider_stream(draw: st.DrawFn) -> bytes:
    """What providers send, the decoder's fast path: ``data: `` events ended by ``\\n\\n``,
    now and then something else (a comment, an event name, an id, a second data line, a CR)."""
    out: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        lines = [f"data: {draw(_value)}"]
        if draw(st.integers(0, 4)) == 0:
            lines.insert(0, draw(st.one_of(_other, _data)))
        if draw(st.integers(0, 6)) == 0:
            lines.append(draw(_data))
        eol = "\r\n" if draw(st.integers(0, 12)) == 0 else "\n"
        out.append(eol.join(lines) + "\n\n")
    return "".join(out).encode("utf-8")


@fuzz
@given(stream=_provider_stream(), data=st.data())
def test_the_fast_path_agrees_with_httpx_sse_however_the_bytes_are_split(stream, data):
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=6), label="cuts")
    chunks = _split(stream, cuts)
    assert _ours(chunks) == _reference(chunks)
