"""The sidecar's telemetry, wired into a :class:`mesh.proxy.service.ProxyService`.

The request-level parts are plugins registered by name, so that
``--disable-plugin builtin.metrics``, ``builtin.accesslog`` or ``builtin.tap``
(the admin port's ``/tap``) leaves them out like any other plugin; the first
two also observe the TCP passthrough connections
(:class:`mesh.proxy.passthrough.Passthrough`), only when enabled.  Each sidecar
process has its own ``CollectorRegistry`` (not prometheus-client's global
one); one process is one sidecar, so prometheus-client's multiprocess mode is
not needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.telemetry.accesslog import AccessLog, open_destination
from mesh.telemetry.exposition import MetricsServer, new_registry
from mesh.telemetry.health import ProxyHealth
from mesh.telemetry.istio import IstioMetrics
from mesh.telemetry.peers import PeerDirectory
from mesh.telemetry.tap_stream import TapHub, TapPage

METRICS_PLUGIN = "builtin.metrics"
ACCESS_LOG_PLUGIN = "builtin.accesslog"
TAP_PLUGIN = "builtin.tap"


@dataclass(frozen=True)
class TelemetrySettings:
    """``--metrics-port`` (0: no metrics at all) and ``--access-log`` (``stdout``, ``log``, ``off`` or a file path;
    see :func:`mesh.telemetry.accesslog.open_destination`)."""

    metrics_port: int = 15090
    access_log: str = "stdout"


def install(proxy) -> None:
    """Register the telemetry plugins and add their services to ``proxy``.

    Metrics are served on the inbound listener's address, as Istio serves
    15090 on every address of the pod.
    """
    settings = proxy.settings.telemetry
    plugins = proxy.plugins
    peers = PeerDirectory(proxy.runtime, proxy.credentials)
    if settings.metrics_port:
        registry = new_registry()
        registry.register(ProxyHealth(proxy))
        if not plugins.is_blocked(METRICS_PLUGIN):
            metrics = IstioMetrics(proxy.settings.workload, peers)
            plugins.register(metrics, name=METRICS_PLUGIN)
            registry.register(metrics)
            _observe_tcp(proxy, metrics.tcp_connection)
        MetricsServer(proxy.reactor, registry, settings.metrics_port,
                      proxy.settings.inbound_address).setServiceParent(proxy)
    if settings.access_log != "off" and not plugins.is_blocked(ACCESS_LOG_PLUGIN):
        access_log = AccessLog(proxy.reactor, open_destination(settings.access_log), peers)
        plugins.register(access_log, name=ACCESS_LOG_PLUGIN)
        access_log.setServiceParent(proxy)
        _observe_tcp(proxy, access_log.tcp_connection)
    if not plugins.is_blocked(TAP_PLUGIN):
        tap = TapHub(proxy.reactor)
        plugins.register(tap, name=TAP_PLUGIN)
        proxy.admin_site.add_page(b"tap", TapPage(tap))


def _observe_tcp(proxy, observer) -> None:
    """Give ``observer`` the TCP passthrough connections of every listener that has them."""
    for listener in proxy.listeners:
        if listener.passthrough is not None:
            listener.passthrough.observers.append(observer)
