"""DestinationRule connectionPool circuit breaking, as Istio's circuit-breaking task shows it.

A real sidecar in front of the demo app's ``/delay/<ms>``, reached through :class:`CountingRelay`, a TCP
relay that records how many requests the backend works on at once.  Concurrent clients (threads with
http.client) load the sidecar: overflow is answered 503 ``UO`` with ``x-envoy-overloaded``, and the
backend never works on more than ``maxConnections`` requests at once (one per connection).
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness import wait_for
from tests.integration.test_proxy_support import (
    cluster_name,
    destination_rule,
    endpoint,
    endpoint_stats,
    service_entry,
    virtual_service,
    write_config,
)
from tests.integration.test_telemetry_support import scrape


class CountingRelay:
    """A TCP relay to ``target`` that counts the requests the backend is working on at once (``most``: the peak).

    A connection is busy from its first request bytes until the first response bytes come back; the count
    goes down before they are passed on, so the sidecar cannot send its next request before it does.
    """

    def __init__(self, target):
        self.target = target
        self.lock = threading.Lock()
        self.busy = self.most = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        upstream = socket.create_connection(self.target)
        busy = threading.Event()
        answers = threading.Thread(target=self._pump, args=(upstream, client, busy, False), daemon=True)
        answers.start()
        self._pump(client, upstream, busy, True)
        answers.join()
        client.close()
        upstream.close()

    def _pump(self, source, sink, busy, requests):
        """Copy ``source`` to ``sink``; a request starts the connection's busy time, an answer ends it."""
        try:
            while data := source.recv(65536):
                if requests != busy.is_set():
                    with self.lock:
                        self.busy += 1 if requests else -1
                        self.most = max(self.most, self.busy)
                    busy.set() if requests else busy.clear()
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    app = backend_factory("slow")
    relay = CountingRelay((app.address, app.port))
    config = write_config(
        tmp_path_factory.mktemp("circuit-config"),
        service_entry("slow", [endpoint(relay.address)]),
        destination_rule("slow", "slow", traffic_policy={"connectionPool": {
            "tcp": {"maxConnections": 1},
            "http": {"http1MaxPendingRequests": 1, "maxRequestsPerConnection": 1}}}),
        service_entry("flaky", [endpoint(app)]),
        destination_rule("flaky", "flaky", traffic_policy={"connectionPool": {"http": {"maxRetries": 1}}}),
        virtual_service("flaky", ["flaky"], [{"route": [{"destination": {"host": "flaky"}}], "timeout": "5s",
                                              "retries": {"attempts": 3, "perTryTimeout": "0.3s",
                                                          "retryOn": "5xx"}}]),
    )
    yield proxy_factory(config, "client"), relay, app
    relay.sock.close()


def _get(proxy, host, path):
    """One GET through the sidecar on a connection of its own: ``(status, x-envoy-overloaded)``."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.outbound_port, timeout=10)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("x-envoy-overloaded")
    finally:
        connection.close()


def _load(proxy, host, path, clients, rounds=1):
    """``clients`` concurrent clients, each sending ``rounds`` requests one after another."""
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(lambda: [_get(proxy, host, path) for _ in range(rounds)]) for _ in range(clients)]
        return [result for future in futures for result in future.result()]


def _counter(proxy, name, cluster):
    metrics = scrape(proxy.metrics_port, "/stats/prometheus").decode()
    found = re.search(rf'^{name}(?:_total)?{{cluster="{re.escape(cluster)}"}} (\S+)$', metrics, re.M)
    assert found, f"no {name} for {cluster} in the sidecar's metrics"
    return float(found.group(1))


def test_overflow_is_503_uo_and_the_backend_never_gets_more_than_max_connections(mesh):
    proxy, relay, _ = mesh
    results = _load(proxy, "slow", "/delay/200", clients=5, rounds=2)
    ok = [result for result in results if result[0] == 200]
    overflow = [result for result in results if result[0] == 503]
    assert len(ok) + len(overflow) == len(results), results
    assert len(ok) >= 2 and overflow, results  # one in flight, one pending: the others overflow
    assert {header for _, header in overflow} == {"true"}, overflow
    assert relay.most == 1, f"the backend had {relay.most} requests at once (maxConnections: 1)"
    cluster = cluster_name("slow")
    assert _counter(proxy, "mesh_upstream_rq_pending_overflow", cluster) == len(overflow)
    metrics = scrape(proxy.metrics_port, "/stats/prometheus").decode()
    assert re.search(r'istio_requests_total\{[^}]*response_code="503"[^}]*response_flags="UO"[^}]*\} '
                     f'{len(overflow)}', metrics), metrics[-3000:]
    breaker = proxy.admin("/clusters")[cluster]["circuit_breaker"]
    assert (breaker["connections"], breaker["pending"], breaker["requests"]) == (0, 0, 0), breaker


def test_retries_beyond_max_retries_are_not_made(mesh):
    """Four requests whose tries all time out together: one retry at a time (maxRetries: 1) instead of
    two per request; the others get the failure of their try (504 UT) at once."""
    proxy, _, app = mesh
    cluster = cluster_name("flaky")
    results = _load(proxy, "flaky", "/delay/2000", clients=4)
    assert {status for status, _ in results} == {504}, results
    tries = endpoint_stats(proxy, cluster, app)["total_requests"]
    assert _counter(proxy, "mesh_upstream_rq_retry_overflow", cluster) >= 1
    assert len(results) < tries < 3 * len(results), f"{tries} tries for {len(results)} requests"



def test_a_503_whose_retry_max_retries_refuses_reaches_the_client_whole(mesh):
    """While one request's retry is in flight (maxRetries: 1), requests answered 503 get no retry, and
    each client gets that 503 whole and at once (not its head, then nothing until the route timeout)."""
    proxy, _, _ = mesh
    cluster = cluster_name("flaky")
    refused_before = _counter(proxy, "mesh_upstream_rq_retry_overflow", cluster)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_get, proxy, "flaky", "/delay/2000")  # its tries time out after 0.3 s each
        wait_for(lambda: proxy.admin("/clusters")[cluster]["circuit_breaker"]["retries"] == 1, timeout=5.0,
                 what="the slow request's retry to be in flight")
        results = [_get(proxy, "flaky", "/status/503") for _ in range(3)]
        assert slow.result()[0] == 504
    assert [status for status, _ in results] == [503] * 3, results
    assert _counter(proxy, "mesh_upstream_rq_retry_overflow", cluster) > refused_before
