"""The client's address behind a load balancer (``X-Forwarded-For`` from trusted proxies only).

Behind HAProxy every connection comes from the balancer's address, so per-address limits would
count the balancer, not the clients. HAProxy (``option forwardfor``) appends the address it saw
to ``X-Forwarded-For``; exai believes that header only when the TCP peer is a proxy it was told
to trust (``EXAI_TRUSTED_PROXIES``), and then takes the **rightmost address that is not a trusted
proxy**: a client can put anything it likes at the left of the header, but not at its right,
where each trusted hop appended what it saw. Sans-IO: pure functions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["TrustedProxies", "client_address", "parse_trusted_proxies"]

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TrustedProxies = tuple[IpNetwork, ...]
#: addresses read from the header at most (a longer header is read from its right end)
MAX_HOPS = 32


def parse_trusted_proxies(values: Iterable[str]) -> TrustedProxies:
    """``("10.0.0.0/8", "127.0.0.1")`` → networks.

    Raises:
        ValueError: an entry is not an address or a network (naming it).
    """
    out = []
    for raw in values:
        text = raw.strip()
        if not text:
            continue
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an IP address or network") from exc
    return tuple(out)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: TrustedProxies) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in nets)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: TrustedProxies) -> str:
    """The address a connection stands for.

    Args:
        peer: the TCP peer's address.
        forwarded_for: the values of every ``X-Forwarded-For`` header, in order.
        trusted: the proxies whose header is believed.

    Returns:
        ``peer`` unless it is a trusted proxy; then the rightmost address of the header that is
        not a trusted proxy — or the leftmost valid one when every hop is trusted. An entry that
        is not an address (``unknown``, garbage) ends the walk: the last trusted hop stands for
        the client.
    """
    peer_addr = _address(peer)
    if not trusted or peer_addr is None or not _trusted(peer_addr, trusted):
        return peer
    hops = [h for value in forwarded_for for h in value.split(",")][-MAX_HOPS:]
    client = peer_addr
    for hop in reversed(hops):
        addr = _address(hop)
        if addr is None:
            break
        client = addr
        if not _trusted(addr, trusted):
            break
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        client = client.ipv4_mapped
    return str(client)
