"""Where a request's text is not valid Unicode (:func:`exai.providers.types.unencodable_field`).

Every request is walked once for lone surrogates before anything is spent on it; the field's
name is spelt out only once a bad string is found (issue 18): one walk, in message order, under
one bound.
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


def test_containers_count_against_the_bound_and_nesting_needs_no_recursion() -> None:
    deep: object = BAD
    for _ in range(5_000):  # far deeper than the interpreter's recursion limit
        deep = [deep]
    field, pos = unencodable_field([{"content": deep}]) or ("", -1)
    assert field == "messages[0].content" + "[0]" * 5_000 and pos == 2
    # every container counts: under a message (one) and 99,999 lists the string is the 100,001st
    nested: object = BAD
    for _ in range(_MAX_STRINGS - 1):
        nested = [nested]
    assert unencodable_field([{"c": nested}]) is None
    assert unencodable_field([nested]) is not None


def test_a_bad_string_after_a_fine_non_ascii_one_and_a_nested_dict_is_named() -> None:
    messages = [{"a": ["héllo", {"é": ["x", "ü"]}, ("ok", BAD)]}]
    assert unencodable_field(messages) == ("messages[0].a[2][1]", 2)
