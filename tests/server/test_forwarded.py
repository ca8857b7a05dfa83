"""The client's address behind a balancer: X-Forwarded-For believed from trusted proxies only."""

from __future__ import annotations

import pytest

from exai.server.forwarded import client_address, parse_trusted_proxies

LB = parse_trusted_proxies(["127.0.0.1", "10.0.0.0/8"])


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9"], ()) == "127.0.0.1"


def test_a_peer_that_is_not_trusted_cannot_choose_its_address() -> None:
    assert client_address("198.51.100.7", ["203.0.113.9"], LB) == "198.51.100.7"


def test_behind_a_trusted_balancer_the_address_it_appended_is_the_client() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9"], LB) == "203.0.113.9"


def test_what_a_client_puts_at_the_left_of_the_header_is_ignored() -> None:
    # the client sent "X-Forwarded-For: 1.2.3.4"; the balancer appended the real address
    assert client_address("127.0.0.1", ["1.2.3.4, 203.0.113.9"], LB) == "203.0.113.9"
    assert client_address("127.0.0.1", ["1.2.3.4", "203.0.113.9"], LB) == "203.0.113.9"


def test_trusted_hops_are_skipped_from_the_right() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9, 10.1.2.3"], LB) == "203.0.113.9"
    # every hop trusted: the leftmost stands for the client
    assert client_address("127.0.0.1", ["10.9.9.9, 10.1.2.3"], LB) == "10.9.9.9"


def test_garbage_in_the_header_ends_the_walk_at_the_last_trusted_hop() -> None:
    assert client_address("127.0.0.1", ["unknown"], LB) == "127.0.0.1"
    assert client_address("127.0.0.1", ["203.0.113.9, bogus, 10.1.2.3"], LB) == "10.1.2.3"
    assert client_address("127.0.0.1", [""], LB) == "127.0.0.1"


def test_ports_and_ipv6_forms_are_understood() -> None:
    assert client_address("127.0.0.1", ["203.0.113.9:5555"], LB) == "203.0.113.9"
    assert client_address("127.0.0.1", ["[2001:db8::1]:443"], LB) == "2001:db8::1"
    assert client_address("::ffff:127.0.0.1", ["203.0.113.9"], LB) == "203.0.113.9"


def test_a_huge_header_is_read_from_its_right_end_only() -> None:
    header = ", ".join(["1.1.1.1"] * 100_000 + ["203.0.113.9"])
    assert client_address("127.0.0.1", [header], LB) == "203.0.113.9"


def test_a_bad_trusted_proxy_entry_is_named() -> None:
    with pytest.raises(ValueError, match="'not-an-ip'"):
        parse_trusted_proxies(["127.0.0.1", "not-an-ip"])
