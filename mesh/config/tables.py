"""Compiled, immutable lookup tables that the data plane reads per request.

The config layer (``mesh.config.compile``) turns validated Istio resources into
one :class:`ProxyConfig` per proxy.  Nothing here walks YAML or dicts per
request: every match is a precompiled predicate, every weighted split a
precomputed cumulative table, and host lookup is one dict probe.

A new config is swapped in with a single assignment; these objects are never
mutated after construction.  Mutable per-endpoint state (health, active
requests, connection pools) lives in :mod:`mesh.proxy.clusters`, keyed by
:attr:`EndpointSpec.key` so that it survives reloads.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

#: Retry conditions understood by the built-in retry plugin (Istio/Envoy names); the last five
#: are gRPC statuses (Envoy's ``x-envoy-retry-grpc-on``), met by a Trailers-Only gRPC response.
RETRY_ON_NAMES = frozenset(
    {
        "5xx",
        "gateway-error",
        "connect-failure",
        "reset",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often to retry a failed try.

    ``attempts`` is Istio's field: the number of *retries* after the first try.
    ``per_try_timeout`` is in seconds (None: only the overall timeout applies).
    ``retry_on`` holds names from :data:`RETRY_ON_NAMES`; numeric entries of
    Istio's ``retryOn`` land in ``retry_status_codes``.
    """

    attempts: int
    per_try_timeout: float | None = None
    retry_on: frozenset = frozenset({"connect-failure", "refused-stream", "gateway-error"})
    retry_status_codes: frozenset = frozenset()
    backoff_base: float = 0.025  # seconds, Envoy's default base interval


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header manipulation of Istio's ``headers.request``/``headers.response``.

    Names are lower-case bytes, values bytes.
    """

    set: tuple = ()  # ((name, value), ...)
    add: tuple = ()  # ((name, value), ...)
    remove: tuple = ()  # (name, ...)


@dataclass(frozen=True, slots=True)
class RouteAction:
    """What to do with a request that matched a route.

    ``clusters`` are cluster names (keys of :attr:`ProxyConfig.clusters`) with
    ``cumulative_weights`` of the same length, ending in the total weight.
    ``timeout`` is the whole-request timeout in seconds (None: no timeout, as in
    Istio).  ``rewrite_prefix`` replaces the first ``rewrite_strip`` bytes of
    the path (the matched URI prefix, or the whole path for exact/regex
    matches); ``rewrite_authority`` replaces the Host header.
    ``extras`` (a :class:`mesh.config.route_extras.RouteExtras`) holds what the
    route does besides forwarding (fault injection, CORS, a redirect or direct
    response, a regex rewrite, per-destination headers); None for a plain
    route.  A redirect or direct response has no ``clusters``.
    """

    name: str
    clusters: tuple
    cumulative_weights: tuple
    timeout: float | None = None
    retry: RetryPolicy | None = None
    rewrite_prefix: bytes | None = None
    rewrite_strip: int = 0
    rewrite_authority: bytes | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    extras: object = None

    def pick_cluster(self, _random=random.random, _bisect=bisect.bisect_right) -> str | None:
        """Choose one cluster name according to the weights (None: the route has no cluster)."""
        clusters = self.clusters
        if len(clusters) == 1:
            return clusters[0]
        if not clusters:
            return None
        weights = self.cumulative_weights
        return clusters[_bisect(weights, _random() * weights[-1])]


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """One ``http`` entry of a VirtualService.

    ``match`` is a precompiled predicate over a
    :class:`mesh.proxy.context.RequestContext` (None matches everything).
    """

    match: Callable | None
    action: RouteAction


@dataclass(frozen=True, slots=True)
class VirtualHost:
    """All routes for one set of host names, in first-match order.

    ``ports`` maps a port to the routes of a request sent to it, when they differ by port: a
    destination without a port goes to the port the request was sent to when its service has that
    port, as in Istio's per-port route configurations.  ``routes`` serve every other port (a
    destination without a port goes to its service's first port then).  None: the same routes for
    every port.
    """

    name: str
    routes: tuple
    ports: dict | None = None


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Host name -> :class:`VirtualHost`.

    ``exact`` holds every alias of every host (``svc``, ``svc.ns``,
    ``svc.ns.svc``, ``svc.ns.svc.cluster.local``, IP literals...).  ``wildcards``
    holds ``(suffix, vhost)`` for ``*.example.com`` style hosts, longest suffix
    first; ``suffix`` includes the leading dot.  ``catch_all`` serves ``*``.
    Hosts are looked up lower-case and without a port.
    """

    exact: dict = field(default_factory=dict)
    wildcards: tuple = ()
    catch_all: VirtualHost | None = None

    def lookup(self, host: str) -> VirtualHost | None:
        vhost = self.exact.get(host)
        if vhost is not None:
            return vhost
        for suffix, candidate in self.wildcards:
            if host.endswith(suffix):
                return candidate
        return self.catch_all


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Passive health checking (Istio ``outlierDetection``; how it counts: :mod:`mesh.proxy.outlier`).

    ``consecutive_connect_failures`` is txmesh's own (1: eject after one connect failure); an explicit
    ``consecutive5xxErrors: 0`` sets it to 0 too, as Envoy counts a connect failure as a 5xx.
    ``interval`` is how long an endpoint must stay un-ejected for its ejection multiplier to go down by one.
    """

    consecutive_5xx: int = 5  # 0: disabled
    consecutive_gateway_errors: int = 0  # 0: disabled
    consecutive_connect_failures: int = 1  # 0: disabled
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10

    @property
    def max_ejection_time(self) -> float:
        """The longest ejection: Envoy's ``max_ejection_time`` default (Istio does not set it), 300 s, or
        ``base_ejection_time`` if that is longer."""
        return max(300.0, self.base_ejection_time)


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    """TCP keepalive on a cluster's upstream connections (Istio ``connectionPool.tcp.tcpKeepalive``).

    Whole seconds, as the kernel counts them; None leaves the system's setting (Linux: ``time``
    7200 s, ``interval`` 75 s, ``probes`` 9).  ``time``: idle time before the first probe;
    ``interval``: time between probes; ``probes``: unanswered probes before the connection is dead.
    """

    time: int | None = None
    interval: int | None = None
    probes: int | None = None


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One upstream address of a cluster, as configured.

    ``identity`` is the SPIFFE id the endpoint must present (None: plaintext).
    ``origination`` is the :class:`mesh.config.resources.ClientTLS` (mode SIMPLE or MUTUAL)
    with which the sidecar opens TLS to an endpoint outside the mesh (None: it does not).
    """

    address: str
    port: int
    labels: tuple = ()  # sorted ((key, value), ...)
    weight: int = 1
    identity: str | None = None
    origination: object = None

    @property
    def key(self) -> tuple:
        """Live endpoint state is shared by address, port, expected identity and TLS origination."""
        return (self.address, self.port, self.identity, self.origination)


@dataclass(frozen=True, slots=True)
class L4Chain:
    """One way a TCP connection to a service port may be routed: a filter chain of Envoy's outbound listener.

    ``subnets`` are the :mod:`ipaddress` networks the destination address must be in (empty:
    any); ``sni`` is None when the chain does not look at the TLS server name, else
    ``(exact names, wildcard suffixes)`` (a suffix keeps its dot: ``.example.com``).

    ``idle_timeout`` and ``max_duration`` are Envoy's ``tcp_proxy`` ``idle_timeout`` and
    ``max_downstream_connection_duration``, which Istio takes from the top-level ``trafficPolicy``
    of the DestinationRule of the route's first destination: ``connectionPool.tcp.idleTimeout``
    (seconds; None: not set, the listener's ``--idle-timeout`` applies; 0: none) and
    ``tcp.maxConnectionDuration`` (seconds; 0: none).

    ``original_dst`` is ``(service host, endpoint address)`` on the chains of a headless Service's
    per-instance listener (``10.0.2.1_9092``): a connection routed to a cluster of that host goes to
    that endpoint, the one the client dialled, instead of a load-balanced one (Envoy's
    ``ORIGINAL_DST``, as Istio routes a headless Service).  None: load balanced.
    """

    action: RouteAction
    subnets: tuple = ()
    sni: tuple | None = None
    idle_timeout: float | None = None
    max_duration: float = 0.0
    original_dst: tuple | None = None

    def prefix_rank(self, address) -> int:
        """How specifically the destination ``address`` matches: the longest matching prefix length,
        -1 for a chain without subnets, None when no subnet contains it."""
        if not self.subnets:
            return -1
        best = None
        for network in self.subnets:
            if address is not None and address.version == network.version and address in network:
                if best is None or network.prefixlen > best:
                    best = network.prefixlen
        return best

    def sni_rank(self, server_name) -> int:
        """How specifically ``server_name`` matches: 1 << 16 for an exact name, the suffix length for a
        wildcard, -1 for a chain without SNI, None when it does not match (or no SNI was sent)."""
        names = self.sni
        if names is None:
            return -1
        if server_name is None:
            return None
        exact, suffixes = names
        if server_name in exact:
            return 1 << 16
        best = None
        for suffix in suffixes:
            if server_name.endswith(suffix) and (best is None or len(suffix) > best):
                best = len(suffix)
        return best


@dataclass(frozen=True, slots=True)
class L4Listener:
    """The TCP routes of one destination: Envoy's outbound listener for a TCP, TLS or HTTPS service port.

    ``name`` is Istio's listener name (``10.96.0.5_9000`` for a service address, ``0.0.0.0_9000``
    for the port of services without one).  ``tls``: read the server name (SNI) of the
    client's TLS ClientHello before routing.  ``chains`` are :class:`L4Chain`.
    """

    name: str
    tls: bool
    chains: tuple

    def chain(self, address, server_name) -> L4Chain | None:
        """The chain that matches a connection, as Envoy picks a filter chain: the most
        specific destination prefix first, then, among those chains only, the most specific server
        name.  None when no chain matches (Envoy closes such a connection, flag ``NR``).

        ``address`` is the destination as an :mod:`ipaddress` address (or None), ``server_name``
        the lower-case SNI (or None).
        """
        chains = self.chains
        if len(chains) == 1:
            chain = chains[0]
            if chain.prefix_rank(address) is None or chain.sni_rank(server_name) is None:
                return None
            return chain
        ranked = [(rank, chain) for chain in chains if (rank := chain.prefix_rank(address)) is not None]
        if not ranked:
            return None
        top = max(rank for rank, _ in ranked)
        best, best_rank = None, None
        for rank, chain in ranked:
            if rank == top:
                sni = chain.sni_rank(server_name)
                if sni is not None and (best_rank is None or sni > best_rank):
                    best, best_rank = chain, sni
        return best


@dataclass(frozen=True, slots=True)
class L4Table:
    """Where a TCP connection through the outbound side goes, by its destination ``(ip, port)``.

    ``by_destination`` holds the listeners of the ServiceEntry ``addresses`` (a service's VIP
    and port); ``by_port`` those of the ports of services without an address, which take
    every destination address on that port (as Istio's ``0.0.0.0_PORT`` listeners do).
    """

    by_destination: dict = field(default_factory=dict)
    by_port: dict = field(default_factory=dict)

    def lookup(self, ip: str, port: int) -> L4Listener | None:
        """The listener of destination ``ip:port``, or None when it is no TCP service port."""
        listener = self.by_destination.get((ip, port))
        return listener if listener is not None else self.by_port.get(port)


#: Istio's clusters for traffic outside the registry (outboundTrafficPolicy ALLOW_ANY / REGISTRY_ONLY, and
#: inbound traffic to a port no listener of the config serves): the proxy builds them, the telemetry names them.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughClusterIpv4"


#: ServiceEntry port protocols that are HTTP/2 on the wire (Istio's ``IsHTTP2``).
H2_PROTOCOLS = frozenset({"HTTP2", "GRPC"})

#: How a cluster chooses the protocol of each try (:attr:`ClusterSpec.upstream_protocol`):
#:
#: - ``UPSTREAM_HTTP1``: HTTP/1.1, except that an HTTP/2 request to a sidecar (mTLS) offers
#:   ALPN ``h2`` and goes HTTP/2 if the peer selects it;
#: - ``UPSTREAM_H2``: always HTTP/2 (ALPN ``h2`` over mTLS, prior knowledge ``h2c`` in plaintext);
#: - ``UPSTREAM_CLIENT``: the downstream request's protocol, to every endpoint.
UPSTREAM_HTTP1, UPSTREAM_H2, UPSTREAM_CLIENT = "http1", "h2", "client"


def upstream_protocol(port_protocol, use_client_protocol=False, h2_upgrade_policy="DEFAULT") -> str:
    """The :attr:`ClusterSpec.upstream_protocol` of a port, as Istio chooses it.

    An HTTP2/GRPC port is HTTP/2; otherwise DestinationRule ``useClientProtocol: true`` keeps
    the client's protocol, ``h2UpgradePolicy: UPGRADE`` upgrades, and DEFAULT is the mesh
    default, DO_NOT_UPGRADE (Istio's ``meshConfig.h2UpgradePolicy`` default).  A port of
    unknown protocol (None: only the app port of a workload no ServiceEntry describes) keeps
    the client's protocol, as Istio does for a sniffed port.
    """
    if port_protocol in H2_PROTOCOLS:
        return UPSTREAM_H2
    if use_client_protocol or port_protocol is None:
        return UPSTREAM_CLIENT
    return UPSTREAM_H2 if h2_upgrade_policy == "UPGRADE" else UPSTREAM_HTTP1


def cluster_name(port: int, subset: str, host: str) -> str:
    """Istio's cluster name ``outbound|PORT|SUBSET|HOST``."""
    return f"outbound|{port}|{subset}|{host}"


@dataclass(frozen=True, slots=True)
class CircuitLimits:
    """A cluster's circuit-breaking limits, as Istio programs Envoy's (0: unlimited).

    ``max_connections`` (``tcp.maxConnections``) caps the cluster's upstream connections;
    ``max_pending`` (``http.http1MaxPendingRequests``) the tries waiting for one of them;
    ``max_requests`` (``http.http2MaxRequests``) the tries in flight; ``max_retries``
    (``http.maxRetries``) the retries in flight.  Enforced by :mod:`mesh.proxy.circuit`.
    """

    max_connections: int = 0
    max_pending: int = 0
    max_requests: int = 0
    max_retries: int = 0


def circuit_limits(max_connections=0, max_pending=0, max_requests=0, max_retries=0) -> CircuitLimits | None:
    """The :class:`CircuitLimits` of a connection pool, or None when it sets none."""
    if not (max_connections or max_pending or max_requests or max_retries):
        return None
    return CircuitLimits(max_connections, max_pending, max_requests, max_retries)


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """An upstream cluster: a service port, optionally narrowed to a subset.

    ``name`` follows Istio: ``outbound|PORT|SUBSET|HOST`` (SUBSET may be empty).
    ``lb_policy`` is one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, CONSISTENT_HASH.
    ``hash_on`` (for CONSISTENT_HASH) is ``("header", name)``,
    ``("cookie", name)``, ``("source_ip", None)`` or ``("query", name)``.
    ``protocol`` is the port's (HTTP, HTTP2, GRPC; None: unknown), ``upstream_protocol``
    how tries choose theirs (see :func:`upstream_protocol`), ``max_concurrent_streams``
    the cap on streams per HTTP/2 connection (0: the peer's SETTINGS_MAX_CONCURRENT_STREAMS).
    ``limits`` are the circuit-breaking limits (:class:`CircuitLimits`; None: unlimited).
    ``tcp_keepalive`` turns TCP keepalive on for its upstream connections (:class:`TcpKeepalive`; None: off);
    ``max_connection_duration`` (seconds; 0: none) is how long one of its HTTP connections is used.
    ``resolution`` is the ServiceEntry's: STATIC (IP endpoints), DNS (each endpoint address that is a
    host name stands for every address it resolves to, Envoy's STRICT_DNS) or DNS_ROUND_ROBIN (for
    the first one, Envoy's LOGICAL_DNS); the sidecar resolves them (:mod:`mesh.proxy.dns`).
    """

    name: str
    service: str
    port: int
    subset: str = ""
    lb_policy: str = "ROUND_ROBIN"
    hash_on: tuple | None = None
    endpoints: tuple = ()
    connect_timeout: float = 10.0
    max_requests_per_connection: int = 0  # 0: unlimited
    idle_timeout: float = 3600.0  # of a pooled connection; 0: none
    outlier: OutlierPolicy = OutlierPolicy()
    protocol: str | None = "HTTP"
    upstream_protocol: str = UPSTREAM_HTTP1
    max_concurrent_streams: int = 0
    limits: CircuitLimits | None = None
    resolution: str = "STATIC"
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: float = 0.0


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything one proxy needs, compiled.  Swapped in with one assignment.

    ``version`` identifies the config (a hash of its sources), ``routes`` is
    the outbound route table and ``clusters`` maps cluster name ->
    :class:`ClusterSpec`.  ``sources`` lists the files it came from.
    ``dump`` is a JSON-ready description for the admin ``/config_dump``.
    ``authz`` is the compiled AuthorizationPolicy set for this workload (read by
    ``mesh_authorize``); ``peer_authentication`` the compiled PeerAuthentication
    (inbound mTLS mode, per port).
    ``warnings`` holds :class:`mesh.config.errors.ConfigWarning` objects:
    problems that do not invalidate the config, such as a route to a host no
    ServiceEntry defines.
    ``l4`` routes the TCP connections of the outbound side (TCP, TLS and HTTPS ports,
    VirtualService ``tcp`` and ``tls`` routes); ``tcp_authz`` is the AuthorizationPolicy set
    compiled for TCP connections (HTTP-only conditions dropped as Istio does, see
    :mod:`mesh.config.security_compile`); ``app_service`` the host of the service the
    workload serves (the first ServiceEntry that leads to it: the ``destination_service`` of
    its inbound TCP connections), or None.
    ``app_protocol`` is the protocol of the workload's app port (HTTP, HTTP2 or GRPC) from
    the ServiceEntry ports that lead to the workload, or None when none does (see
    :mod:`mesh.config.compile`); the inbound sidecar speaks it to the app.
    ``gateway`` maps the ports of a gateway proxy to their :class:`mesh.config.gateway.GatewayPort`
    (empty for a sidecar).
    ``request_authn`` is the workload's merged RequestAuthentications
    (:class:`mesh.config.request_authn.RequestAuthn`, read by :mod:`mesh.proxy.authn`), or None.
    ``outbound_traffic_policy`` is the mode of the workload's Sidecar (``ALLOW_ANY`` or
    ``REGISTRY_ONLY``), which overrides the sidecar's ``--outbound-traffic-policy``; None: no override.
    """

    version: str
    routes: RouteTable
    clusters: dict
    authz: object = None
    peer_authentication: object = None
    app_protocol: str | None = None
    l4: L4Table = field(default_factory=L4Table)
    tcp_authz: object = None
    app_service: str | None = None
    request_authn: object = None
    outbound_traffic_policy: str | None = None
    gateway: dict = field(default_factory=dict)
    sources: tuple = ()
    dump: dict = field(default_factory=dict)
    warnings: tuple = ()
