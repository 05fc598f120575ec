"""The peak-EWMA plugin's cost (plugins/txmesh-peak-ewma): peaks at once, decays with time, also on read."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

peak_ewma = pytest.importorskip("txmesh_peak_ewma",
                                reason="the example plugin (pip install -e plugins/txmesh-peak-ewma)")


def endpoint(active=0):
    return SimpleNamespace(state={}, active_requests=active)


def test_a_slow_observation_counts_at_once_and_load_multiplies_the_cost():
    fast, slow = endpoint(), endpoint()
    peak_ewma.observe(fast, 0.001, now=100.0)
    peak_ewma.observe(slow, 0.200, now=100.0)
    assert peak_ewma._score(fast, 0.001, 100.0) == pytest.approx(0.001)
    assert peak_ewma._score(slow, 0.001, 100.0) == pytest.approx(0.200)
    fast.active_requests = 3
    assert peak_ewma._score(fast, 0.001, 100.0) == pytest.approx(0.004)


def test_an_idle_slow_endpoint_becomes_cheap_again_and_is_retried():
    """Read later, a cost has decayed by the time since its last observation (Finagle/Linkerd): a busy fast
    endpoint, observed all along, is eventually dearer than one that was slow once, long ago."""
    fast, slow = endpoint(), endpoint()
    peak_ewma.observe(slow, 0.200, now=0.0)
    decay = peak_ewma.DECAY
    for tick in range(int(10 * decay)):
        peak_ewma.observe(fast, 0.005, now=float(tick))
    now = 10 * decay
    assert peak_ewma._score(slow, 0.001, now) < peak_ewma._score(fast, 0.001, now)
    assert peak_ewma._score(slow, 0.001, 1.0) > peak_ewma._score(fast, 0.001, 1.0)


# Endpoint weights (ServiceEntry/WorkloadEntry ``weight``): when they differ, the plugin draws an endpoint in
# proportion to weight / (cost x (active requests + 1)).  Bounds: seven binomial standard deviations (a chance
# under 3e-12 of failing by bad luck).


def weighted(weight, cost, active=0):
    """An endpoint of ``weight`` whose peak EWMA was ``cost`` just now, with ``active`` requests in flight."""
    measured = SimpleNamespace(state={}, active_requests=active, spec=SimpleNamespace(weight=weight))
    peak_ewma.observe(measured, cost, now=time.monotonic())
    return measured


def shares_of_picks(endpoints, total=4000):
    cluster = SimpleNamespace(spec=SimpleNamespace(lb_policy="LEAST_REQUEST"), state={})
    endpoints = tuple(endpoints)
    chosen = [peak_ewma.mesh_pick_endpoint(ctx=SimpleNamespace(extra={}), cluster=cluster, endpoints=endpoints)
              for _ in range(total)]
    return [sum(pick is endpoint for pick in chosen) for endpoint in endpoints]


def assert_share(count, total, share):
    bound = 7 * (total * share * (1 - share)) ** 0.5
    assert abs(count - total * share) <= bound, f"{count} of {total}, expected {total * share:.0f} +- {bound:.0f}"


def test_weights_share_the_traffic_between_endpoints_of_the_same_latency():
    """Istio: "Endpoints with higher weights will receive proportionally higher traffic".  The power of two
    choices on equal costs split weights 9 and 1 evenly (and, through a sidecar, stuck to one endpoint)."""
    heavy, light = weighted(9, 0.010), weighted(1, 0.010)
    heavy_picks, light_picks = shares_of_picks([heavy, light])
    assert_share(heavy_picks, 4000, 0.9)
    assert_share(light_picks, 4000, 0.1)


def test_with_weights_a_slow_or_loaded_endpoint_still_gets_less():
    """The weight divides the cost: weight 9 at 90 ms against weight 1 at 1 ms is 100 against 1000, so the
    heavy endpoint gets 1/11 of the picks (not none, as from the power of two choices on two endpoints);
    weight 9 with 17 requests in flight against weight 1 idle, at the same latency, is 9/18 against 1: 1/3."""
    slow, fast = weighted(9, 0.090), weighted(1, 0.001)
    assert_share(shares_of_picks([slow, fast])[0], 4000, 1 / 11)
    busy, idle = weighted(9, 0.010, active=17), weighted(1, 0.010)
    assert_share(shares_of_picks([busy, idle])[0], 4000, 1 / 3)
