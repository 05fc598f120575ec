"""Retries, timeouts, dead endpoints and outlier ejection, through a real sidecar.

Endpoint state (health, counters) is per address and port and shared by every cluster containing it, so each
scenario here has endpoints of its own.  ``/flaky/N`` fails N times per x-request-id on ONE backend, and the
proxy keeps the request id across retries, so each curl request starts a new count.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.harness import free_port, wait_for
from tests.integration.test_proxy_support import (
    cluster_endpoints,
    cluster_name,
    curl_many,
    destination_rule,
    endpoint,
    endpoint_stats,
    lb,
    route_to,
    served_by,
    service_entry,
    virtual_service,
    write_config,
)


def _vs(host, **http):
    return virtual_service(host, [host], [route_to(host, **http)])


@pytest.fixture(scope="module")
def black_holes():
    """Two listening sockets that are never accepted: the kernel completes connections, nothing answers."""
    sockets = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sockets.append(sock)
    yield [sock.getsockname() for sock in sockets]
    for sock in sockets:
        sock.close()


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory, black_holes):
    b = {name: backend_factory(name) for name in ("flaky", "alive", "victim", "o1", "o2", "slow", "good")}
    no_outlier = {"outlierDetection": {"consecutive5xxErrors": 0}}
    config = write_config(
        tmp_path_factory.mktemp("resilience-config"),
        service_entry("flaky-retry", [endpoint(b["flaky"])]),
        _vs("flaky-retry", retries={"attempts": 2, "retryOn": "5xx"}),
        service_entry("flaky-none", [endpoint(b["flaky"])]),
        _vs("flaky-none", retries={"attempts": 0}),
        service_entry("flaky-default", [endpoint(b["flaky"])]),   # no VirtualService: Istio's default retries
        service_entry("pair", [endpoint(b["alive"]), endpoint(b["victim"])]),
        destination_rule("pair", "pair", traffic_policy=lb("ROUND_ROBIN")),
        _vs("pair", retries={"attempts": 2, "retryOn": "connect-failure,reset"}),
        service_entry("dead", [endpoint(("127.0.0.1", free_port()))]),
        service_entry("half-dead", [endpoint(("127.0.0.1", free_port())), endpoint(b["good"])]),
        destination_rule("half-dead", "half-dead", traffic_policy=lb("ROUND_ROBIN")),
        _vs("half-dead", retries={"attempts": 2, "retryOn": "connect-failure"}),
        service_entry("outlier", [endpoint(b["o1"]), endpoint(b["o2"])]),
        destination_rule("outlier", "outlier", traffic_policy={
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "30s", "maxEjectionPercent": 50}}),
        _vs("outlier", retries={"attempts": 0}),
        service_entry("slow", [endpoint(b["slow"])]),
        _vs("slow", timeout="0.5s", retries={"attempts": 0}),
        service_entry("hung", [endpoint(black_holes[0]), endpoint(b["good"])]),
        destination_rule("hung", "hung", traffic_policy={"loadBalancer": {"simple": "ROUND_ROBIN"}, **no_outlier}),
        _vs("hung", retries={"attempts": 2, "perTryTimeout": "0.3s", "retryOn": "gateway-error"}),
        service_entry("hung-only", [endpoint(black_holes[1])]),
        destination_rule("hung-only", "hung-only", traffic_policy=no_outlier),
        virtual_service("hung-only", ["hung-only"], [
            route_to("hung-only", match=[{"uri": {"prefix": "/capped"}}], timeout="0.5s",
                     retries={"attempts": 5, "perTryTimeout": "0.2s", "retryOn": "gateway-error"}),
            route_to("hung-only", retries={"attempts": 2, "perTryTimeout": "0.2s", "retryOn": "gateway-error"}),
        ]),
    )
    proxy = proxy_factory(config, "client", extra_args=["--disable-plugin", "peak_ewma"])
    return proxy, b


# -- retries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fails, status, attempt", [(1, 200, 2), (2, 200, 3), (3, 503, 3)])
def test_retry_on_5xx(mesh, fails, status, attempt):
    proxy, _ = mesh
    result = proxy.curl("flaky-retry", f"/flaky/{fails}")
    assert result.status == status, result
    assert result.json()["attempt"] == attempt   # the app counted the tries of this one request id


def test_without_retries_a_503_reaches_the_client(mesh):
    proxy, _ = mesh
    result = proxy.curl("flaky-none", "/flaky/1")
    assert result.status == 503 and result.json()["attempt"] == 1, result


def test_default_retry_policy_retries_503_twice(mesh):
    """No VirtualService: Istio's default policy (2 retries, including status 503) applies."""
    proxy, _ = mesh
    assert proxy.curl("flaky-default", "/flaky/2").status == 200
    result = proxy.curl("flaky-default", "/flaky/3")
    assert result.status == 503 and result.json()["attempt"] == 3


def test_a_client_request_id_is_kept_across_retries(mesh):
    proxy, _ = mesh
    result = proxy.curl("flaky-retry", "/flaky/1", headers={"x-request-id": "client-chose-this"})
    assert result.status == 200
    assert result.json()["headers"]["x-request-id"] == "client-chose-this"
    again = proxy.curl("flaky-retry", "/flaky/1", headers={"x-request-id": "client-chose-this"})
    assert again.json()["attempt"] == 3, "the same id continues the same count"


def test_dead_only_cluster_is_503_uf(mesh):
    proxy, _ = mesh
    result = proxy.curl("dead", "/")
    assert result.status == 503, result
    flags = result.headers["x-mesh-flags"].split(",")
    assert "UF" in flags and "URX" in flags, flags   # the default policy retried the connect failures
    assert "connect" in result.body.decode() and "refused" in result.body.decode(), result.body


def test_connect_failure_is_retried_on_the_other_endpoint(mesh):
    """Round robin tries the dead endpoint with the first or second request (it starts at a random place):
    that connect failure is retried on the good one, and the dead endpoint is ejected after that one
    failure, so no other request even tries it."""
    proxy, b = mesh
    cluster = cluster_name("half-dead")
    assert served_by(curl_many(proxy.outbound_url + "/", 10, host="half-dead")) == {"good": 10}
    dead = next(row for row in cluster_endpoints(proxy, cluster).values()
                if row["address"] != f"127.0.0.1:{b['good'].port}")
    assert (dead["healthy"], dead["total_requests"], dead["total_failures"]) == (False, 1, 1), dead


def test_outlier_ejection_after_consecutive_5xx(mesh):
    proxy, b = mesh
    cluster = cluster_name("outlier")
    lines = curl_many(proxy.outbound_url + "/status/500", 6, host="outlier")   # 3 consecutive 500s each
    assert [line.split()[0] for line in lines] == ["500"] * 6
    rows = cluster_endpoints(proxy, cluster)
    unhealthy = [row for row in rows.values() if not row["healthy"]]
    assert len(unhealthy) == 1, f"maxEjectionPercent 50 of 2 endpoints allows exactly one ejection: {rows}"
    assert 25 < unhealthy[0]["ejected_for_s"] <= 30
    healthy_name = "o1" if unhealthy[0]["address"].endswith(f":{b['o2'].port}") else "o2"
    assert served_by(curl_many(proxy.outbound_url + "/", 10, host="outlier")) == {healthy_name: 10}


def test_dead_endpoint_under_load_loses_no_request(mesh):
    """Kill one of two endpoints while requests flow: connect failures and resets are retried on the other
    one, the dead one is ejected (visible in /clusters), and every request gets 200."""
    proxy, b = mesh
    victim = b["victim"]
    cluster = cluster_name("pair")
    assert set(served_by(curl_many(proxy.outbound_url + "/", 10, host="pair"))) == {"alive", "victim"}
    results = []
    load = threading.Thread(target=lambda: results.extend(
        curl_many(proxy.outbound_url + "/", 3000, host="pair", parallel=4, timeout=30)))
    load.start()
    try:
        wait_for(lambda: endpoint_stats(proxy, cluster, victim)["total_requests"] >= 100, 10,
                 what="traffic to reach the victim")
        victim.stop()
    finally:
        load.join(60)
    counts = served_by(results)   # asserts every one of the 3000 was 200
    assert counts["alive"] > 1000, counts
    row = endpoint_stats(proxy, cluster, victim)
    assert row["healthy"] is False and row["ejected_for_s"] > 0 and row["total_failures"] >= 1, row
    assert served_by(curl_many(proxy.outbound_url + "/", 20, host="pair")) == {"alive": 20}


# -- timeouts ----------------------------------------------------------------------------------------------


def test_route_timeout_is_504_ut(mesh):
    proxy, _ = mesh
    result = proxy.curl("slow", "/delay/2000")
    assert result.status == 504, result
    assert result.headers["x-mesh-flags"] == "UT"
    assert 0.45 <= result.info["time_total"] < 1.2, result.info["time_total"]
    assert "timeout" in result.body.decode()
    assert proxy.curl("slow", "/delay/100").status == 200   # under the timeout


def test_per_try_timeout_retries_on_another_endpoint(mesh):
    """Round robin alternates, so once a request has been answered by the good endpoint, each next
    request's first try hits the black hole: it times out after 0.3 s and the retry is answered by the
    good endpoint.  (Round robin starts at a random place, so the first request may go straight to the
    good one.)"""
    proxy, _ = mesh
    first = proxy.curl("hung", "/")
    assert first.status == 200 and first.headers["x-demo-service"] == "good", first
    for _ in range(4):
        result = proxy.curl("hung", "/")
        assert result.status == 200 and result.headers["x-demo-service"] == "good", result
        assert 0.28 <= result.info["time_total"] < 1.0, result.info["time_total"]


def test_per_try_timeouts_exhaust_the_retries(mesh, black_holes):
    proxy, _ = mesh
    cluster = cluster_name("hung-only")
    before = endpoint_stats(proxy, cluster, black_holes[1])["total_requests"]
    started = time.monotonic()
    result = proxy.curl("hung-only", "/")
    elapsed = time.monotonic() - started
    assert result.status == 504, result
    assert set(result.headers["x-mesh-flags"].split(",")) == {"UT", "URX"}
    assert 0.6 <= elapsed < 1.5, elapsed   # three tries of 0.2 s, plus jittered backoff
    assert endpoint_stats(proxy, cluster, black_holes[1])["total_requests"] - before == 3


def test_route_timeout_caps_the_retries(mesh):
    proxy, _ = mesh
    result = proxy.curl("hung-only", "/capped")
    assert result.status == 504 and "UT" in result.headers["x-mesh-flags"], result
    assert 0.45 <= result.info["time_total"] < 0.9, "six tries of 0.2 s would take 1.2 s"
