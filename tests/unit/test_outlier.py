"""Outlier detection (:mod:`mesh.proxy.outlier`) on real clusters and endpoints, against Envoy's rules.

Time is the ``now`` each report passes, as the exchange passes its reactor's time: the tests choose it.
Envoy's rules are its ``outlier_detection_impl.cc`` (putHttpResponseCode, ejectHost, checkHostForUneject,
the interval timer) and its router's reports (a reset is a local-origin connect failure, mapped to a 503
as Istio does not split local-origin errors).  The whole path through a sidecar is in
tests/integration/test_proxy_resilience.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from twisted.internet.task import Clock

from mesh.config.compile import Workload
from mesh.config.tables import ClusterSpec, EndpointSpec, OutlierPolicy
from mesh.proxy import outlier
from mesh.proxy.clusters import Cluster, Endpoint
from mesh.proxy.pool import ConnectionPool
from tests.harness.config_yaml import compile_yaml

# 100%: any endpoint may be ejected, so that the tests see the counting alone
ANY = OutlierPolicy(max_ejection_percent=100)


def cluster_of(policy: OutlierPolicy, size: int = 2, spec: ClusterSpec | None = None) -> Cluster:
    """A cluster of ``size`` endpoints (or those of ``spec``) with the outlier ``policy``."""
    if spec is None:
        endpoints = tuple(EndpointSpec("127.0.0.1", 8001 + index) for index in range(size))
        spec = ClusterSpec("outbound|80||svc", "svc", 80, endpoints=endpoints)
    spec = replace(spec, outlier=policy)
    clock = Clock()
    return Cluster(spec, [Endpoint(endpoint, ConnectionPool(clock, endpoint.address, endpoint.port))
                          for endpoint in spec.endpoints])


def ejected(endpoint: Endpoint, now: float) -> bool:
    return endpoint.ejected_until > now


def eject_now(cluster: Cluster, endpoint: Endpoint, now: float) -> float:
    """Eject ``endpoint`` with one connect failure at ``now``; the ejection's length."""
    assert outlier.record_failure(endpoint, cluster, now, connect_failure=True)
    return endpoint.ejected_until - now


# -- what counts ------------------------------------------------------------------------------------------


def test_an_upstream_reset_counts_as_a_5xx():
    """Envoy's router reports a reset (the endpoint took the connection, then reset or closed it without
    a response) as a local-origin connect failure, a 503: it used to count for nothing."""
    cluster = cluster_of(replace(ANY, consecutive_5xx=3))
    endpoint = cluster.endpoints[0]
    for now in (1.0, 2.0):
        outlier.try_failed(endpoint, cluster, now, "reset")
        assert not ejected(endpoint, now)
    outlier.try_failed(endpoint, cluster, 3.0, "reset")
    assert ejected(endpoint, 3.0) and endpoint.ejections == 1


def test_an_upstream_reset_counts_as_a_gateway_error():
    cluster = cluster_of(replace(ANY, consecutive_5xx=0, consecutive_gateway_errors=2,
                                 consecutive_connect_failures=0))
    endpoint = cluster.endpoints[0]
    outlier.try_failed(endpoint, cluster, 1.0, "reset")
    assert not ejected(endpoint, 1.0)
    outlier.try_failed(endpoint, cluster, 2.0, "reset")
    assert ejected(endpoint, 2.0)


def test_resets_mixed_with_5xx_make_one_streak_and_a_response_ends_it():
    cluster = cluster_of(replace(ANY, consecutive_5xx=3))
    endpoint = cluster.endpoints[0]
    outlier.try_failed(endpoint, cluster, 1.0, "reset")
    outlier.response(endpoint, cluster, 2.0, 200)
    outlier.try_failed(endpoint, cluster, 3.0, "reset")
    outlier.response(endpoint, cluster, 4.0, 500)
    assert not ejected(endpoint, 4.0)
    outlier.try_failed(endpoint, cluster, 5.0, "reset")
    assert ejected(endpoint, 5.0)


def test_a_5xx_that_is_no_gateway_error_ends_the_gateway_streak():
    """Envoy's putHttpResponseCode zeroes consecutive_gateway_failure on any other 5xx: a 500 between
    gateway errors used to leave their streak running."""
    cluster = cluster_of(replace(ANY, consecutive_5xx=0, consecutive_gateway_errors=3,
                                 consecutive_connect_failures=0))
    endpoint = cluster.endpoints[0]
    for now, status in enumerate((502, 503, 500, 504, 503), start=1):
        outlier.response(endpoint, cluster, float(now), status)
    assert not ejected(endpoint, 5.0), "the 500 ended the streak: 504, 503 are two in a row"
    outlier.response(endpoint, cluster, 6.0, 502)
    assert ejected(endpoint, 6.0)


def test_the_500_still_counts_as_a_5xx_and_a_success_ends_both_streaks():
    cluster = cluster_of(replace(ANY, consecutive_5xx=4, consecutive_gateway_errors=3))
    endpoint = cluster.endpoints[0]
    for now, status in enumerate((503, 503, 200, 503, 503, 500), start=1):  # a 200 ends both streaks
        outlier.response(endpoint, cluster, float(now), status)
    assert not ejected(endpoint, 6.0)
    assert (endpoint.consecutive_5xx, endpoint.consecutive_gateway) == (3, 0)
    outlier.response(endpoint, cluster, 7.0, 500)  # the fourth 5xx in a row
    assert ejected(endpoint, 7.0)


def test_failures_while_ejected_do_not_carry_over_the_ejection():
    """Envoy zeroes the streaks when it un-ejects an endpoint: failures of tries still in flight at the
    ejection (or sent to it when every endpoint is ejected) once made its first failure after the
    ejection eject it again."""
    cluster = cluster_of(replace(ANY, consecutive_5xx=2))
    endpoint = cluster.endpoints[0]
    outlier.response(endpoint, cluster, 0.0, 500)
    outlier.response(endpoint, cluster, 0.0, 500)
    assert endpoint.ejected_until == 30.0
    for now in (1.0, 2.0, 3.0):
        outlier.response(endpoint, cluster, now, 500)
    assert endpoint.total_failures == 5
    outlier.response(endpoint, cluster, 31.0, 500)
    assert not ejected(endpoint, 31.0), "one 500 after the ejection is no streak of two"
    outlier.response(endpoint, cluster, 32.0, 500)
    assert ejected(endpoint, 32.0)


# -- how long an ejection lasts ----------------------------------------------------------------------------


def test_the_ejection_time_grows_with_each_ejection_up_to_300s():
    """Envoy's max_ejection_time (300 s by default; Istio does not set it): 'when ejection time reaches
    it, it does not increase any more'.  It used to grow without end (the 11th ejection: 330 s)."""
    cluster = cluster_of(ANY)
    endpoint = cluster.endpoints[0]
    now, lengths = 0.0, []
    for _ in range(14):  # each ejection right when the last one ends: no healthy interval between
        lengths.append(eject_now(cluster, endpoint, now))
        now = endpoint.ejected_until
    assert lengths == [30.0 * n for n in range(1, 11)] + [300.0] * 4
    assert endpoint.ejections == 14


def test_a_base_ejection_time_over_300s_is_the_longest_ejection():
    cluster = cluster_of(replace(ANY, base_ejection_time=400.0))
    endpoint = cluster.endpoints[0]
    assert eject_now(cluster, endpoint, 0.0) == 400.0
    assert eject_now(cluster, endpoint, endpoint.ejected_until) == 400.0


def test_the_multiplier_goes_down_by_one_per_healthy_interval():
    """Envoy decrements a healthy host's multiplier at each interval: an endpoint ejected long ago is
    ejected for the base time again.  It used to be ejected for base x every ejection it ever had."""
    cluster = cluster_of(ANY)  # interval 10 s, base 30 s
    endpoint = cluster.endpoints[0]
    now = 0.0
    for _ in range(3):
        eject_now(cluster, endpoint, now)
        now = endpoint.ejected_until
    assert endpoint.ejection_multiplier == 3 and now == 180.0  # 30 + 60 + 90
    # un-ejected at 180; two whole intervals healthy take two off, the new ejection adds one
    assert eject_now(cluster, endpoint, 180.0 + 25.0) == 60.0
    assert endpoint.ejection_multiplier == 2
    # a long healthy time brings it back to the base, never below
    assert eject_now(cluster, endpoint, endpoint.ejected_until + 1000.0) == 30.0
    assert endpoint.ejection_multiplier == 1


@pytest.mark.parametrize("interval, steps", [
    # (healthy time before the next ejection, its length), from a multiplier of 2
    (60.0, [(59.0, 90.0),     # no whole interval: 2 + 1
            (60.0, 90.0),     # one: 3 - 1 + 1
            (120.0, 60.0)]),  # two: 3 - 2 + 1
    (5.0, [(9.0, 60.0),       # one: 2 - 1 + 1
           (10.0, 30.0)]),    # two: 2 - 2 + 1
])
def test_interval_is_the_healthy_time_per_step_down(interval, steps):
    cluster = cluster_of(replace(ANY, interval=interval))
    endpoint = cluster.endpoints[0]
    eject_now(cluster, endpoint, 0.0)
    eject_now(cluster, endpoint, endpoint.ejected_until)
    assert endpoint.ejection_multiplier == 2
    lengths = [eject_now(cluster, endpoint, endpoint.ejected_until + healthy_for) for healthy_for, _ in steps]
    assert lengths == [length for _, length in steps]


def test_at_the_cap_a_healthy_interval_or_two_keep_the_longest_ejection():
    """Envoy lets the multiplier pass the cap by one base time (30 x 11 = 330 s, ejected 300 s), so an
    endpoint that fails again soon after its longest ejection gets the longest again."""
    cluster = cluster_of(ANY)
    endpoint = cluster.endpoints[0]
    now = 0.0
    for _ in range(12):
        eject_now(cluster, endpoint, now)
        now = endpoint.ejected_until
    assert endpoint.ejection_multiplier == 11
    assert eject_now(cluster, endpoint, now + 10.0) == 300.0  # 11 - 1 + 1
    assert eject_now(cluster, endpoint, endpoint.ejected_until + 30.0) == 270.0  # 11 - 3 + 1


# -- consecutive5xxErrors: 0 ------------------------------------------------------------------------------

_SERVICES = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: {name}, namespace: shop}}
    spec:
      hosts: [{name}.example.com]
      resolution: STATIC
      ports: [{{number: 80, name: http}}]
      endpoints: [{{address: 10.0.0.1}}, {{address: 10.0.0.2}}]
    """
_RULE = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: {name}, namespace: shop}}
    spec:
      host: {name}.example.com
      trafficPolicy: {{outlierDetection: {outlier}}}
    """


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Cluster specs of hosts without a DestinationRule (``plain``) and with the ``outlierDetection`` of
    their name."""
    rules = {"disabled": "{consecutive5xxErrors: 0}",
             "gateway": "{consecutive5xxErrors: 0, consecutiveGatewayErrors: 2}",
             "other": "{baseEjectionTime: 10s}"}
    documents = [_SERVICES.format(name=name) for name in ("plain", *rules)]
    documents += [_RULE.format(name=name, outlier=outlier) for name, outlier in rules.items()]
    config = compile_yaml(tmp_path_factory.mktemp("outlier"), *documents,
                          workload=Workload("web", "shop", {"app": "web"}, "web"))
    return {name: config.clusters[f"outbound|80||{name}.example.com"] for name in ("plain", *rules)}


def _cluster(spec: ClusterSpec) -> Cluster:
    return cluster_of(spec.outlier, spec=spec)


def test_consecutive_5xx_errors_0_switches_off_the_ejection_after_one_connect_failure(compiled):
    """With Istio, Envoy counts a connect failure as a 5xx: ``consecutive5xxErrors: 0`` (and no gateway
    errors) ejects for nothing.  txmesh's own ejection after one connect failure once stayed on."""
    cluster = _cluster(compiled["disabled"])
    assert cluster.spec.outlier.consecutive_connect_failures == 0
    endpoint = cluster.endpoints[0]
    for now in range(1, 21):
        outlier.try_failed(endpoint, cluster, float(now), "connect-failure")
        outlier.try_failed(endpoint, cluster, float(now), "reset")
        outlier.response(endpoint, cluster, float(now), 503)
    assert endpoint.ejections == 0 and endpoint.total_failures == 60
    # the documented default stays: no outlierDetection, or one that leaves consecutive5xxErrors at 5
    for name in ("plain", "other"):
        cluster = _cluster(compiled[name])
        assert (cluster.spec.outlier.consecutive_5xx, cluster.spec.outlier.consecutive_connect_failures) == (5, 1)
        endpoint = cluster.endpoints[0]
        outlier.try_failed(endpoint, cluster, 1.0, "connect-failure")
        assert ejected(endpoint, 1.0), name


def test_with_consecutive_5xx_errors_0_gateway_errors_still_count_connect_failures(compiled):
    cluster = _cluster(compiled["gateway"])
    endpoint = cluster.endpoints[0]
    outlier.try_failed(endpoint, cluster, 1.0, "connect-failure")
    assert not ejected(endpoint, 1.0)
    outlier.try_failed(endpoint, cluster, 2.0, "connect-failure")
    assert ejected(endpoint, 2.0)



def test_a_streak_whose_ejection_max_ejection_percent_refuses_starts_again():
    """Envoy resets the streak after ejectHost whether or not maxEjectionPercent let it eject: the next
    failure alone does not try again, a whole new streak does."""
    cluster = cluster_of(replace(ANY, consecutive_5xx=3, max_ejection_percent=50), size=2)
    first, second = cluster.endpoints
    eject_now(cluster, first, 1.0)
    for now in (2.0, 3.0, 4.0):
        assert not outlier.record_failure(second, cluster, now, status=500)
    assert (second.consecutive_5xx, ejected(second, 4.0)) == (0, False)  # refused: 50% are out already
    assert not outlier.record_failure(second, cluster, 5.0, status=500)
    assert second.consecutive_5xx == 1
