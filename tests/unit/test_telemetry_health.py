"""mesh_* health metrics of the sidecar and mesh_control_* of the control plane, read at scrape time."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor

from mesh.identity.tls import CredentialStore
from mesh.proxy.mirror import MirrorStats
from mesh.telemetry.control import ControlPlaneMetrics
from mesh.telemetry.exposition import MetricsServer, new_registry
from mesh.telemetry.health import ProxyHealth
from tests.unit.test_telemetry_support import (
    INBOUND_CLUSTER,
    REVIEWS,
    REVIEWS_CLUSTER,
    REVIEWS_V1,
    control_like,
    proxy_like,
)


class Connection:
    """What a pool needs of an UpstreamConnection that just connected."""

    def __init__(self):
        self.factory = SimpleNamespace(deferred=Deferred())


def scrape(registry) -> dict:
    """``{sample name: {frozenset(labels): value}}``."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def health(proxy) -> dict:
    registry = new_registry()
    registry.register(ProxyHealth(proxy))
    return scrape(registry)


def endpoint(proxy, cluster, host_port):
    return next(e for e in proxy.runtime.snapshot.clusters[cluster].endpoints if e.host_port == host_port)


def by_cluster(samples, name, cluster):
    return samples[name][frozenset({("cluster", cluster)})]


def test_live_state_of_clusters_config_and_certificate():
    proxy = proxy_like()
    reviews_v1 = endpoint(proxy, REVIEWS_CLUSTER, REVIEWS_V1)
    for _ in range(2):
        reviews_v1.pool.connection_made(Connection())
    reviews_v1.active_requests = 3
    reviews_v1.eject(proxy.reactor.seconds() + 30.0)
    samples = health(proxy)
    assert by_cluster(samples, "mesh_upstream_cx_active", REVIEWS_CLUSTER) == 2
    assert by_cluster(samples, "mesh_upstream_cx_opened_total", REVIEWS_CLUSTER) == 2
    assert by_cluster(samples, "mesh_upstream_rq_active", REVIEWS_CLUSTER) == 3
    assert by_cluster(samples, "mesh_outlier_ejections_total", REVIEWS_CLUSTER) == 1
    assert by_cluster(samples, "mesh_outlier_ejected_endpoints", REVIEWS_CLUSTER) == 1
    assert by_cluster(samples, "mesh_upstream_cx_active", INBOUND_CLUSTER) == 0
    # the v1 subset's cluster shares the endpoint, so it counts there too
    assert by_cluster(samples, "mesh_upstream_cx_opened_total", f"outbound|9080|v1|{REVIEWS}") == 2
    assert samples["mesh_downstream_cx_active"] == {frozenset({("listener", "outbound")}): 2,
                                                    frozenset({("listener", "inbound")}): 0}
    outbound = frozenset({("listener", "outbound")})
    assert samples["mesh_downstream_cx_limit"][outbound] == 4096
    assert samples["mesh_downstream_cx_overloaded"][outbound] == 0
    assert samples["mesh_downstream_cx_overload_closed_total"][outbound] == 0
    assert samples["mesh_downstream_cx_overflow_total"][outbound] == 0
    [(labels, value)] = samples["mesh_config_info"].items()
    assert dict(labels) == {"version": proxy.runtime.snapshot.config.version} and value == 1
    assert samples["mesh_config_age_seconds"] == {frozenset(): 10.0}
    assert samples["mesh_workload_cert_expiry_seconds"] == {frozenset(): 7200.0}
    proxy.reactor.advance(31.0)
    assert by_cluster(health(proxy), "mesh_outlier_ejected_endpoints", REVIEWS_CLUSTER) == 0


def test_no_certificate_and_no_config_yet_are_absent_not_zero():
    proxy = proxy_like()
    proxy.credentials = CredentialStore()
    proxy.config_applied_at = None
    samples = health(proxy)
    assert "mesh_workload_cert_expiry_seconds" not in samples and "mesh_config_age_seconds" not in samples


def test_mirror_copies_by_result_sent_and_in_flight():
    proxy = proxy_like()
    stats = proxy.mirror_stats = MirrorStats(sent=7, completed=5, failed=1, abandoned=3, in_flight=2)
    samples = health(proxy)
    assert samples["mesh_mirror_requests_total"] == {frozenset({("result", "completed")}): 5,
                                                      frozenset({("result", "failed")}): 1,
                                                      frozenset({("result", "abandoned")}): 3}
    assert samples["mesh_mirror_requests_sent_total"] == {frozenset(): 7}
    assert samples["mesh_mirror_requests_active"] == {frozenset(): 2}
    stats.in_flight -= 1
    stats.completed += 1  # read live at each scrape
    samples = health(proxy)
    assert samples["mesh_mirror_requests_active"] == {frozenset(): 1}
    assert samples["mesh_mirror_requests_total"][frozenset({("result", "completed")})] == 6


def test_control_plane_metrics():
    metrics = ControlPlaneMetrics(control_like())
    metrics.connected_proxies.set(4)
    metrics.pushes.inc()
    metrics.push_duration.observe(0.2)
    samples = scrape(metrics.registry)
    assert samples["mesh_control_csr_signed_total"] == {frozenset(): 5}
    assert samples["mesh_control_csr_rejected_total"] == {frozenset({("reason", "credential rejected")}): 2,
                                                          frozenset({("reason", "CSR rejected")}): 1}
    assert samples["mesh_control_config_errors"] == {frozenset({("kind", "VirtualService")}): 2,
                                                     frozenset({("kind", "yaml")}): 1}
    assert samples["mesh_control_ca_cert_expiry_seconds"] == {frozenset(): 86400.0}
    assert samples["mesh_control_connected_proxies"] == {frozenset(): 4}
    assert samples["mesh_control_pushes_total"] == {frozenset(): 1}
    assert samples["mesh_control_push_duration_seconds_bucket"][frozenset({("le", "0.5")})] == 1
    assert "mesh_control_nacks_total" in samples
    assert not any(name.endswith("_created") for name in samples)


def test_a_busy_metrics_port_is_logged_and_the_sidecar_keeps_running():
    class Busy(MemoryReactor):
        def listenTCP(self, port, factory, backlog=50, interface=""):
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    server = MetricsServer(Busy(), new_registry(), 15090, "0.0.0.0")
    server.startService()  # must not raise
    assert server.stopService() is None
    reactor = MemoryReactor()
    server = MetricsServer(reactor, new_registry(), 15090, "10.0.0.5")
    server.startService()
    [(port, _, _, interface)] = reactor.tcpServers
    assert (port, interface) == (15090, "10.0.0.5")
