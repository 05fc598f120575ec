"""The control plane's metrics (``mesh_control_*``), served on its admin port at ``/metrics``.

CA and CSR figures and config validation errors are read from the
:class:`mesh.control.service.ControlService` at scrape time.  The config
distribution instruments (connected proxies, pushes, push latency, NACKs) are
created here and updated by :class:`mesh.control.distribution.Distributor`.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mesh.telemetry.exposition import new_registry

#: Push latency buckets (seconds), as Istio's ``pilot_proxy_convergence_time``.
PUSH_BUCKETS = (0.1, 0.5, 1, 3, 5, 10, 20, 30)
#: CSR signing latency buckets (seconds): the built-in CA signs in about a millisecond, an external CA
#: (Vault, AWS PCA) takes a round trip or several.
CSR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ControlPlaneMetrics:
    """The control plane's registry and its distribution instruments (for the Distributor).

    - ``connected_proxies``: ``set()`` as proxies connect and disconnect
    - ``pushes``: ``inc()`` per snapshot pushed to a proxy
    - ``push_duration``: ``observe()`` seconds from a config change to the proxy's ACK
    - ``nacks``: ``inc()`` per NACK received

    and the CA's, by CA name (``--ca``), updated by the control service:

    - ``ca_ready{ca}``: 1 while the selected CA can sign, else 0
    - ``ca_csr{ca,result}``: CSRs by result (``signed``, ``unavailable``, ``rejected``, ``error``)
    - ``ca_csr_duration{ca}``: seconds the CA took to sign a CSR, or to fail
    """

    def __init__(self, control):
        self.registry = new_registry()
        self.connected_proxies = Gauge("mesh_control_connected_proxies", "Proxies connected for config.",
                                       registry=self.registry)
        self.pushes = Counter("mesh_control_pushes_total", "Config snapshots pushed to proxies.",
                              registry=self.registry)
        self.push_duration = Histogram("mesh_control_push_duration_seconds",
                                       "Seconds from a config change to the proxy's ACK.", buckets=PUSH_BUCKETS,
                                       registry=self.registry)
        self.nacks = Counter("mesh_control_nacks_total", "Config snapshots proxies rejected (NACK).",
                             registry=self.registry)
        self.ca_ready = Gauge("mesh_ca_ready", "1 while the CA --ca selected can sign, else 0.", ("ca",),
                              registry=self.registry)
        self.ca_csr = Counter("mesh_ca_csr", "Workload CSRs by CA and result: signed, unavailable (503: the CA or "
                              "the credential check cannot answer now), rejected (4xx), error (500).",
                              ("ca", "result"), registry=self.registry)
        self.ca_csr_duration = Histogram("mesh_ca_csr_duration_seconds", "Seconds the CA took to sign a workload "
                                         "CSR (or to fail).", ("ca",), buckets=CSR_BUCKETS, registry=self.registry)
        self.registry.register(ControlState(control))


class ControlState(Collector):
    """Collector of the CA, the CSR counters and the config validation result of a control service.

    Reads ``control.ca.expires_in()``, ``control.stats`` (a
    :class:`mesh.control.service.CSRStats`) and ``control.config_errors``
    (the config store's :class:`mesh.config.errors.ConfigError` objects;
    ``kind`` None is a YAML problem, reported as kind ``yaml``).
    """

    def __init__(self, control):
        self._control = control

    def collect(self):
        control = self._control
        stats = control.stats
        yield CounterMetricFamily("mesh_control_csr_signed", "Workload CSRs signed.", value=stats.signed_total)
        rejected = CounterMetricFamily("mesh_control_csr_rejected", "Workload CSRs rejected, by reason.",
                                       labels=("reason",))
        for reason, count in sorted(stats.rejected_total.items()):
            rejected.add_metric((reason,), count)
        yield rejected
        errors = GaugeMetricFamily("mesh_control_config_errors",
                                   "Config problems in force (rejected resources), by resource kind.",
                                   labels=("kind",))
        by_kind = {}
        for error in control.config_errors:
            kind = error.kind or "yaml"
            by_kind[kind] = by_kind.get(kind, 0) + 1
        for kind, count in sorted(by_kind.items()):
            errors.add_metric((kind,), count)
        yield errors
        yield GaugeMetricFamily("mesh_control_ca_cert_expiry_seconds",
                                "Seconds until the CA's signing certificate expires.", value=control.ca.expires_in())
