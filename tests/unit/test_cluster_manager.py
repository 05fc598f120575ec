"""ClusterManager: which clusters share an endpoint (and its connection pool), and what a config push keeps.

Real :class:`~mesh.proxy.pool.ConnectionPool` objects on a :class:`~twisted.internet.task.Clock` (no
connection is made); the sidecar builds them the same way (``ProxyService._make_pool``).  The effect on
real connections is in tests/integration/test_tcp_keepalive.py.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.task import Clock

from mesh.config.tables import ClusterSpec, EndpointSpec, TcpKeepalive
from mesh.proxy.clusters import ClusterManager
from mesh.proxy.pool import ConnectionPool, PoolSettings

ENDPOINT = EndpointSpec("127.0.0.1", 8000, labels=(("version", "v1"),))
BASE = ClusterSpec("outbound|80||a.default.svc.cluster.local", "a.default.svc.cluster.local", 80,
                   endpoints=(ENDPOINT,))
V1 = replace(BASE, name="outbound|80|v1|a.default.svc.cluster.local", subset="v1")


def manager() -> ClusterManager:
    clock = Clock()
    return ClusterManager(lambda endpoint, cluster: ConnectionPool(clock, endpoint.address, endpoint.port,
                                                                   PoolSettings.of(cluster)))


def endpoint_of(clusters, spec):
    [endpoint] = clusters[spec.name].endpoints
    return endpoint


def test_a_service_and_its_subset_share_the_endpoint_when_their_settings_agree():
    clusters = manager().update({BASE.name: BASE, V1.name: V1})
    assert endpoint_of(clusters, BASE) is endpoint_of(clusters, V1)


def test_a_subset_with_its_own_connection_pool_settings_gets_a_pool_that_follows_them():
    """A subset's trafficPolicy.connectionPool once lost to the service's: the endpoint (and its pool) was
    shared, built with whichever cluster came first."""
    v1 = replace(V1, idle_timeout=5.0, max_requests_per_connection=1, tcp_keepalive=TcpKeepalive(time=7))
    clusters = manager().update({BASE.name: BASE, v1.name: v1})
    base_pool, v1_pool = endpoint_of(clusters, BASE).pool, endpoint_of(clusters, v1).pool
    assert (base_pool.idle_timeout, base_pool.max_requests_per_connection, base_pool.keepalive) == (3600.0, 0, None)
    assert (v1_pool.idle_timeout, v1_pool.max_requests_per_connection, v1_pool.keepalive) == (
        5.0, 1, TcpKeepalive(time=7))


def test_a_push_that_changes_the_settings_keeps_the_endpoint_and_reconfigures_its_pool():
    """A DestinationRule edit once left live endpoints' pools with the settings they were built with."""
    clusters_manager = manager()
    before = endpoint_of(clusters_manager.update({BASE.name: BASE}), BASE)
    before.eject(until=1e12)  # its health must survive the push
    changed = replace(BASE, connect_timeout=2.5, idle_timeout=60.0, max_concurrent_streams=8,
                      tcp_keepalive=TcpKeepalive(interval=3))
    after = endpoint_of(clusters_manager.update({BASE.name: changed}), BASE)
    assert after is before and after.ejected_until == 1e12
    pool = after.pool
    assert (pool.connect_timeout, pool.idle_timeout, pool.max_concurrent_streams, pool.keepalive) == (
        2.5, 60.0, 8, TcpKeepalive(interval=3))
    assert pool.settings == PoolSettings.of(changed)


def test_a_push_that_changes_the_weight_keeps_the_endpoint():
    clusters_manager = manager()
    before = endpoint_of(clusters_manager.update({BASE.name: BASE}), BASE)
    heavier = replace(BASE, endpoints=(replace(ENDPOINT, weight=3),))
    after = endpoint_of(clusters_manager.update({BASE.name: heavier}), BASE)
    assert after is before and after.spec.weight == 3
