"""Where a request's text is not valid Unicode (:func:`exai.providers.types.unencodable_field`).

Every request is walked once for lone surrogates before anything is spent on it; the walk that
names the field runs only once a bad string is known to be there (issue 18). Both walks look at
the same strings in the same order, under the same bound.
"""

from __future__ import annotations

from exai.providers.types import _MAX_STRINGS, unencodable_field

BAD = "a \ud800 b"


def test_clean_messages_have_no_unencodable_field() -> None:
    messages = [
        {"role": "system", "content": "hi"},
        {"role": "user", "content": "héllo — 你好", "names": ["x", {"é": "ü"}]},
    ]
    assert unencodable_field(messages) is None
    assert unencodable_field(iter(messages)) is None  # (any iterable, walked once)


def test_the_first_bad_string_in_message_order_is_named_with_its_position() -> None:
    messages = [
        {"role": "user", "content": "fine"},
        {"role": "user", "content": "ok", "parts": ["x", BAD]},
        {"role": "user", "content": BAD},
    ]
    assert unencodable_field(messages) == ("messages[1].parts[1]", 2)


def test_a_bad_key_is_named_as_a_key() -> None:
    assert unencodable_field([{"role": "user", BAD: "x"}]) == ("messages[0] (a key)", 2)


def test_a_bad_string_past_the_bound_is_not_looked_at_and_one_before_it_is() -> None:
    filler = ["x"] * (_MAX_STRINGS + 10)
    assert unencodable_field([{"content": filler}, {"content": BAD}]) is None
    assert unencodable_field([{"content": BAD}, {"content": filler}]) == ("messages[0].content", 2)
