"""Istio's metric labels as Datadog tags, worked out from what the plugin API shows.

``builtin.metrics`` labels ``istio_requests_total`` and friends from the
sidecar's internal tables; a plugin sees only :mod:`mesh.api`, so this module
derives the same labels from the sidecar's options (``--workload``,
``--namespace``, ``--label``) and, per request, from ``ctx.direction``,
``ctx.cluster``, ``ctx.peer``, ``ctx.host`` and the peer's workload metadata
(``ctx.extra["peer_metadata"]``, set by ``builtin.metadata_exchange`` when the
peer's identity was verified).  README.md lists where each tag comes from and
the few cases where it differs from the Prometheus label.

Each function here runs once per distinct request key (the plugin caches
its result), never once per request.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from .wire import tag

UNKNOWN = "unknown"
#: What the tags of the overflow context say in place of every value but ``reporter``.
OTHER = "other"
#: The key of the peer's workload metadata in ``ctx.extra`` (``builtin.metadata_exchange``).
PEER_METADATA = "peer_metadata"
#: The DNS suffix Kubernetes gives services; short Host headers are expanded with it, as the pods'
#: DNS search path does.
CLUSTER_DOMAIN = "svc.cluster.local"

#: Istio's request labels sent as tags, in Istio's order.  Left out: ``source_principal`` and
#: ``destination_principal`` (the workload tags already name both ends, and the upstream's proven
#: identity is not in the plugin API) and ``grpc_response_status`` (always empty in txmesh).
PEER_TAGS = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision",
    "destination_workload", "destination_workload_namespace",
    "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_app", "destination_version", "destination_canonical_service", "destination_canonical_revision",
    "connection_security_policy",
)
REQUEST_TAGS = PEER_TAGS + ("request_protocol", "response_code", "response_flags")
TCP_TAGS = PEER_TAGS + ("request_protocol", "response_flags")


class Workload(NamedTuple):
    """One end of a request: ``workload``, ``namespace``, ``app``, ``version``, ``canonical_service``,
    ``canonical_revision`` (the fields of the peer metadata sidecars exchange, in its order)."""

    workload: str
    namespace: str
    app: str
    version: str
    canonical_service: str
    canonical_revision: str


def _unknown_in(namespace) -> Workload:
    """A peer the sidecar knows nothing about but, maybe, its namespace."""
    return Workload(UNKNOWN, namespace or UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)


def own_workload(workload: str, namespace: str, labels: dict) -> Workload:
    """This sidecar's workload, from ``--workload``, ``--namespace`` and ``--label``: the canonical service
    and revision as Istio derives them (``service.istio.io/canonical-name``, else
    ``app.kubernetes.io/name``, else ``app``, else the workload; ``.../canonical-revision``, else
    ``app.kubernetes.io/version``, else ``version``, else ``latest``)."""
    return Workload(
        workload, namespace, labels.get("app", UNKNOWN), labels.get("version", UNKNOWN),
        (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
         or labels.get("app") or workload),
        (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
         or labels.get("version") or "latest"))


def service_labels(host) -> tuple[str, str, str]:
    """``(destination_service, destination_service_name, destination_service_namespace)`` of a host:
    ``name.namespace.svc.<domain>`` gives its name and namespace, any other host is its own name in an
    unknown namespace, None is unknown throughout."""
    if not host:
        return UNKNOWN, UNKNOWN, UNKNOWN
    name, _, rest = host.partition(".")
    namespace, _, domain = rest.partition(".")
    if namespace and domain.startswith("svc."):
        return host, name, namespace
    return host, host, UNKNOWN


def cluster_service(cluster) -> str | None:
    """The service a cluster sends to: ``HOST`` of Istio's ``outbound|PORT|SUBSET|HOST``; a cluster for
    traffic outside the registry (``PassthroughCluster``, ``BlackHoleCluster``) is its own service."""
    if not cluster:
        return None
    if cluster.startswith("outbound|"):
        return cluster.rsplit("|", 1)[1] or None
    return None if "|" in cluster else cluster


def inbound_service(host, namespace: str) -> str | None:
    """The service an inbound request's Host names, expanded as Kubernetes DNS would:
    ``reviews`` -> ``reviews.NAMESPACE.svc.cluster.local``, ``reviews.ns`` -> ``reviews.ns.svc.cluster.local``,
    ``reviews.ns.svc`` -> ``reviews.ns.svc.cluster.local``; other hosts as they are; an IP address or
    no host: None."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
    if len(parts) == 2:
        return f"{host}.{CLUSTER_DOMAIN}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{host}.{CLUSTER_DOMAIN[4:]}"
    return host


def namespace_of(principal) -> str | None:
    """The namespace of a SPIFFE id ``spiffe://TD/ns/NS/sa/SA``, or None."""
    parts = (principal or "").split("/")
    if len(parts) == 7 and parts[0] == "spiffe:" and parts[3] == "ns" and parts[5] == "sa" and parts[4]:
        return parts[4]
    return None


def peer_workload(metadata) -> Workload | None:
    """The peer metadata of ``ctx.extra`` as a :class:`Workload` (its six fields, in order), or None."""
    return None if metadata is None else Workload(*tuple(metadata)[:6])


def request_values(own: Workload, direction: str, cluster, peer, host, code: int, flags: str, metadata) -> tuple:
    """The values of :data:`REQUEST_TAGS` for one request key."""
    return peer_values(own, direction, cluster, peer, host, metadata) + ("http", str(code), flags or "-")


def tcp_values(own: Workload, direction: str, cluster, flags: str) -> tuple:
    """The values of :data:`TCP_TAGS` for a TCP passthrough connection: the (pseudo-)cluster is the
    destination service; the other end is unknown (no metadata crosses a TCP tunnel)."""
    if direction == "outbound":
        values = peer_values(own, direction, cluster, None, None, None)
    else:
        source = Workload(UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
        values = _values("destination", source, own, service_labels(cluster), "none")
    return values + ("tcp", flags or "-")


def peer_values(own: Workload, direction: str, cluster, peer, host, metadata) -> tuple:
    """The values of :data:`PEER_TAGS`: outbound, this workload calls ``cluster``'s service; inbound,
    ``peer`` (a SPIFFE id, None for plaintext) calls this workload by ``host``."""
    other = peer_workload(metadata)
    if direction == "outbound":
        service = service_labels(cluster_service(cluster))
        return _values("source", own, other or _unknown_in(service[2]), service, UNKNOWN)
    service = service_labels(inbound_service(host, own.namespace))
    source = other or _unknown_in(namespace_of(peer))
    return _values("destination", source, own, service, "mutual_tls" if peer else "none")


def _values(reporter: str, source: Workload, destination: Workload, service: tuple, security: str) -> tuple:
    return (reporter, *source, destination.workload, destination.namespace, *service, *destination[2:], security)


def tag_text(names: tuple, values: tuple, constant: tuple = ()) -> str:
    """The tag text of one context: ``name:value`` pairs in order, then the constant tags."""
    return ",".join([tag(name, value) for name, value in zip(names, values)] + list(constant))


def overflow_values(names: tuple, reporter: str, protocol: str) -> tuple:
    """The values of the overflow context of ``reporter``: ``other`` everywhere but ``reporter`` and
    ``request_protocol``."""
    fixed = {"reporter": reporter, "request_protocol": protocol}
    return tuple(fixed.get(name, OTHER) for name in names)
