"""The sidecar's metrics port, and the telemetry settings of its command line.

The request-level telemetry is made of plugins of :data:`mesh.plugins.DEFAULT_PLUGINS`
(:mod:`mesh.builtin.telemetry`): ``builtin.tracing``, ``builtin.metadata_exchange``
(the workload metadata sidecars exchange, :mod:`mesh.telemetry.metadata_exchange`),
``builtin.metrics``, ``builtin.accesslog`` and ``builtin.tap`` (the admin
port's ``/tap``), so ``--disable-plugin NAME`` leaves any of them out like
any other plugin.  Metrics and the access log also count and log the TCP
passthrough connections, through ``mesh_connection_open``/``_complete``.

Each sidecar process has its own ``CollectorRegistry`` (not
prometheus-client's global one), served by :func:`serve_metrics`; one process
is one sidecar, so prometheus-client's multiprocess mode is not needed.  With
``--workers N`` each worker serves its registry on its private admin port and
the parent merges them on the metrics port (:mod:`mesh.proxy.workers`).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.web import resource

from mesh.sidecar_contract import METRICS_PORT
from mesh.telemetry.exposition import MetricsServer, metrics_page, new_registry
from mesh.telemetry.health import ProxyHealth


@dataclass(frozen=True)
class TelemetrySettings:
    """``--metrics-port`` (0: no metrics at all) and ``--access-log`` (``stdout``, ``log``, ``off`` or a file path;
    see :func:`mesh.telemetry.accesslog.open_destination`)."""

    metrics_port: int = METRICS_PORT
    access_log: str = "stdout"


def serve_metrics(proxy):
    """Serve ``/stats/prometheus`` for ``proxy`` (a child service) and return its registry; None with
    ``--metrics-port 0``.

    The registry holds the sidecar's health metrics; ``builtin.metrics`` adds
    Istio's.  Metrics are served on the inbound listener's address, as Istio
    serves 15090 on every address of the pod.
    """
    port = proxy.settings.telemetry.metrics_port
    if not port:
        return None
    registry = new_registry()
    registry.register(ProxyHealth(proxy))
    if proxy.settings.worker is not None:  # one of --workers N: the parent serves the port, merging the workers'
        stats = resource.Resource()
        stats.putChild(b"prometheus", metrics_page(registry))
        proxy.admin_site.add_page(b"stats", stats)
    else:
        MetricsServer(proxy.reactor, registry, port, proxy.settings.inbound_address).setServiceParent(proxy)
    return registry
