"""Built-in telemetry plugins of the sidecar: tracing, metrics, access log, ``/tap``, metadata exchange.

Each plugin is one of the telemetry objects of :mod:`mesh.telemetry`, made
without arguments when :data:`mesh.plugins.DEFAULT_PLUGINS` is registered and
set up in ``mesh_configure`` (``super().__init__`` with the sidecar's
settings and collaborators), so its per-request hooks are the telemetry
object's own methods: being a plugin costs nothing per request.

In ``mesh-control``, and where the options turn a feature off
(``--metrics-port 0``, ``--access-log off``), the plugin stays idle
(:meth:`mesh.api.Config.set_idle`): none of its hooks is called.
``--disable-plugin NAME`` leaves it out altogether.

The sidecar (``config.service``, a :class:`mesh.proxy.service.ProxyService`)
provides what they use: ``settings``, ``runtime`` and ``credentials`` (for
the :class:`~mesh.telemetry.peers.PeerDirectory` they share),
``metrics_registry`` (None without a metrics port), ``admin_site``,
``listeners`` and ``workload_address()``.
"""

from __future__ import annotations

from mesh import hookimpl
from mesh.telemetry.accesslog import AccessLog, open_destination
from mesh.telemetry.istio import IstioMetrics
from mesh.telemetry.metadata_exchange import MetadataExchange
from mesh.telemetry.peers import PeerDirectory
from mesh.telemetry.tap_stream import TapHub, TapPage
from mesh.telemetry.tracing import Tracer

_PEERS = "builtin.telemetry.peers"


def _sidecar(plugin, config):
    """The :class:`~mesh.proxy.service.ProxyService` of a sidecar's ``config``; elsewhere None, and
    ``plugin`` is idle."""
    if config.role != "proxy":
        config.set_idle(plugin, "sidecars only")
        return None
    return config.service


def _peers(config) -> PeerDirectory:
    """The sidecar's one :class:`PeerDirectory`, shared by the plugins through ``config.stash``."""
    peers = config.stash.get(_PEERS)
    if peers is None:
        proxy = config.service
        peers = config.stash[_PEERS] = PeerDirectory(proxy.runtime, proxy.credentials)
    return peers


class TracingPlugin(Tracer):
    """``builtin.tracing``: one span per hop (:mod:`mesh.telemetry.tracing`); with ``--zipkin-url``, its
    exporter is a child service of the sidecar (it flushes while it runs, and once more when it stops)."""

    def __init__(self):
        """Set up in :meth:`mesh_configure`."""

    @hookimpl
    def mesh_configure(self, config):
        proxy = _sidecar(self, config)
        if proxy is None:
            return
        settings = proxy.settings.tracing
        exporter = None
        if settings.zipkin_url:
            from mesh.telemetry.zipkin import ZipkinExporter

            exporter = ZipkinExporter(config.reactor, settings.zipkin_url, max_queue=settings.zipkin_max_queue)
            exporter.setServiceParent(proxy)
        super().__init__(proxy.settings.workload, proxy.workload_address(), settings.sampling, exporter)


class MetricsPlugin(IstioMetrics):
    """``builtin.metrics``: Istio's request and TCP metrics (:mod:`mesh.telemetry.istio`) on the sidecar's
    ``/stats/prometheus``; idle with ``--metrics-port 0``."""

    def __init__(self):
        """Set up in :meth:`mesh_configure`."""
        self._registry = None

    @hookimpl
    def mesh_configure(self, config):
        proxy = _sidecar(self, config)
        if proxy is None:
            return
        if proxy.metrics_registry is None:
            config.set_idle(self, "--metrics-port 0")
            return
        super().__init__(proxy.settings.workload, _peers(config))
        self._registry = proxy.metrics_registry
        self._registry.register(self)

    @hookimpl
    def mesh_unconfigure(self, config):
        self._registry.unregister(self)


class AccessLogPlugin(AccessLog):
    """``builtin.accesslog``: a JSON line per request and per TCP passthrough connection
    (:mod:`mesh.telemetry.accesslog`), written by a child service of the sidecar (which closes the
    file when it stops); idle with ``--access-log off``."""

    def __init__(self):
        """Set up in :meth:`mesh_configure`."""

    @hookimpl
    def mesh_configure(self, config):
        proxy = _sidecar(self, config)
        if proxy is None:
            return
        destination = proxy.settings.telemetry.access_log
        if destination == "off":
            config.set_idle(self, "--access-log off")
            return
        super().__init__(config.reactor, open_destination(destination), _peers(config), proxy.settings.workload)
        self.setServiceParent(proxy)


class TapPlugin(TapHub):
    """``builtin.tap``: live requests streamed from the admin port's ``/tap`` to ``meshctl tap``
    (:mod:`mesh.telemetry.tap_stream`)."""

    def __init__(self):
        """Set up in :meth:`mesh_configure`."""

    @hookimpl
    def mesh_configure(self, config):
        proxy = _sidecar(self, config)
        if proxy is None:
            return
        super().__init__(config.reactor)
        proxy.admin_site.add_page(b"tap", TapPage(self))


class MetadataExchangePlugin(MetadataExchange):
    """``builtin.metadata_exchange``: sidecars tell each other which workload they serve
    (:mod:`mesh.telemetry.metadata_exchange`)."""

    def __init__(self):
        """Set up in :meth:`mesh_configure`."""

    @hookimpl
    def mesh_configure(self, config):
        proxy = _sidecar(self, config)
        if proxy is None:
            return
        super().__init__(proxy.settings.workload, _peers(config))
