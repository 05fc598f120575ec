"""The control plane's /resources answers loopback clients only (mesh.control.admin_views)."""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from mesh.control.admin_views import _loopback


@pytest.mark.parametrize("address, allowed", [
    (IPv4Address("TCP", "127.0.0.1", 4000), True),
    (IPv4Address("TCP", "127.0.0.2", 4000), True),
    (IPv6Address("TCP", "::1", 4000), True),
    (IPv4Address("TCP", "10.0.0.7", 4000), False),
    (IPv6Address("TCP", "fe80::1", 4000), False),
    (UNIXAddress(b"/tmp/socket"), False),
])
def test_only_loopback_clients_read_the_resources(address, allowed):
    assert _loopback(address) is allowed
