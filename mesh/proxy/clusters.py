"""Live upstream state: endpoints with health, load and connection pools.

:class:`mesh.config.tables.ClusterSpec` is the immutable description of a
cluster; :class:`Cluster` and :class:`Endpoint` here carry what changes while
traffic flows.  :class:`ClusterManager` rebuilds clusters on every config swap
but keeps each endpoint's state (pool, active requests, ejection) keyed by
address, port and expected identity, so a reload does not drop warm connections or forget that an
endpoint is down.
"""

from __future__ import annotations

from mesh.config.tables import UPSTREAM_CLIENT, UPSTREAM_H2
from mesh.proxy.circuit import CircuitBreaker
from mesh.proxy.pool import ConnectionPool, PoolSettings
from mesh.proxy.retry import RetryBudget


class Endpoint:
    """One upstream address, shared by every cluster that contains it with the same spec and connection settings.

    ``active_requests`` counts tries in flight; ``ejected_until`` is the
    monotonic time until which outlier detection keeps the endpoint out of
    rotation (after it, the time the last ejection ended); ``ejections`` counts
    them all, and ``ejection_multiplier`` is what :mod:`mesh.proxy.outlier`
    multiplies the base ejection time by (Envoy's ejection time backoff: it
    grows with each ejection and decays while the endpoint stays healthy);
    ``pool`` holds its idle keep-alive connections.
    """

    __slots__ = ("spec", "address", "port", "host_port", "pool", "active_requests",
                 "ejected_until", "ejections", "ejection_multiplier", "consecutive_5xx", "consecutive_gateway",
                 "consecutive_connect_failures", "total_requests", "total_failures", "state")

    #: bumped whenever any endpoint is ejected, so clusters refresh their
    #: cached healthy sets (an endpoint can belong to several clusters)
    health_epoch = 0

    def __init__(self, spec, pool: ConnectionPool):
        self.spec = spec
        self.address = spec.address
        self.port = spec.port
        self.host_port = f"{spec.address}:{spec.port}"
        self.pool = pool
        self.active_requests = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.ejection_multiplier = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_connect_failures = 0
        self.total_requests = 0
        self.total_failures = 0
        #: free for balancer plugins (e.g. a latency average)
        self.state = {}

    def try_started(self) -> None:
        """A try is sent to this endpoint: the only place its request counters go up."""
        self.active_requests += 1
        self.total_requests += 1

    def try_ended(self) -> None:
        """A try started with :meth:`try_started` has ended (whatever the outcome)."""
        self.active_requests -= 1

    def eject(self, until: float) -> None:
        """Keep this endpoint out of rotation until monotonic time ``until``."""
        self.ejections += 1
        self.ejected_until = until
        Endpoint.health_epoch += 1

    def update_spec(self, spec) -> None:
        """Adopt a changed spec (labels, weight) keeping live state.

        The expected identity is part of :attr:`EndpointSpec.key`, so it never
        changes under a live endpoint and its pooled, verified connections.
        """
        self.spec = spec

    def describe(self, now: float) -> dict:
        """A JSON-ready view for the admin ``/clusters`` page."""
        return {
            "address": self.host_port,
            "healthy": self.ejected_until <= now,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "active_requests": self.active_requests,
            "total_requests": self.total_requests,
            "total_failures": self.total_failures,
            "idle_connections": self.pool.idle_count(),  # HTTP/2 ones: connections without streams
            "open_connections": self.pool.open_count(),
            "identity": self.spec.identity,
            "labels": dict(self.spec.labels),
            "weight": self.spec.weight,
        }


class Cluster:
    """A set of endpoints plus the policy for choosing among them.

    ``spec`` is the :class:`mesh.config.tables.ClusterSpec`; ``endpoints`` the
    live :class:`Endpoint` objects.  ``state`` is free for balancer plugins
    (the round-robin cursor lives there); it is carried over when a config
    swap rebuilds the cluster of the same name, so a plugin must check what it
    cached against the endpoints it is given, as the built-in ones do.  The
    spec's ``upstream_protocol`` becomes two flags the exchange tests per
    try: ``h2_always`` (every try speaks HTTP/2: the endpoint's ``pool.h2``)
    and ``h2_follows_client`` (an HTTP/2 request goes HTTP/2 to every
    endpoint; without it only to mTLS endpoints, the sidecars, which may
    still choose HTTP/1.1 by ALPN).
    ``breaker`` is its :class:`mesh.proxy.circuit.CircuitBreaker` (None: no limits),
    ``retry_budget`` its :class:`mesh.proxy.retry.RetryBudget`.  When the cluster has no endpoints,
    ``empty_hint`` says what to check (in the 503 ``UH``'s message) and ``empty_details`` is the
    access log's response code details (:mod:`mesh.proxy.dns` gives DNS clusters theirs).
    """

    __slots__ = ("spec", "name", "endpoints", "state", "h2_always", "h2_follows_client", "breaker",
                 "retry_budget", "empty_hint", "empty_details", "_healthy", "_healthy_until", "_epoch",
                 "_by_address")

    def __init__(self, spec, endpoints, breaker=None, retry_budget=None, empty_reason=None, state=None):
        self.spec = spec
        self.empty_hint, self.empty_details = empty_reason or (
            "check the ServiceEntry endpoints and DestinationRule subset labels", "no_healthy_upstream")
        self.breaker = breaker
        self.retry_budget = retry_budget if retry_budget is not None else RetryBudget()
        self.name = spec.name
        self.h2_always = spec.upstream_protocol == UPSTREAM_H2
        self.h2_follows_client = spec.upstream_protocol == UPSTREAM_CLIENT
        self.endpoints = tuple(endpoints)
        self.state = {} if state is None else state
        self._healthy = self.endpoints
        self._healthy_until = 0.0
        self._epoch = -1
        self._by_address = None

    def endpoint_at(self, address: str):
        """The endpoint at ``address`` (the first, if several ports), or None: how a connection dialled at
        a headless Service's pod reaches that pod (Envoy's ``ORIGINAL_DST``).  One dict lookup; the
        index is built on first use (a config swap builds a new cluster)."""
        index = self._by_address
        if index is None:
            index = self._by_address = {}
            for endpoint in self.endpoints:
                index.setdefault(endpoint.address, endpoint)
        return index.get(address)

    def healthy_endpoints(self, now: float):
        """Endpoints not ejected at ``now``; all of them if every one is ejected.

        Like Envoy's panic threshold: when nothing is healthy, trying an
        ejected endpoint beats failing every request.  The answer is cached
        until the next ejection starts or ends.
        """
        if now < self._healthy_until and self._epoch == Endpoint.health_epoch:
            return self._healthy
        self._epoch = Endpoint.health_epoch
        healthy = []
        next_change = float("inf")
        for endpoint in self.endpoints:
            until = endpoint.ejected_until
            if until <= now:
                healthy.append(endpoint)
            elif until < next_change:
                next_change = until
        self._healthy = tuple(healthy) if healthy else self.endpoints
        self._healthy_until = next_change
        return self._healthy


class ClusterManager:
    """Builds live clusters from a config, reusing endpoint state by address.

    ``pool_factory(spec, cluster_spec)`` makes the :class:`ConnectionPool` for a
    new endpoint.  A cluster with circuit-breaking limits keeps its
    :class:`~mesh.proxy.circuit.CircuitBreaker` (its counts) across updates, and
    every cluster its :class:`~mesh.proxy.retry.RetryBudget` and its balancer
    ``state`` (so round robin goes on where it was, not at the first endpoint).
    """

    def __init__(self, pool_factory):
        self._pool_factory = pool_factory
        self._endpoints = {}
        self.clusters = {}

    def update(self, cluster_specs: dict, empty_reasons=None) -> dict:
        """Build clusters for ``cluster_specs`` and return them (name -> Cluster).

        ``empty_reasons`` maps the names of clusters without endpoints to ``(hint, details)``
        (:attr:`Cluster.empty_hint`, :attr:`Cluster.empty_details`).

        Clusters in which an address has the same :class:`EndpointSpec` and the
        same connection settings (:class:`~mesh.proxy.pool.PoolSettings`: a
        service and its subsets, unless a subset sets its own ``connectionPool``)
        share one :class:`Endpoint`.  The same address with another weight or
        labels in another cluster gets an Endpoint of its own: a weight belongs
        to one spec, and sharing the object gave every cluster the weight of the
        last one built; so does one with other connection settings, whose pool
        must follow them.  Across updates an endpoint is kept by spec and
        settings or, if its weight, labels or settings changed, by
        :attr:`EndpointSpec.key`, so its pool and health survive (the pool
        takes the new settings: :meth:`~mesh.proxy.pool.ConnectionPool.configure`).  Endpoints
        that no cluster uses any more have their idle connections closed.
        """
        previous = self._endpoints
        settings = {name: PoolSettings.of(spec) for name, spec in cluster_specs.items()}
        wanted = {(endpoint_spec, settings[name])
                  for name, spec in cluster_specs.items() for endpoint_spec in spec.endpoints}
        changed = {}  # EndpointSpec.key -> previous endpoints no longer wanted as they were, to adopt
        for kept_as, endpoint in previous.items():
            if kept_as not in wanted:
                changed.setdefault(endpoint.spec.key, []).append(endpoint)
        endpoints = {}
        clusters = {}
        for name, spec in cluster_specs.items():
            live = []
            pool_settings = settings[name]
            for endpoint_spec in spec.endpoints:
                wanted_as = (endpoint_spec, pool_settings)
                endpoint = endpoints.get(wanted_as) or previous.get(wanted_as)
                if endpoint is None:
                    candidates = changed.get(endpoint_spec.key)
                    if candidates:
                        endpoint = candidates.pop()
                        endpoint.update_spec(endpoint_spec)
                        endpoint.pool.configure(pool_settings)
                    else:
                        endpoint = Endpoint(endpoint_spec, self._pool_factory(endpoint_spec, spec))
                endpoints[wanted_as] = endpoint
                live.append(endpoint)
            kept = self.clusters.get(name)
            clusters[name] = Cluster(spec, live, self._breaker(name, spec.limits),
                                     kept.retry_budget if kept is not None else None,
                                     empty_reasons.get(name) if empty_reasons else None,
                                     kept.state if kept is not None else None)
        for candidates in changed.values():
            for endpoint in candidates:
                endpoint.pool.close_idle()
        self._endpoints = endpoints
        self.clusters = clusters
        return clusters

    def _breaker(self, name, limits):
        """The cluster's breaker with ``limits`` (its previous one, counts kept), or None without limits."""
        if limits is None:
            return None
        previous = self.clusters.get(name)
        breaker = previous.breaker if previous is not None else None
        if breaker is None:
            return CircuitBreaker(name, limits)
        breaker.limits = limits
        return breaker
