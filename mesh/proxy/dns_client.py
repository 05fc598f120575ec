"""The Twisted names resolver of DNS ServiceEntries (:mod:`mesh.proxy.dns` watches the names).

Its own module so that ``twisted.names`` is imported only when a sidecar first looks a name up.
"""

from __future__ import annotations

from twisted.names import client, resolve
from twisted.names import hosts as hosts_file


def make_resolver(reactor, server=None, resolv_conf=b"/etc/resolv.conf", hosts=b"/etc/hosts"):
    """The resolver of DNS ServiceEntries: ``hosts`` first, then ``server`` (an ``(ip, port)``
    pair: ``mesh-proxy --dns-server``) or, without it, the name servers of ``resolv_conf``.

    No cache: each name is looked up once per TTL anyway (:class:`mesh.proxy.dns.DnsEndpoints`).
    """
    servers = [server] if server else None
    upstream = _OneSocketResolver(resolv=None if server else resolv_conf, servers=servers, reactor=reactor)
    return resolve.ResolverChain([hosts_file.Resolver(hosts), upstream])


class _OneSocketResolver(client.Resolver):
    """Twisted's DNS client sending its UDP queries from one socket (on a random port), as
    c-ares, Envoy's resolver, does, rather than from a new socket per query, each of which Twisted
    logs three lines for; queries are told apart by their random ids."""

    _udp = None

    def _query(self, *args):
        if self._udp is None or self._udp.transport is None:
            self._udp = self._connectedProtocol(interface="::" if ":" in args[0][0] else "")
            self._udp.noisy = False
        return self._udp.query(*args)
