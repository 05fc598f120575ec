"""The built-in balancers of ``builtin.balancing`` on real clusters (no requests: the picks alone).

The proxies' integration tests (tests/integration/test_proxy_balancing.py) check the same policies
end to end; these check what a single sidecar cannot show, such as where a new cluster starts.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock

from mesh.builtin.balancing import mesh_pick_endpoint
from mesh.config.tables import ClusterSpec, EndpointSpec
from mesh.proxy.clusters import Cluster, Endpoint
from mesh.proxy.pool import ConnectionPool

PORTS = (8001, 8002, 8003, 8004)


def new_cluster(weights=(1, 1, 1, 1)) -> Cluster:
    """A fresh ROUND_ROBIN cluster of four endpoints (as a new sidecar's first config makes)."""
    specs = tuple(EndpointSpec("127.0.0.1", port, weight=weight) for port, weight in zip(PORTS, weights))
    clock = Clock()
    endpoints = [Endpoint(spec, ConnectionPool(clock, spec.address, spec.port)) for spec in specs]
    return Cluster(ClusterSpec("outbound|80||rr", "rr", 80, lb_policy="ROUND_ROBIN", endpoints=specs), endpoints)


def picks(cluster: Cluster, count: int) -> list[int]:
    endpoints = cluster.endpoints
    return [mesh_pick_endpoint(None, cluster, endpoints).port for _ in range(count)]


def test_round_robin_starts_at_a_random_endpoint():
    """Envoy starts each round robin at a random place, so that sidecars started together do not all
    send their first request to the first endpoint.  Of 64 new clusters, each of the four endpoints is
    some cluster's first pick (all on one endpoint by chance: 4 x 0.75 ** 64, about 4e-8)."""
    firsts = Counter(picks(new_cluster(), 1)[0] for _ in range(64))
    assert set(firsts) == set(PORTS), firsts


def test_round_robin_goes_round_from_wherever_it_starts():
    for _ in range(8):
        order = picks(new_cluster(), 12)
        start = PORTS.index(order[0])
        assert order == [PORTS[(start + step) % 4] for step in range(12)], order


def test_weighted_round_robin_keeps_its_proportions_from_any_start():
    for _ in range(8):
        order = picks(new_cluster(weights=(3, 1, 1, 1)), 6 * 5)
        assert Counter(order) == {8001: 15, 8002: 5, 8003: 5, 8004: 5}, order
