"""client_address: X-Forwarded-For is believed only from trusted proxies, and only up to the nearest untrusted hop."""

from __future__ import annotations

import pytest

from app.proxy.context import client_address, parse_networks

LOOPBACK = parse_networks(("127.0.0.1",))
PRIVATE = parse_networks(("10.0.0.0/8", "127.0.0.1"))


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    """No TRUSTED_PROXIES: X-Forwarded-For is ignored, whoever sends it."""
    assert client_address("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"


def test_header_from_an_untrusted_peer_is_ignored() -> None:
    """A peer outside TRUSTED_PROXIES cannot choose its logged address."""
    assert client_address("192.0.2.1", "203.0.113.9", LOOPBACK) == "192.0.2.1"


@pytest.mark.parametrize("forwarded_for", [None, "", " , ,"])
def test_trusted_peer_without_a_usable_header_is_the_client(forwarded_for: str | None) -> None:
    """A trusted proxy that forwards no address is itself the client."""
    assert client_address("127.0.0.1", forwarded_for, LOOPBACK) == "127.0.0.1"


def test_trusted_peer_single_hop() -> None:
    """Behind one trusted proxy the client is the address that proxy appended."""
    assert client_address("127.0.0.1", "203.0.113.9", LOOPBACK) == "203.0.113.9"


def test_spoofed_leftmost_value_is_not_believed() -> None:
    """The client's own X-Forwarded-For is kept by the proxy on the left: the nearest untrusted hop wins."""
    assert client_address("127.0.0.1", "198.51.100.7, 203.0.113.9", LOOPBACK) == "203.0.113.9"
    assert client_address("127.0.0.1", "198.51.100.7,203.0.113.9", LOOPBACK) == "203.0.113.9"


def test_chain_of_trusted_proxies_is_walked_from_the_right() -> None:
    """Several trusted proxies (a CIDR) are skipped; the first untrusted address from the right is the client."""
    assert client_address("10.0.0.6", "198.51.100.7, 203.0.113.9, 10.1.2.3, 10.0.0.5", PRIVATE) == "203.0.113.9"


def test_every_hop_trusted_gives_the_leftmost() -> None:
    """When every hop is a trusted address, the origin is the leftmost one (itself trusted, so not a spoof)."""
    assert client_address("10.0.0.6", "10.0.0.1, 10.0.0.5", PRIVATE) == "10.0.0.1"


def test_ipv6_addresses_and_networks() -> None:
    """IPv6 peers and CIDRs are matched like IPv4 ones; mixing families never raises."""
    trusted = parse_networks(("::1", "fd00::/8", "127.0.0.1"))
    assert client_address("::1", "2001:db8::7, fd00::5", trusted) == "2001:db8::7"
    assert client_address("127.0.0.1", "2001:db8::7", trusted) == "2001:db8::7"
    assert client_address("2001:db8::1", "203.0.113.9", trusted) == "2001:db8::1"


def test_missing_or_malformed_peer_is_never_trusted() -> None:
    """A peer that is not an IP address (a unix socket, None) does not unlock the header."""
    assert client_address(None, "203.0.113.9", LOOPBACK) is None
    assert client_address("unix:/run/gunicorn.sock", "203.0.113.9", LOOPBACK) == "unix:/run/gunicorn.sock"


def test_parse_networks_accepts_addresses_and_host_bits() -> None:
    """A bare address is a /32 (or /128); a CIDR with host bits set is accepted as its network."""
    (single,) = parse_networks(("127.0.0.1",))
    assert single.num_addresses == 1
    (network,) = parse_networks(("10.1.2.3/8",))
    assert str(network) == "10.0.0.0/8"
