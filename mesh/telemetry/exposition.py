"""The HTTP endpoints Prometheus scrapes.

Metrics are rendered on the reactor thread, so that collectors read live
proxy state without locks (prometheus-client's own Twisted resource renders in
a thread pool).  A scrape of a few thousand series takes a few milliseconds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web import resource

from mesh.webpages import BytesPage, QuietSite

log = Logger()


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


class MetricsServer(service.Service):
    """Serves ``registry`` at ``/stats/prometheus`` on ``interface:port`` (the sidecar's 15090).

    A port that is already taken is logged as an error and the sidecar keeps
    serving traffic: metrics are not the data path.
    """

    def __init__(self, reactor, registry, port: int, interface: str):
        root = resource.Resource()
        stats = resource.Resource()
        root.putChild(b"stats", stats)
        stats.putChild(b"prometheus", metrics_page(registry))
        self._site = QuietSite(root, timeout=30)
        self._reactor = reactor
        self._address = (port, interface)
        self._listening = None

    def startService(self):
        super().startService()
        port, interface = self._address
        try:
            self._listening = self._reactor.listenTCP(port, self._site, interface=interface)
        except CannotListenError as error:
            log.error("metrics are not served: cannot listen on {interface}:{port} ({reason}); "
                      "give each sidecar on this host its own --metrics-port (0 turns metrics off)",
                      interface=interface, port=port, reason=error.socketError)

    def stopService(self):
        super().stopService()
        if self._listening is not None:
            listening, self._listening = self._listening, None
            return listening.stopListening()
        return None
