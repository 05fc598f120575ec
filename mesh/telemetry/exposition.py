"""The HTTP endpoints Prometheus scrapes.

Metrics are rendered on the reactor thread, so that collectors read live
proxy state without locks (prometheus-client's own Twisted resource renders in
a thread pool).  A scrape of a few thousand series takes a few milliseconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource

from mesh.webpages import BytesPage, LimitedSite, OptionalServer, SiteLimits


def new_registry() -> CollectorRegistry:
    """A registry of this process's own (never prometheus-client's global one).

    It also turns off prometheus-client's ``*_created`` series, which would
    double the series of every counter and histogram; Envoy and Istio have
    none.  That switch is process-wide, and each txmesh process (one sidecar,
    or the control plane) owns its process.
    """
    disable_created_metrics()
    return CollectorRegistry()


def metrics_page(registry) -> resource.Resource:
    """A page serving ``registry`` in Prometheus's text format."""
    return BytesPage(lambda: generate_latest(registry), CONTENT_TYPE_LATEST.encode())


class MetricsServer(OptionalServer):
    """Serves ``registry`` at ``/stats/prometheus`` on ``interface:port`` (the sidecar's 15090).

    A port that is already taken is logged as an error and the sidecar keeps
    serving traffic: metrics are not the data path.  Other hosts reach it, so
    it has the health port's :class:`~mesh.webpages.SiteLimits` (32
    connections, 8 KiB per request, 10 s for a request to arrive, 30 s idle).
    """

    def __init__(self, reactor, registry, port: int, interface: str):
        root = resource.Resource()
        stats = resource.Resource()
        root.putChild(b"stats", stats)
        stats.putChild(b"prometheus", metrics_page(registry))
        super().__init__(reactor, LimitedSite(root, SiteLimits(), reactor=reactor), port, interface, "metrics",
                         "--metrics-port")
