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

#: Retry conditions understood by the built-in retry plugin (Istio/Envoy names).
RETRY_ON_NAMES = frozenset(
    {
        "5xx",
        "gateway-error",
        "connect-failure",
        "reset",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
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

    def pick_cluster(self, _random=random.random, _bisect=bisect.bisect_right) -> str:
        """Choose one cluster name according to the weights."""
        clusters = self.clusters
        if len(clusters) == 1:
            return clusters[0]
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
    """All routes for one set of host names, in first-match order."""

    name: str
    routes: tuple


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
    """Passive health checking (Istio ``outlierDetection``)."""

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 0  # 0: disabled
    consecutive_connect_failures: int = 1
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One upstream address of a cluster, as configured.

    ``identity`` is the SPIFFE id the endpoint must present (None: plaintext).
    """

    address: str
    port: int
    labels: tuple = ()  # sorted ((key, value), ...)
    weight: int = 1
    identity: str | None = None

    @property
    def key(self) -> tuple:
        """Live endpoint state is shared by address, port and expected identity."""
        return (self.address, self.port, self.identity)


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
    idle_timeout: float = 3600.0
    outlier: OutlierPolicy = OutlierPolicy()
    protocol: str | None = "HTTP"
    upstream_protocol: str = UPSTREAM_HTTP1
    max_concurrent_streams: int = 0


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
    ``app_protocol`` is the protocol of the workload's app port (HTTP, HTTP2 or GRPC) from
    the ServiceEntry ports that lead to the workload, or None when none does (see
    :mod:`mesh.config.compile`); the inbound sidecar speaks it to the app.
    """

    version: str
    routes: RouteTable
    clusters: dict
    authz: object = None
    peer_authentication: object = None
    app_protocol: str | None = None
    sources: tuple = ()
    dump: dict = field(default_factory=dict)
    warnings: tuple = ()
