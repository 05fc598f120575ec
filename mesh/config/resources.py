"""Validated Istio resources: frozen dataclasses, one per kind.

(AuthorizationPolicy and PeerAuthentication live in :mod:`mesh.config.security`.)

:func:`mesh.config.validate.validate` builds these from raw
:class:`mesh.config.loader.Resource` objects.  Hosts are already fully
qualified (see :mod:`mesh.config.hosts`), durations are float seconds, maps
are sorted tuples of pairs, and defaults are filled in, so the compiler
(:mod:`mesh.config.compile`) never looks at YAML.  Each object keeps its
``source`` resource for line numbers and the config version hash.

Where a validated value is exactly a runtime type (a retry policy, header
operations, an outlier policy), the type from :mod:`mesh.config.tables` is
used directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.config.loader import Resource
from mesh.config.route_extras import CorsPolicy, DirectResponse, FaultInjection, Redirect, RegexRewrite
from mesh.config.tables import HeaderOps, OutlierPolicy, RetryPolicy, TcpKeepalive

#: The ``gateways`` name of the sidecars (a VirtualService or a match that names it applies to them).
MESH = "mesh"

#: Istio's retry policy for routes without ``retries``: 2 retries on
#: connect-failure, refused-stream, unavailable, cancelled and
#: retriable-status-codes (503).  ``unavailable``/``cancelled`` are gRPC
#: statuses (of a Trailers-Only gRPC response).
DEFAULT_RETRY = RetryPolicy(
    attempts=2,
    retry_on=frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}),
    retry_status_codes=frozenset({503}),
)


def _source():
    return field(compare=False, repr=False)


# -- registry: ServiceEntry, WorkloadEntry ------------------------------------------

#: ServiceEntry port protocols proxied as opaque TCP, never parsed as HTTP (Istio's ``IsTCP``).
TCP_PROTOCOLS = frozenset({"TCP", "TLS", "HTTPS"})
#: Of those, the ones routed by the SNI of the client's TLS ClientHello (Istio's ``IsTLS``).
TLS_PROTOCOLS = frozenset({"TLS", "HTTPS"})
#: The annotation with which the Kubernetes registry (:mod:`mesh.control.kube.translate`) marks the
#: ServiceEntry of a headless Service (``clusterIP: None``): internal, not an Istio field.
HEADLESS_ANNOTATION = "mesh.txmesh.io/headless"


@dataclass(frozen=True)
class ServicePort:
    """A port of a ServiceEntry; ``target_port`` None means "same as number".

    ``protocol`` is HTTP, HTTP2, GRPC (HTTP traffic) or one of
    :data:`TCP_PROTOCOLS` (TCP, TLS, HTTPS: proxied as TCP).
    """

    number: int
    name: str
    protocol: str = "HTTP"
    target_port: int | None = None

    @property
    def is_tcp(self) -> bool:
        """Whether the port carries opaque TCP (TCP, TLS, HTTPS) rather than HTTP."""
        return self.protocol in TCP_PROTOCOLS


@dataclass(frozen=True)
class WorkloadEndpoint:
    """An address that serves a service: a ServiceEntry endpoint or a WorkloadEntry.

    ``ports`` maps service port names to the port on this address, as sorted
    ``(name, number)`` pairs; ``labels`` is sorted ``(key, value)`` pairs.
    """

    address: str
    ports: tuple = ()
    labels: tuple = ()
    weight: int = 1
    service_account: str | None = None


@dataclass(frozen=True)
class ServiceEntry:
    """A service in the registry.

    ``workload_selector`` (sorted label pairs, or None) selects the
    WorkloadEntries of the same namespace as further endpoints.
    ``export_to`` empty means visible to every namespace.
    """

    name: str
    namespace: str
    hosts: tuple
    addresses: tuple
    ports: tuple
    location: str
    resolution: str
    endpoints: tuple
    subject_alt_names: tuple
    export_to: tuple
    workload_selector: tuple | None
    source: Resource = _source()

    @property
    def headless(self) -> bool:
        """A headless Service's entry (:data:`HEADLESS_ANNOTATION` ``"true"``, no addresses): its TCP ports
        get one listener per endpoint address, which goes to that endpoint, as Istio's Passthrough services."""
        metadata = getattr(self.source, "metadata", None) or {}
        return not self.addresses and (metadata.get("annotations") or {}).get(HEADLESS_ANNOTATION) == "true"


@dataclass(frozen=True)
class WorkloadEntry:
    """A workload outside the ServiceEntry's own ``endpoints`` list (a VM, a process)."""

    name: str
    namespace: str
    endpoint: WorkloadEndpoint
    source: Resource = _source()


# -- DestinationRule --------------------------------------------------------------------

@dataclass(frozen=True)
class LoadBalancer:
    """``policy`` is ROUND_ROBIN, LEAST_REQUEST, RANDOM or CONSISTENT_HASH.

    ``hash_on`` (CONSISTENT_HASH only) is ``("header", name)``,
    ``("cookie", name)``, ``("source_ip", None)`` or ``("query", name)``.
    """

    policy: str
    hash_on: tuple | None = None


#: Istio's choice when a DestinationRule sets no load balancer (since Istio 1.14).
DEFAULT_LOAD_BALANCER = LoadBalancer("LEAST_REQUEST")


@dataclass(frozen=True)
class ConnectionPool:
    """The supported part of ``connectionPool``, with Istio's defaults filled in.

    ``h2_upgrade_policy`` is Istio's ``http.h2UpgradePolicy`` (DEFAULT, DO_NOT_UPGRADE or
    UPGRADE; DEFAULT is the mesh default, DO_NOT_UPGRADE as in Istio), ``use_client_protocol``
    its ``http.useClientProtocol`` and ``max_concurrent_streams`` its
    ``http.maxConcurrentStreams`` (0: as many as the peer allows).  The circuit-breaking limits
    (0: unlimited, Istio's 2^32-1) are ``tcp.maxConnections`` (``max_connections``),
    ``http.http1MaxPendingRequests`` (``max_pending_requests``), ``http.http2MaxRequests``
    (``max_requests``) and ``http.maxRetries`` (``max_retries``).  ``tcp_keepalive`` is
    ``tcp.tcpKeepalive`` (None: keepalive off, as in Istio when it is absent), ``max_connection_duration``
    ``tcp.maxConnectionDuration`` (seconds; 0: no maximum).  ``idle_timeout`` is how long a pooled
    connection may stay idle: ``http.idleTimeout``, else ``tcp.idleTimeout``, else 1 h, as Istio
    sets it (0: no limit).  ``tcp_idle_timeout`` is ``tcp.idleTimeout`` itself (None: not set), which
    the TCP proxy also uses (:class:`mesh.config.tables.L4Chain`).
    """

    connect_timeout: float = 10.0
    max_connections: int = 0
    max_pending_requests: int = 0
    max_requests: int = 0
    max_retries: int = 0
    max_requests_per_connection: int = 0
    idle_timeout: float = 3600.0
    h2_upgrade_policy: str = "DEFAULT"
    use_client_protocol: bool = False
    max_concurrent_streams: int = 0
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: float = 0.0
    tcp_idle_timeout: float | None = None


@dataclass(frozen=True)
class ClientTLS:
    """Istio's ``ClientTLSSettings`` (a DestinationRule's ``tls``).

    ``mode`` is DISABLE, ISTIO_MUTUAL (mesh mTLS), SIMPLE or MUTUAL (TLS origination to a server
    outside the mesh: :mod:`mesh.proxy.tls_origination`).  The other fields serve SIMPLE and MUTUAL
    only: file paths on the sidecar's host (``ca_certificates`` None: the system's CA bundle),
    the ``sni`` to send and the ``subject_alt_names`` the server's certificate must carry (see
    :meth:`names`), or ``insecure_skip_verify`` to check neither chain nor name.
    """

    mode: str
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    sni: str | None = None
    subject_alt_names: tuple = ()
    insecure_skip_verify: bool = False

    @property
    def originates(self) -> bool:
        """Whether the sidecar opens TLS of its own to the endpoint (SIMPLE or MUTUAL)."""
        return self.mode in ("SIMPLE", "MUTUAL")

    def names(self) -> tuple:
        """The names the server's certificate is checked against (any one must match): the
        ``subjectAltNames``, else the SNI; none with ``insecureSkipVerify``."""
        if self.insecure_skip_verify:
            return ()
        return self.subject_alt_names or ((self.sni,) if self.sni else ())


@dataclass(frozen=True)
class TrafficPolicy:
    """A ``trafficPolicy``.  None fields are not set here (a less specific policy applies).

    ``tls`` is its :class:`ClientTLS` (``tls_mode`` its mode).  ``port_level`` holds
    ``(port_number, TrafficPolicy)`` pairs that replace all four settings for
    that port, as Istio's ``portLevelSettings`` do.
    """

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierPolicy | None = None
    tls: ClientTLS | None = None
    port_level: tuple = ()

    @property
    def tls_mode(self) -> str | None:
        """``tls.mode``, or None when the policy sets no ``tls``."""
        return self.tls.mode if self.tls is not None else None


@dataclass(frozen=True)
class Subset:
    """A named group of a service's endpoints, selected by labels."""

    name: str
    labels: tuple
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True)
class DestinationRule:
    """Policies for traffic to ``host`` (which may be a ``*.`` wildcard)."""

    name: str
    namespace: str
    host: str
    traffic_policy: TrafficPolicy | None
    subsets: tuple
    export_to: tuple
    source: Resource = _source()


# -- VirtualService ---------------------------------------------------------------------

@dataclass(frozen=True)
class StringMatch:
    """Istio's StringMatch; ``kind`` is exact, prefix, regex or present (header exists)."""

    kind: str
    value: str = ""


@dataclass(frozen=True)
class HTTPMatch:
    """One entry of ``match``: all its conditions must hold.

    ``headers``, ``without_headers`` and ``query_params`` are sorted
    ``(name, StringMatch)`` pairs; header names are lower-case.  ``port``
    (None: any) is tested per request; ``source_labels`` (sorted ``(key,
    value)`` pairs) and ``source_namespace`` (None: any) are decided when the
    config is compiled for one proxy, as Istio does; so are ``gateways`` (``namespace/name`` refs or
    ``mesh``; empty: those of the VirtualService).
    """

    name: str | None = None
    uri: StringMatch | None = None
    ignore_uri_case: bool = False
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple = ()
    without_headers: tuple = ()
    query_params: tuple = ()
    port: int | None = None
    source_labels: tuple = ()
    source_namespace: str | None = None
    gateways: tuple = ()


@dataclass(frozen=True)
class RouteDestination:
    """A weighted destination; ``weight`` is already resolved (100 for a lone destination).

    An ``http`` destination may have its own ``headers``: ``request_headers``/``response_headers``,
    and ``authority`` from a request ``host``/``:authority`` header.
    """

    host: str
    subset: str | None
    port: int | None
    weight: int
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    authority: str | None = None


@dataclass(frozen=True)
class HTTPRoute:
    """One ``http`` entry of a VirtualService.

    ``retry`` is None when retries are disabled (``attempts: 0``) and
    :data:`DEFAULT_RETRY` when the route has no ``retries``.  A request
    ``host``/``:authority`` header set through ``headers`` is folded into
    ``rewrite_authority``.  A route with a ``redirect`` or ``direct_response``
    has no ``route``.  ``fault``, ``redirect``, ``direct_response``, ``cors``
    and ``rewrite_regex`` (``rewrite.uriRegexRewrite``) are the types of
    :mod:`mesh.config.route_extras`.  ``mirrors`` are ``(RouteDestination, fraction)`` pairs, from
    ``mirror`` (with ``mirrorPercentage``) or ``mirrors``.
    """

    index: int
    name: str | None
    match: tuple
    route: tuple
    rewrite_uri: str | None = None
    rewrite_authority: str | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = DEFAULT_RETRY
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    fault: FaultInjection | None = None
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    cors: CorsPolicy | None = None
    rewrite_regex: RegexRewrite | None = None
    mirrors: tuple = ()


@dataclass(frozen=True)
class L4Match:
    """One entry of the ``match`` of a ``tcp`` route (Istio's L4MatchAttributes) or of a ``tls``
    route (TLSMatchAttributes, which adds ``sniHosts``): all its conditions must hold.

    ``sni_hosts`` are lower-case names or ``*.`` wildcards (``tls`` routes only; never empty
    there); ``destination_subnets`` are :mod:`ipaddress` networks (empty: any destination);
    ``port`` None matches any port; ``source_labels`` are sorted ``(key, value)`` pairs and
    ``source_namespace`` None any namespace.  The source conditions and the port are decided
    when the config is compiled for one proxy, as Istio does; SNI and subnets per connection.
    """

    sni_hosts: tuple = ()
    destination_subnets: tuple = ()
    port: int | None = None
    source_labels: tuple = ()
    source_namespace: str | None = None
    gateways: tuple = ()  # ``tcp`` matches: the gateways (``namespace/name``, or MESH) it is for; empty: the route's


@dataclass(frozen=True)
class L4Route:
    """One ``tcp`` or ``tls`` entry of a VirtualService: ``match`` (:class:`L4Match`, empty: any
    connection; a ``tls`` route has at least one) and its weighted ``route`` destinations."""

    index: int
    match: tuple
    route: tuple


@dataclass(frozen=True)
class VirtualService:
    """Routing rules for ``hosts`` (fully qualified names, wildcards or IP literals).

    ``http`` routes HTTP requests; ``tcp`` (:class:`L4Route`) routes connections to TCP ports
    and ``tls`` connections to TLS and HTTPS ports, by SNI.  ``gateways`` are ``namespace/name`` refs of
    Gateways and ``mesh`` (the sidecars); empty: the sidecars only (see :func:`mesh.config.gateway.bound`).
    """

    name: str
    namespace: str
    hosts: tuple
    http: tuple
    export_to: tuple
    source: Resource = _source()
    tcp: tuple = ()
    tls: tuple = ()
    gateways: tuple = ()
