"""The Twisted names resolver of DNS ServiceEntries (:mod:`mesh.proxy.dns` watches the names).

Its own module so that ``twisted.names`` is imported only when a sidecar first looks a name up.
Everything that knows Twisted names is here: :mod:`mesh.proxy.dns` sees only
:meth:`AddressResolver.lookup`, its answers and :class:`mesh.proxy.dns.LookupFailed`.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import client, dns, error, resolve
from twisted.names import hosts as hosts_file

from mesh.proxy.dns import LookupFailed

#: Twisted names' per-query retransmission timeouts: give up on a lookup after 3 s.
QUERY_TIMEOUT = (1, 2)


def make_resolver(reactor, server=None, resolv_conf=b"/etc/resolv.conf", hosts=b"/etc/hosts"):
    """The resolver of DNS ServiceEntries: ``hosts`` first, then ``server`` (an ``(ip, port)``
    pair: ``mesh-proxy --dns-server``) or, without it, the name servers of ``resolv_conf``.

    No cache: each name is looked up once per TTL anyway (:class:`mesh.proxy.dns.DnsEndpoints`).
    """
    servers = [server] if server else None
    upstream = _OneSocketResolver(resolv=None if server else resolv_conf, servers=servers, reactor=reactor)
    return AddressResolver(resolve.ResolverChain([hosts_file.Resolver(hosts), upstream]))


class AddressResolver:
    """Looks up the IPv4 addresses of a host name (A records: Istio's default ``V4_ONLY``)."""

    def __init__(self, resolver):
        self._resolver = resolver

    def lookup(self, name: str) -> defer.Deferred:
        """Fires with ``(addresses, ttl)``: the A records' addresses in answer order without
        repeats, and the smallest TTL of the answer's records (None when it has none).  No such
        name (NXDOMAIN) is an answer too: ``((), None)``.  Any other outcome fails with
        :class:`~mesh.proxy.dns.LookupFailed` saying why."""
        deferred = self._resolver.lookupAddress(name, timeout=QUERY_TIMEOUT)
        return deferred.addCallbacks(_answer, _failure)


def _answer(result) -> tuple:
    answers = result[0]
    addresses = tuple(dict.fromkeys(record.payload.dottedQuad() for record in answers if record.type == dns.A))
    return addresses, min((record.ttl for record in answers), default=None)


def _failure(failure):
    if failure.check(error.DNSNameError):
        return (), None
    if failure.check(defer.TimeoutError):  # DNSQueryTimeoutError is one too
        raise LookupFailed("timed out (no answer from the DNS server)")
    if failure.check(error.DNSServerError):
        raise LookupFailed("server failure (SERVFAIL)")
    if failure.check(error.DNSQueryRefusedError):
        raise LookupFailed("query refused")
    raise LookupFailed(failure.getErrorMessage() or failure.type.__name__)


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
