"""Resolving the host names of DNS ServiceEntries, off the request path.

A cluster whose :attr:`~mesh.config.tables.ClusterSpec.resolution` is DNS or
DNS_ROUND_ROBIN may have endpoints whose address is a host name.
:class:`DnsEndpoints` resolves each name with Twisted names (asynchronously,
never blocking the reactor) and :meth:`DnsEndpoints.expand` replaces the name
by what it resolved to: every address for DNS (Envoy's STRICT_DNS), the first
address for DNS_ROUND_ROBIN (Envoy's LOGICAL_DNS).  Requests only ever see the
expanded clusters; resolution never runs per request.

- **Refresh**: each name is looked up again when its answer's TTL runs out
  (Istio sets Envoy's ``respect_dns_ttl``), with the TTL clamped to
  :data:`MIN_REFRESH` .. :data:`MAX_REFRESH` seconds.  When the addresses
  change, ``on_change`` is called and the proxy rebuilds its clusters in place
  (:meth:`mesh.proxy.runtime.ProxyRuntime.refresh_endpoints`): endpoints that
  stay keep their pools and in-flight requests.
- **Failure** (timeout, server error): the last known addresses stay in use,
  as Envoy keeps them; one warning is logged when a name starts failing and
  one line when it resolves again; it is retried with exponential backoff
  (:data:`MIN_REFRESH` doubling up to :data:`MAX_BACKOFF`).
- **No such name** (NXDOMAIN) or no A record is an answer, not a failure: a DNS
  cluster then has no endpoints for that name (Envoy's STRICT_DNS); a
  DNS_ROUND_ROBIN one keeps its last address (Envoy's LOGICAL_DNS).  A
  cluster without any address answers 503 ``UH`` saying why
  (:meth:`DnsEndpoints.empty_reasons`).

Only IPv4 (A records) are looked up, as Istio's default ``V4_ONLY`` lookup family.

Twisted names is imported with the resolver (:mod:`mesh.proxy.dns_client`), at the first lookup:
a sidecar without a DNS ServiceEntry never loads it (about 0.6 MiB of RSS).  This module sees only
the resolver's ``lookup(name)``: ``(addresses, ttl)``, or :class:`LookupFailed`.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.logger import Logger

from mesh.config import hosts as hostnames

#: Shortest and longest time between two lookups of a name that resolved (seconds; its TTL clamped).
MIN_REFRESH = 1.0
MAX_REFRESH = 300.0
#: Longest time between two lookups of a name that keeps failing (seconds).
MAX_BACKOFF = 30.0

log = Logger()


class LookupFailed(Exception):
    """A lookup got no answer (timeout, server failure, refusal); the argument says why."""


class _Name:
    """What one host name resolved to, and when it is looked up next."""

    __slots__ = ("name", "addresses", "first", "ttl", "error", "failures", "call")

    def __init__(self, name):
        self.name = name
        self.addresses = None  # tuple of the last answer; None: never answered
        self.first = None  # the first address of the last answer that had one (DNS_ROUND_ROBIN)
        self.ttl = None
        self.error = None  # why the last lookup failed; None when it succeeded
        self.failures = 0  # consecutive failed lookups
        self.call = None  # the delayed call of the next lookup

    def for_mode(self, resolution) -> tuple:
        """The addresses a cluster with ``resolution`` uses for this name."""
        if resolution == "DNS_ROUND_ROBIN":
            return (self.first,) if self.first else ()
        return self.addresses or ()

    def why_empty(self) -> str:
        """Why this name gives no address (for the 503's message)."""
        if self.addresses is None:
            reason = f"lookup failed: {self.error}" if self.error else "the first lookup is in progress"
            return f"DNS name {self.name} has not resolved yet ({reason})"
        return f"DNS name {self.name} resolved to no address (no such name, or no A record)"

    def describe(self, now) -> dict:
        """A JSON-ready view for the admin ``/clusters`` page."""
        return {"addresses": list(self.addresses or ()), "ttl": self.ttl, "error": self.error,
                "failures": self.failures,
                "next_lookup_in_s": round(max(0.0, self.call.getTime() - now), 3)
                if self.call is not None and self.call.active() else None}


class DnsEndpoints:
    """Keeps the host-name endpoints of DNS clusters resolved.

    ``resolver_factory()`` makes the resolver (a
    :class:`mesh.proxy.dns_client.AddressResolver`); it is called on the first
    name, so a proxy without DNS ServiceEntries never reads resolv.conf.
    ``on_change()`` is called when what a name resolves to changes.
    """

    def __init__(self, reactor, resolver_factory, on_change):
        self.reactor = reactor
        self._resolver_factory = resolver_factory
        self._resolver = None
        self._on_change = on_change
        self._names = {}
        self._cluster_names = {}  # cluster name -> the host names of its endpoints

    def expand(self, specs: dict) -> dict:
        """``specs`` (name -> ClusterSpec) with host-name endpoints replaced by their addresses.

        Starts watching names seen for the first time and stops watching names no cluster has any more.
        """
        expanded, cluster_names = {}, {}
        for name, spec in specs.items():
            if spec.resolution == "STATIC":
                expanded[name] = spec
                continue
            endpoints, names = [], []
            for endpoint in spec.endpoints:
                if hostnames.is_ip(endpoint.address):
                    endpoints.append(endpoint)
                    continue
                names.append(endpoint.address)
                state = self._names.get(endpoint.address) or self._watch(endpoint.address)
                endpoints.extend(replace(endpoint, address=address) for address in state.for_mode(spec.resolution))
            expanded[name] = replace(spec, endpoints=tuple(endpoints))
            if names:
                cluster_names[name] = tuple(names)
        self._cluster_names = cluster_names
        self._forget({name for names in cluster_names.values() for name in names})
        return expanded

    def empty_reasons(self, clusters: dict) -> dict:
        """Cluster name -> ``(hint, details)`` for the expanded DNS ``clusters`` without endpoints.

        The hint says why (for the 503's message); the details, the access log's, are Envoy's
        ``no_healthy_upstream`` with ``{dns_unresolved}`` (a name never answered) or
        ``{dns_no_address}`` (the names resolved to nothing).
        """
        reasons = {}
        for name, spec in clusters.items():
            if spec.endpoints or name not in self._cluster_names:
                continue
            states = [self._names[host] for host in self._cluster_names[name]]
            unresolved = any(state.addresses is None for state in states)
            reasons[name] = ("; ".join(state.why_empty() for state in states),
                             "no_healthy_upstream{dns_unresolved}" if unresolved
                             else "no_healthy_upstream{dns_no_address}")
        return reasons

    def describe(self, cluster_name) -> dict | None:
        """The DNS names of a cluster and their state (admin ``/clusters``), or None if it has none."""
        names = self._cluster_names.get(cluster_name)
        if names is None:
            return None
        now = self.reactor.seconds()
        return {name: self._names[name].describe(now) for name in names}

    def warming(self) -> list:
        """The names whose first lookup has not finished yet (Envoy's cluster warming)."""
        return sorted(name for name, state in self._names.items() if state.addresses is None and state.error is None)

    def stop(self) -> None:
        """Stop every pending lookup timer (the proxy is stopping)."""
        self._forget(())

    # -- lookups ----------------------------------------------------------------------

    def _watch(self, name) -> _Name:
        """Start watching ``name``: its first lookup starts from the reactor, never inside
        :meth:`expand` (an answer can come at once, and its ``on_change`` expands again)."""
        state = self._names[name] = _Name(name)
        state.call = self.reactor.callLater(0, self._lookup, state)
        return state

    def _forget(self, keep) -> None:
        for name in [name for name in self._names if name not in keep]:
            state = self._names.pop(name)
            if state.call is not None and state.call.active():
                state.call.cancel()

    def _lookup(self, state: _Name) -> None:
        state.call = None
        if self._resolver is None:
            self._resolver = self._resolver_factory()
        deferred = self._resolver.lookup(state.name)
        deferred.addCallbacks(self._answered, self._failed, callbackArgs=(state,), errbackArgs=(state,))

    def _answered(self, answer, state: _Name) -> None:
        addresses, ttl = answer
        self._settled(state, addresses, MIN_REFRESH if ttl is None else ttl)

    def _failed(self, failure, state: _Name) -> None:
        if self._names.get(state.name) is not state:
            return
        state.failures += 1
        state.error = failure.getErrorMessage() or failure.type.__name__
        delay = min(MAX_BACKOFF, MIN_REFRESH * 2 ** (state.failures - 1))
        if state.failures == 1:
            log.warn("DNS lookup of {name} failed: {error}; keeping its last known addresses {addresses}, "
                     "retrying with backoff", name=state.name, error=state.error,
                     addresses=list(state.addresses or ()), log_system="dns")
            if not state.addresses:
                self._on_change()  # the 503's reason now names the error
        state.call = self.reactor.callLater(delay, self._lookup, state)

    def _settled(self, state: _Name, addresses, ttl) -> None:
        if self._names.get(state.name) is not state:
            return  # no cluster uses the name any more
        if state.failures:
            log.info("DNS lookup of {name} succeeds again after {failures} failure(s): {addresses}",
                     name=state.name, failures=state.failures, addresses=list(addresses), log_system="dns")
        changed = addresses != state.addresses
        state.addresses, state.ttl, state.error, state.failures = addresses, ttl, None, 0
        if addresses:
            state.first = addresses[0]
        state.call = self.reactor.callLater(min(MAX_REFRESH, max(MIN_REFRESH, ttl)), self._lookup, state)
        if changed:
            self._on_change()

