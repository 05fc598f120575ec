"""mesh.proxy.dns with a real Twisted names resolver reading a hosts file (answers at once), on a Clock.

The DNS-server cases (TTL refresh, failures, recovery) are in tests/integration/test_egress_dns.py.
"""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import error
from twisted.python.failure import Failure

from mesh.config.tables import ClusterSpec, EndpointSpec
from mesh.proxy.dns import DnsEndpoints, LookupFailed
from mesh.proxy.dns_client import _failure, make_resolver


def spec(name, *addresses, resolution="DNS"):
    return ClusterSpec(name=name, service=name, port=80, resolution=resolution,
                       endpoints=tuple(EndpointSpec(address, 8080) for address in addresses))


def watcher(tmp_path, hosts_text, refresh):
    """A DnsEndpoints on a Clock whose names come from a hosts file; ``refresh()`` plays the proxy's
    ProxyRuntime.refresh_endpoints (it expands the config in force again)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(hosts_text)
    clock = Clock()
    dns = DnsEndpoints(clock, lambda: make_resolver(clock, ("127.0.0.1", 1), hosts=str(hosts).encode()),
                       lambda: refresh(dns))
    return clock, dns


def addresses(expanded, name):
    return [endpoint.address for endpoint in expanded[name].endpoints]


def test_strict_and_logical_dns_and_ips_as_they_are(tmp_path):
    in_force = {"strict": spec("strict", "two.test", "10.0.0.9"),
                "logical": spec("logical", "two.test", resolution="DNS_ROUND_ROBIN"),
                "static": spec("static", "10.0.0.7", resolution="STATIC")}
    clock, dns = watcher(tmp_path, "10.0.0.1 two.test\n10.0.0.2 two.test\n", lambda dns: dns.expand(in_force))
    first = dns.expand(in_force)
    assert addresses(first, "strict") == ["10.0.0.9"]  # the name is looked up off this call
    assert dns.warming() == ["two.test"]
    assert dns.empty_reasons(first)["logical"][1] == "no_healthy_upstream{dns_unresolved}"
    clock.advance(0)
    expanded = dns.expand(in_force)
    assert dns.warming() == []
    assert addresses(expanded, "strict") == ["10.0.0.1", "10.0.0.2", "10.0.0.9"]
    assert addresses(expanded, "logical") == ["10.0.0.1"]
    assert expanded["static"] is in_force["static"]
    assert dns.describe("strict")["two.test"]["addresses"] == ["10.0.0.1", "10.0.0.2"]


def test_a_name_added_by_a_new_config_stays_watched(tmp_path):
    """The answer to a new name may come at once (hosts file): the refresh it triggers, which expands
    the config still in force, must not make the new config forget the name."""
    old = {"a": spec("a", "a.test")}
    new = {"a": spec("a", "a.test"), "b": spec("b", "b.test")}
    in_force = {"config": old}
    clock, dns = watcher(tmp_path, "10.0.0.1 a.test\n10.0.0.2 b.test\n",
                         lambda dns: dns.expand(in_force["config"]))
    dns.expand(old)
    clock.advance(0)
    dns.expand(new)
    in_force["config"] = new
    clock.advance(0)
    state = dns.describe("b")["b.test"]
    assert (state["addresses"], state["next_lookup_in_s"]) == (["10.0.0.2"], 300.0)
    assert addresses(dns.expand(new), "b") == ["10.0.0.2"]



def test_failed_lookups_are_named_and_nxdomain_is_an_answer():
    """What the 503's message and /clusters say for each way a lookup can fail."""
    assert _failure(Failure(error.DNSNameError("x"))) == ((), None)
    for exc, reason in [(error.DNSQueryTimeoutError(0), "timed out (no answer from the DNS server)"),
                        (defer.TimeoutError(), "timed out (no answer from the DNS server)"),
                        (error.DNSServerError("x"), "server failure (SERVFAIL)"),
                        (error.DNSQueryRefusedError("x"), "query refused"),
                        (OSError("network is unreachable"), "network is unreachable")]:
        with pytest.raises(LookupFailed, match=re.escape(reason)):
            _failure(Failure(exc))
