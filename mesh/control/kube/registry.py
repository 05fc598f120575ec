"""The Kubernetes service registry as a config source (``kubernetes:registry``).

Watches Services, EndpointSlices (discovery.k8s.io/v1) and Pods in every
namespace (:mod:`mesh.control.kube.watch`) and publishes, after every change
(coalesced), the ServiceEntry documents :mod:`mesh.control.kube.translate` makes of
them.  Each document's "file" in errors is the Service it came from
(``kubernetes:services/NS/NAME``).
"""

from __future__ import annotations

from mesh.config.loader import LoadResult, load_documents
from mesh.control.kube.source import WatchedSource
from mesh.control.kube.translate import service_entries


class RegistrySource(WatchedSource):
    """Services + EndpointSlices + Pods -> ServiceEntries, as an IConfigSource."""

    name = "kubernetes:registry"

    def __init__(self, reactor, api_client, **kwargs):
        from kubernetes import client

        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        super().__init__(reactor, {"services": core.list_service_for_all_namespaces,
                                   "endpointslices": discovery.list_endpoint_slice_for_all_namespaces,
                                   "pods": core.list_pod_for_all_namespaces}, **kwargs)

    def translate(self) -> LoadResult:
        pairs = service_entries(self.caches["services"].values(), self.caches["endpointslices"].values(),
                                self.caches["pods"].values())
        return load_documents([document for _, document in pairs], self.name,
                              names=[origin for origin, _ in pairs])
