"""``builtin.metrics``: Istio's standard request metrics, reported by each sidecar.

The names, labels and histogram buckets are Istio's, so that Istio's
dashboards and alerts work unchanged.  The outbound listener reports as
``reporter="source"``, the inbound one as ``reporter="destination"``; each
side fills in what it knows (docs/telemetry.md says where every label comes
from and when it is ``unknown``).

A gRPC request (``ctx.grpc`` set) reports ``request_protocol="grpc"``, its
gRPC status in ``grpc_response_status`` (empty for other requests, as
Istio's), and its messages each way in ``istio_request_messages_total`` /
``istio_response_messages_total``, which only gRPC series have.

Hot path: a request costs one tuple key and one dict lookup to find its
:class:`Series` (bound when that key was first seen; label values are worked
out only then), one counter increment and three bucket searches in C
(``bisect``).  prometheus-client's own ``Counter``/``Histogram`` children
cost about four times as much per request (3.4 us against 0.8 us, measured
in-process: a lock per value, a Python loop over the buckets), a large share of
the 10 % that telemetry may cost (docs/telemetry.md, "Cost").  The sidecar is
one reactor thread and metrics are rendered on that thread, so plain integers
need no lock; prometheus-client still does the exposition, from
:meth:`IstioMetrics.collect`.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mesh import hookimpl
from mesh.telemetry.guard import FailureLog
from mesh.telemetry.peers import (
    PEER_METADATA,
    PSEUDO_CLUSTERS,
    UNKNOWN,
    ConfigCache,
    namespace_of,
    service_labels,
    workload_metadata,
)

#: Envoy's default histogram buckets, which Istio uses for all three of its histograms
#: (its bootstrap sets no ``histogram_bucket_settings`` unless a pod asks for them).
ISTIO_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                 600000, 1800000, 3600000)
#: ``le`` label values written as Envoy writes them (``1``, ``0.5``, ``1.8e+06``).
_BUCKET_NAMES = tuple(f"{bound:g}" for bound in ISTIO_BUCKETS) + ("+Inf",)

#: The peer labels, in the order the two reporters compute them.
PEER_LABELS = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_app", "destination_version", "destination_canonical_service", "destination_canonical_revision",
    "connection_security_policy",
)
#: Istio's tag names for the dry-run results of its RBAC stats (``allow``/``deny``, ``allowed``/``denied``).
DRY_RUN_LABELS = ("authz_dry_run_action", "authz_dry_run_result")
REQUEST_LABELS = PEER_LABELS + ("request_protocol", "response_code", "response_flags", "grpc_response_status")
_PROTOCOL = REQUEST_LABELS.index("request_protocol")
TCP_LABELS = PEER_LABELS + ("request_protocol", "response_flags")

#: Istio's TCP metrics.  Istio does not count HTTP traffic in them; txmesh reports the routed TCP
#: connections (:mod:`mesh.proxy.tcp_proxy`) and the TCP passthrough connections of captured traffic
#: (:mod:`mesh.proxy.passthrough`), in this order.
TCP_METRICS = (
    ("istio_tcp_connections_opened", "TCP connections opened (TCP-proxied traffic only)."),
    ("istio_tcp_connections_closed", "TCP connections closed (TCP-proxied traffic only)."),
    ("istio_tcp_sent_bytes", "Bytes sent during the response of a TCP connection (TCP-proxied traffic only)."),
    ("istio_tcp_received_bytes", "Bytes received during the request of a TCP connection (TCP-proxied traffic only)."),
)

class Distribution:
    """Bucket counts (not cumulative; the last one is +Inf) and sum of one histogram series."""

    __slots__ = ("counts", "sum")

    def __init__(self):
        self.counts = [0] * (len(ISTIO_BUCKETS) + 1)
        self.sum = 0.0

    def cumulative(self) -> list:
        """``[(le, count)]`` as Prometheus histograms want them."""
        total = 0
        buckets = []
        for name, count in zip(_BUCKET_NAMES, self.counts):
            total += count
            buckets.append((name, total))
        return buckets


class Series:
    """Everything counted for one Istio label set (the message counts: gRPC series only)."""

    __slots__ = ("requests", "duration", "request_bytes", "response_bytes", "request_messages",
                 "response_messages")

    def __init__(self):
        self.requests = 0
        self.duration = Distribution()
        self.request_bytes = Distribution()
        self.response_bytes = Distribution()
        self.request_messages = 0
        self.response_messages = 0

    def observe(self, milliseconds, received, sent) -> None:
        """Count one request (one method call: this is the per-request work)."""
        self.requests += 1
        duration, request_bytes, response_bytes = self.duration, self.request_bytes, self.response_bytes
        duration.counts[bisect_left(ISTIO_BUCKETS, milliseconds)] += 1
        duration.sum += milliseconds
        request_bytes.counts[bisect_left(ISTIO_BUCKETS, received)] += 1
        request_bytes.sum += received
        response_bytes.counts[bisect_left(ISTIO_BUCKETS, sent)] += 1
        response_bytes.sum += sent


class IstioMetrics(Collector):
    """The ``mesh_request_complete`` implementation behind ``istio_*``, and their collector.

    Also counts retries per cluster (``mesh_upstream_rq_retry_total``): no
    live state remembers them; and the results of dry-run AuthorizationPolicies
    (``mesh_authz_dry_run_total``).

    :param workload: the :class:`mesh.config.compile.Workload` this sidecar serves.
    :param peers: a :class:`mesh.telemetry.peers.PeerDirectory`.
    """

    def __init__(self, workload, peers):
        self._own = workload_metadata(workload)
        self._peers = peers
        self._series = {}  # label values -> Series, for as long as the process lives
        self._by_key = ConfigCache(peers, self._bind)  # request key -> Series
        self._retries = {}  # cluster -> retries
        self._dry_run = {}  # (authz_dry_run_action, authz_dry_run_result) -> requests
        self._tcp = {}  # (direction, cluster, flags, upstream, peer) -> [opened, closed, sent bytes, received bytes]
        self._inbound_index = self._inbound_labels = None  # the SnapshotIndex the inbound service labels are of
        self._failed = FailureLog("builtin.metrics")

    @hookimpl
    def mesh_request_complete(self, ctx, outcome):
        try:
            grpc = ctx.grpc
            # the grpc_response_status of the key: None for HTTP, "" for gRPC without a status, else the status
            grpc_status = None if grpc is None else ("" if grpc.status is None else grpc.status)
            series = self._by_key.get((ctx.direction, ctx.cluster, ctx.upstream_host, ctx.peer, ctx.response_code,
                                       ctx.response_flags, ctx.get_extra(PEER_METADATA), grpc_status))
            series.observe(outcome.duration * 1000.0, ctx.bytes_received, ctx.bytes_sent)
            if grpc is not None:
                series.request_messages += grpc.request_messages
                series.response_messages += grpc.response_messages
            if ctx.attempts > 1:
                self._retries[ctx.cluster] = self._retries.get(ctx.cluster, 0) + ctx.attempts - 1
            if ctx.authz_dry_run is not None:
                self._count_dry_run(ctx.authz_dry_run)
        except Exception:
            self._failed()

    def collect(self):
        requests = CounterMetricFamily("istio_requests", "Requests handled by the sidecar.", labels=REQUEST_LABELS)
        duration = HistogramMetricFamily("istio_request_duration_milliseconds",
                                         "Request duration, from the parsed head to the last byte sent.",
                                         labels=REQUEST_LABELS)
        request_bytes = HistogramMetricFamily("istio_request_bytes", "Request body sizes.", labels=REQUEST_LABELS)
        response_bytes = HistogramMetricFamily("istio_response_bytes", "Response body sizes.", labels=REQUEST_LABELS)
        request_messages = CounterMetricFamily("istio_request_messages", "gRPC messages sent by clients.",
                                               labels=REQUEST_LABELS)
        response_messages = CounterMetricFamily("istio_response_messages", "gRPC messages sent by servers.",
                                                labels=REQUEST_LABELS)
        for labels, series in self._series.items():
            requests.add_metric(labels, series.requests)
            for family, distribution in ((duration, series.duration), (request_bytes, series.request_bytes),
                                         (response_bytes, series.response_bytes)):
                family.add_metric(labels, distribution.cumulative(), distribution.sum)
            if labels[_PROTOCOL] == "grpc":
                request_messages.add_metric(labels, series.request_messages)
                response_messages.add_metric(labels, series.response_messages)
        yield from (requests, duration, request_bytes, response_bytes, request_messages, response_messages)
        tcp = [CounterMetricFamily(name, text, labels=TCP_LABELS) for name, text in TCP_METRICS]
        index = self._peers.index()
        for key, counts in self._tcp.items():
            labels = self._tcp_labels(index, *key)
            for family, count in zip(tcp, counts):
                family.add_metric(labels, count)
        yield from tcp
        retries = CounterMetricFamily("mesh_upstream_rq_retry", "Retries (tries after the first), per cluster.",
                                      labels=("cluster",))
        for cluster, count in sorted(self._retries.items()):
            retries.add_metric((cluster,), count)
        yield retries
        dry_run = CounterMetricFamily(
            "mesh_authz_dry_run", "Results of dry-run AuthorizationPolicies (istio.io/dry-run), never enforced: "
            "per shadow engine (the dry-run policies of one action), as Envoy's rbac shadow_allowed/shadow_denied.",
            labels=DRY_RUN_LABELS)
        for labels, count in sorted(self._dry_run.items()):
            dry_run.add_metric(labels, count)
        yield dry_run

    def _count_dry_run(self, results) -> None:
        """Count the shadow results of one request (``ctx.authz_dry_run``): at most 4 label sets."""
        counts = self._dry_run
        for action, result, _ in results:
            key = (action, result)
            counts[key] = counts.get(key, 0) + 1

    @hookimpl
    def mesh_connection_open(self, connection):
        """Count a TCP connection opened (``connection`` is a :class:`mesh.api.ConnectionView` with the
        tunnel's ``cluster`` and ``response_flags``); HTTP connections are counted per request."""
        if connection.protocol == "tcp":
            self._tcp_counts(connection)[0] += 1

    @hookimpl
    def mesh_connection_complete(self, connection):
        """Count a TCP connection closed, and its bytes."""
        if connection.protocol == "tcp":
            counts = self._tcp_counts(connection)
            counts[1] += 1
            counts[2] += connection.bytes_sent
            counts[3] += connection.bytes_received

    def _tcp_counts(self, connection) -> list:
        """``[opened, closed, sent, received]`` of the connection's labels."""
        upstream = connection.upstream
        key = (connection.direction, connection.cluster, connection.response_flags,
               f"{upstream[0]}:{upstream[1]}" if upstream else None, connection.peer)
        counts = self._tcp.get(key)
        if counts is None:
            counts = self._tcp[key] = [0, 0, 0, 0]
        return counts

    def _tcp_labels(self, index, direction, cluster, flags, upstream_host, peer) -> tuple:
        """Labels of TCP connections: as a request's on the outbound side (the endpoint connected to tells
        the destination principal); inbound, the caller's identity and the service the app serves
        (:meth:`_inbound_service`).  A passthrough pseudo-cluster is the destination service (as in Istio).
        The peer's workload labels stay ``unknown``: no metadata is exchanged on TCP connections."""
        if direction == "outbound":
            values = self._source_labels(index, cluster, upstream_host, None)
        else:
            values = self._destination_labels(index, peer, self._inbound_service(index, cluster), None)
        return values + ("tcp", flags or "-")

    def _bind(self, key, index) -> Series:
        """Work out the labels of a new key and find (or start) its series."""
        direction, cluster, upstream_host, peer, code, flags, metadata, grpc_status = key
        if direction == "outbound":
            values = self._source_labels(index, cluster, upstream_host, metadata)
        else:
            values = self._destination_labels(index, peer, self._inbound_service(index, cluster), metadata)
        values += ("http" if grpc_status is None else "grpc", str(code), flags or "-",
                   "" if grpc_status is None else str(grpc_status))
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = Series()
        return series

    def _source_labels(self, index, cluster, upstream_host, metadata) -> tuple:
        """Peer labels on the outbound side: this workload calls the endpoint of ``cluster``, which
        announced ``metadata`` (a :class:`mesh.telemetry.peers.PeerMetadata`, or None)."""
        own = self._own
        endpoint = index.endpoint(cluster, upstream_host)
        peer_identity = endpoint.identity if endpoint is not None else None
        own_identity = self._peers.own_identity() if peer_identity else None
        service, service_name, service_namespace = service_labels(index.services.get(cluster))
        if metadata is not None:
            destination = metadata
        else:
            endpoint_labels = dict(endpoint.labels) if endpoint is not None else {}
            destination = (UNKNOWN, namespace_of(peer_identity) or service_namespace,
                           endpoint_labels.get("app", UNKNOWN), endpoint_labels.get("version", UNKNOWN),
                           UNKNOWN, UNKNOWN)
        workload, namespace, app, version, canonical_service, canonical_revision = destination
        return ("source",
                own.workload, own.namespace, own_identity or UNKNOWN, own.app, own.version,
                own.canonical_service, own.canonical_revision,
                workload, namespace, peer_identity or UNKNOWN,
                service, service_name, service_namespace,
                app, version, canonical_service, canonical_revision,
                UNKNOWN)

    def _inbound_service(self, index, cluster) -> tuple:
        """``(destination_service, destination_service_name, destination_service_namespace)`` on the inbound
        side, never from the Host header (Istio turns its Host fallback off for inbound listeners): the
        service the app serves (``index.app_service``, as Istio reads ``istio.services[0]`` of the inbound
        cluster), else the workload's canonical service, in the workload's namespace either way.  A
        passthrough pseudo-cluster is its own.  Worked out once per config."""
        if cluster in PSEUDO_CLUSTERS:
            return service_labels(cluster)
        if index is not self._inbound_index:
            own, host = self._own, index.app_service
            if host:
                service, service_name, _ = service_labels(host)
            else:
                service = service_name = own.canonical_service
            self._inbound_index, self._inbound_labels = index, (service, service_name, own.namespace)
        return self._inbound_labels

    def _destination_labels(self, index, peer, service, metadata) -> tuple:
        """Peer labels on the inbound side: ``peer`` (a SPIFFE id, or None for plaintext) calls this
        workload, and announced ``metadata`` (a :class:`mesh.telemetry.peers.PeerMetadata`, or None);
        ``service`` is :meth:`_inbound_service`."""
        own = self._own
        own_identity = self._peers.own_identity() if peer else None
        service, service_name, service_namespace = service
        source = metadata or (UNKNOWN, namespace_of(peer) or UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
        workload, namespace, app, version, canonical_service, canonical_revision = source
        return ("destination",
                workload, namespace, peer or UNKNOWN, app, version, canonical_service, canonical_revision,
                own.workload, own.namespace, own_identity or UNKNOWN,
                service, service_name, service_namespace, own.app, own.version,
                own.canonical_service, own.canonical_revision,
                "mutual_tls" if peer else "none")
