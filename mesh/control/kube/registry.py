"""The Kubernetes service registry as a config source (``kubernetes:registry``).

Watches Services, EndpointSlices (discovery.k8s.io/v1) and Pods in every
namespace (:mod:`mesh.control.kube.watch`) and publishes, after every change
(coalesced), the ServiceEntry documents :mod:`mesh.control.kube.translate` makes of
them.  Each document's "file" in errors is the Service it came from
(``kubernetes:services/NS/NAME``).
"""

from __future__ import annotations

from twisted.logger import Logger

from mesh.config.loader import LoadResult, load_documents
from mesh.control.kube.source import WatchedSource
from mesh.control.kube.translate import portless_external_names, service_entries

log = Logger()


class RegistrySource(WatchedSource):
    """Services + EndpointSlices + Pods -> ServiceEntries, as an IConfigSource."""

    name = "kubernetes:registry"

    def __init__(self, reactor, api_client, **kwargs):
        from kubernetes import client

        core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        super().__init__(reactor, {"services": core.list_service_for_all_namespaces,
                                   "endpointslices": discovery.list_endpoint_slice_for_all_namespaces,
                                   "pods": core.list_pod_for_all_namespaces}, **kwargs)
        self._portless = set()  # the ExternalName Services without a TCP port already logged

    def translate(self) -> LoadResult:
        pairs = service_entries(self.caches["services"].values(), self.caches["endpointslices"].values(),
                                self.caches["pods"].values())
        portless = set(portless_external_names(self.caches["services"].values()))
        for origin, external in sorted(portless - self._portless):
            log.info("{origin}: ExternalName Service without a TCP port: no ServiceEntry, so the sidecars "
                     "treat its traffic as to an unknown destination (passthrough to what {external} resolves to "
                     "under ALLOW_ANY), as Istio does; give it ports to route it through the mesh",
                     origin=origin, external=external)
        self._portless = portless
        return load_documents([document for _, document in pairs], self.name,
                              names=[origin for origin, _ in pairs])
