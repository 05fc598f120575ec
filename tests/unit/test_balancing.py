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


# LEAST_REQUEST with endpoint weights (ServiceEntry/WorkloadEntry ``weight``): Envoy's weighted least request,
# an earliest-deadline-first schedule on weight / (active requests + 1).  The bounds below are seven standard
# deviations of the binomial count a weighted random draw would give (a chance under 3e-12 of failing by bad
# luck); the schedule itself keeps every endpoint within about one pick of its share.


def new_least_request_cluster(weights, state=None) -> Cluster:
    """A LEAST_REQUEST cluster with one endpoint per weight (``state``: carried over, as by a config swap)."""
    specs = tuple(EndpointSpec("127.0.0.1", port, weight=weight) for port, weight in zip(PORTS, weights))
    clock = Clock()
    endpoints = [Endpoint(spec, ConnectionPool(clock, spec.address, spec.port)) for spec in specs]
    spec = ClusterSpec("outbound|80||lr", "lr", 80, lb_policy="LEAST_REQUEST", endpoints=specs)
    return Cluster(spec, endpoints, state=state)


def load(cluster: Cluster, port: int, active: int) -> None:
    """Put ``active`` requests in flight on the endpoint at ``port``."""
    endpoint = next(endpoint for endpoint in cluster.endpoints if endpoint.port == port)
    for _ in range(active):
        endpoint.try_started()


def assert_share(count: int, total: int, share: float) -> None:
    """``count`` of ``total`` picks is ``share`` of them, within 7 binomial standard deviations."""
    bound = 7 * (total * share * (1 - share)) ** 0.5
    assert abs(count - total * share) <= bound, f"{count} of {total}, expected {total * share:.0f} +- {bound:.0f}"


def test_least_request_honours_endpoint_weights():
    """Istio: "Endpoints with higher weights will receive proportionally higher traffic" (the power of two
    choices on active requests alone gave weights 9 and 1 an even split)."""
    cluster = new_least_request_cluster((9, 1))
    counts = Counter(picks(cluster, 4000))
    assert_share(counts[8001], 4000, 0.9)
    assert_share(counts[8002], 4000, 0.1)


def test_least_request_weights_hold_when_every_endpoint_is_equally_loaded():
    """Effective weights 9/6 and 1/6: still nine to one (equal loads tied under the power of two choices)."""
    cluster = new_least_request_cluster((9, 1))
    load(cluster, 8001, 5)
    load(cluster, 8002, 5)
    counts = Counter(picks(cluster, 4000))
    assert_share(counts[8001], 4000, 0.9)


def test_weighted_least_request_moves_load_away_from_a_busy_endpoint_without_starving_it():
    """Envoy's effective weight is weight / (active requests + 1): the weight-9 endpoint with 99 requests in
    flight has 9/100 against 1/1, so it gets 9/109 of the picks.  Less than its weight gives it, but not
    nothing, as it would get from the power of two choices on two endpoints."""
    cluster = new_least_request_cluster((9, 1))
    load(cluster, 8001, 99)
    counts = Counter(picks(cluster, 4000))
    assert_share(counts[8001], 4000, 9 / 109)


def test_least_request_follows_weights_that_change_across_config_swaps():
    """A swap rebuilds the cluster with the old ``state``: what it cached must follow the new weights,
    weighted and back to equal (then the power of two choices: the least loaded of two always wins)."""
    state = {}
    equal = new_least_request_cluster((1, 1), state)
    assert_share(Counter(picks(equal, 2000))[8001], 2000, 0.5)
    weighted = new_least_request_cluster((1, 9), state)
    assert_share(Counter(picks(weighted, 4000))[8002], 4000, 0.9)
    again = new_least_request_cluster((2, 2), state)
    load(again, 8002, 1)
    assert picks(again, 100) == [8001] * 100
