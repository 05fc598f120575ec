"""What a sidecar knows about the other side of a request.

Telemetry labels and log fields name the peer of each request: the endpoint's
identity and labels on outbound, the caller's SPIFFE id on inbound, the mesh
service either way.  :class:`PeerDirectory` answers from indexes built once
per applied config snapshot, so a request costs an identity check and a dict
lookup, never a walk over the config.
"""

from __future__ import annotations

from typing import NamedTuple

from mesh.config.tables import BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER
from mesh.identity.spiffe import InvalidSpiffeId, SpiffeId

UNKNOWN = "unknown"
#: The key of the peer's :class:`PeerMetadata` in ``ctx.extra``, set by ``builtin.metadata_exchange``
#: (:mod:`mesh.telemetry.metadata_exchange`) only when the peer's identity was verified.
PEER_METADATA = "peer_metadata"

#: Istio's clusters for traffic outside the registry: each is its own ``destination_service``
#: and ``destination_service_name``.
PSEUDO_CLUSTERS = {name: name for name in (PASSTHROUGH_CLUSTER, BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER)}


class PeerMetadata(NamedTuple):
    """A sidecar's workload, as it announces itself to its peers (``unknown`` where it has no such label)."""

    workload: str
    namespace: str
    app: str
    version: str
    canonical_service: str
    canonical_revision: str


class PeerDirectory:
    """Peer information for the config in force and this workload's own identity.

    :param runtime: the :class:`mesh.proxy.runtime.ProxyRuntime` (its
        ``snapshot`` is swapped atomically on every config change).
    :param credentials: the :class:`mesh.identity.tls.CredentialStore` of the
        workload certificate.
    """

    def __init__(self, runtime, credentials):
        self.runtime = runtime
        self._credentials = credentials
        self._snapshot = None
        self._index = SnapshotIndex(None)
        self._own_credentials = None
        self._own_identity = None

    def index(self) -> SnapshotIndex:
        """The index of the snapshot in force (rebuilt after a config swap)."""
        snapshot = self.runtime.snapshot
        if snapshot is not self._snapshot:
            self._index = SnapshotIndex(snapshot)
            self._snapshot = snapshot
        return self._index

    def own_identity(self):
        """This workload's SPIFFE id, or None before it has a certificate (cached per certificate)."""
        current = self._credentials.current
        if current is not self._own_credentials:
            self._own_identity = current.identity if current is not None else None
            self._own_credentials = current
        return self._own_identity


class SnapshotIndex:
    """Lookups over one config snapshot: endpoints by address, services by cluster."""

    def __init__(self, snapshot):
        clusters = snapshot.clusters if snapshot is not None else {}
        self.endpoints = {(name, endpoint.host_port): endpoint.spec
                          for name, cluster in clusters.items() for endpoint in cluster.endpoints}
        self.services = {name: cluster.spec.service for name, cluster in clusters.items()
                         if name.startswith("outbound|")}
        self.services.update(PSEUDO_CLUSTERS)
        #: the host of the service the workload serves (``ProxyConfig.app_service``), or None
        self.app_service = getattr(getattr(snapshot, "config", None), "app_service", None)
        #: Clusters whose every endpoint is a sidecar reached over mTLS (each has an expected identity).
        self.mtls_clusters = frozenset(
            name for name, cluster in clusters.items()
            if cluster.endpoints and all(endpoint.spec.identity for endpoint in cluster.endpoints))

    def endpoint(self, cluster, host_port):
        """The :class:`mesh.config.tables.EndpointSpec` a request went to, or None."""
        return self.endpoints.get((cluster, host_port))


def service_labels(host) -> tuple:
    """``(destination_service, destination_service_name, destination_service_namespace)`` of a host.

    ``name.namespace.svc.<domain>`` gives its name and namespace, as in Istio;
    any other host (a ServiceEntry's ``api.example.com``) is its own name, in
    an unknown namespace.  None (no route, no service) is unknown throughout.
    """
    if not host:
        return UNKNOWN, UNKNOWN, UNKNOWN
    name, _, rest = host.partition(".")
    namespace, _, domain = rest.partition(".")
    if namespace and domain.startswith("svc."):
        return host, name, namespace
    return host, host, UNKNOWN


def canonical_names(labels, workload) -> tuple:
    """``(canonical service, canonical revision)`` of a workload with ``labels``, as Istio derives them.

    The service is ``service.istio.io/canonical-name``, else ``app.kubernetes.io/name``, else ``app``,
    else ``workload``; the revision ``service.istio.io/canonical-revision``, else
    ``app.kubernetes.io/version``, else ``version``, else ``latest``.
    """
    return ((labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
             or labels.get("app") or workload),
            (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
             or labels.get("version") or "latest"))


def workload_metadata(workload) -> PeerMetadata:
    """The metadata of ``workload`` (a :class:`mesh.config.compile.Workload`): what it tells its peers."""
    labels = workload.labels or {}
    service, revision = canonical_names(labels, workload.name)
    return PeerMetadata(workload.name, workload.namespace, labels.get("app", UNKNOWN), labels.get("version", UNKNOWN),
                        service, revision)


def namespace_of(principal):
    """The namespace in a SPIFFE id, or None."""
    if not principal:
        return None
    try:
        return SpiffeId.parse(principal).namespace
    except InvalidSpiffeId:
        return None


class ConfigCache:
    """A bounded cache of values worked out from the config in force, keyed by a small tuple.

    ``build(key, index)`` makes the value of a new key from the
    :class:`SnapshotIndex`; the cache starts over when the config changes
    (labels and identities may have changed) and when it holds ``size`` keys.
    """

    def __init__(self, peers: PeerDirectory, build, size: int = 4096):
        self._peers = peers
        self._runtime = peers.runtime
        self._build = build
        self._size = size
        self._values = {}
        self._snapshot = None

    def get(self, key):
        snapshot = self._runtime.snapshot
        if snapshot is not self._snapshot:
            self._values.clear()
            self._snapshot = snapshot
        value = self._values.get(key)
        if value is None:
            if len(self._values) >= self._size:
                self._values.clear()
            value = self._values[key] = self._build(key, self._peers.index())
        return value
