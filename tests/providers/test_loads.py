"""The provider client's JSON decoding (msgspec first, json for what msgspec refuses) gives
exactly what ``json.loads`` gives, or fails where it fails."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from exai.providers.client import loads

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
_odd = st.sampled_from(
    ['"\\ud800"', "NaN", "-Infinity", "1e400", "[1,]", '{"a":1}x', '{"a":1,"a":2}', " 1 ", ""]
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _outcome(f: Any, text: str | bytes) -> Any:
    try:
        return ("ok", f(text))
    except ValueError:
        return ("error", None)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_json.map(json.dumps), _odd, st.text(max_size=20)), st.booleans())
def test_loads_gives_what_json_loads_gives(text: str, as_bytes: bool) -> None:
    data: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
    ours, theirs = _outcome(loads, data), _outcome(json.loads, data)
    assert ours[0] == theirs[0]
    assert _same(ours[1], theirs[1])
