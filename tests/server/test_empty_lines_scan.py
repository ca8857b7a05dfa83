"""How many bytes of empty lines a request begins with (:func:`exai.server.http11._empty_lines`,
read by :func:`~exai.server.http11.skip_empty_lines` before a request line).

c958ff9 counted them with the regular expression ``(?:\\r?\\n)*``: 9 µs per KiB of CRLF and 16
of bare LF (``timeit`` on this VM), so a flood of empty lines up to the head's 64 KiB was the
cheapest way to make the listeners work. Attacked with 300 connections to ``exai serve``'s admin
port, each sending 80,000 bytes and kept open (the daemon's CPU time from ``/proc/<pid>/stat``,
a ``/readyz`` sent right after): bare LF cost 2.05 s of CPU and the ``/readyz`` was answered
after 1.96 s; CRLF 0.97 s and 0.88 s; the same bytes as one over-long header 0.15 s and 0.08 s.
Counted with ``bytes.lstrip`` and ``find`` (≈ 3 µs per KiB): LF 0.27 s and 0.17 s, CRLF 0.24 s
and 0.17 s. No test here measures time: this one holds the count to the regular expression's,
on every mix of CR, LF and a request line's first bytes.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from exai.server.http11 import _empty_lines

_REGEX = re.compile(rb"(?:\r?\n)*")


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"G", b" "]), max_size=40))
def test_the_count_of_empty_lines_is_the_regular_expressions(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert _empty_lines(data) == _REGEX.match(data).end()  # type: ignore[union-attr]


def test_empty_lines_at_the_heads_bound() -> None:
    for unit in (b"\r\n", b"\n"):
        flood = unit * (65536 // len(unit))
        assert _empty_lines(flood) == len(flood)
        assert _empty_lines(flood + b"\r") == len(flood)  # (its LF may still come)
        assert _empty_lines(flood + b"\r\rGET") == len(flood)
        assert _empty_lines(flood + b"GET / HTTP/1.1\r\n") == len(flood)
    assert _empty_lines(b"") == 0
    assert _empty_lines(b"\r") == 0
    assert _empty_lines(b"\r\r\n") == 0
    assert _empty_lines(b"GET / HTTP/1.1\r\n\r\n") == 0
