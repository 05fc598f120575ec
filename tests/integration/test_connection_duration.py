"""DestinationRule ``connectionPool.tcp.maxConnectionDuration`` on a real sidecar's HTTP/1.1 connections.

``brief`` allows each upstream connection 1 s, ``lasting`` 60 s.  The tests follow the sidecar's
connections to the backends by their local ports (:func:`tests.harness.connections_to` reads them from
the sidecar's sockets): an idle connection is closed when it reaches the duration, a busy one finishes its
request first and is then closed instead of pooled, as Envoy's ``max_connection_duration``.  HTTP/2
connections are in tests/integration/test_h2_upstream.py.
"""

from __future__ import annotations

import time

import pytest

from tests.harness import connections_to, wait_for
from tests.integration.test_proxy_support import destination_rule, endpoint, service_entry, write_config

DURATION = 1.0


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory):
    backend, lasting = backend_factory("brief"), backend_factory("lasting")
    config = write_config(
        tmp_path_factory.mktemp("duration-config"),
        service_entry("brief", [endpoint(backend)]),
        destination_rule("brief", "brief", traffic_policy={"connectionPool": {"tcp": {
            "maxConnectionDuration": f"{DURATION}s"}}}),
        service_entry("lasting", [endpoint(lasting)]),
        destination_rule("lasting", "lasting", traffic_policy={"connectionPool": {"tcp": {
            "maxConnectionDuration": "60s"}}}),
    )
    return proxy_factory(config, "client"), backend, lasting


def local_ports(proxy, backend) -> set[int]:
    return {connection["local_port"] for connection in connections_to(proxy.pid, backend.port)}


def closed(proxy, backend, port: int, timeout: float) -> None:
    wait_for(lambda: port not in local_ports(proxy, backend), timeout, what=f"the connection from port {port} to close")


def test_a_connection_is_reused_within_the_duration(mesh):
    """``lasting`` allows 60 s: its connection goes back to the pool after each request and serves the next."""
    proxy, _, lasting = mesh
    ports = []
    for _ in range(3):
        assert proxy.curl("lasting", "/").status == 200
        ports.append(local_ports(proxy, lasting))
    assert len(ports[0]) == 1 and ports == [ports[0]] * 3, ports


def test_an_idle_connection_is_closed_when_it_reaches_the_duration(mesh):
    proxy, backend, _ = mesh
    wait_for(lambda: not local_ports(proxy, backend), 5, what="no connection left from an earlier test")
    started = time.monotonic()
    assert proxy.curl("brief", "/").status == 200
    [port] = local_ports(proxy, backend)
    closed(proxy, backend, port, 5)
    elapsed = time.monotonic() - started
    assert DURATION * 0.8 <= elapsed < DURATION + 2, elapsed  # at the duration, not at once, not much later


def test_a_busy_connection_finishes_its_request_then_closes(mesh):
    """The request outlasts the connection's duration: it is answered in full, and the connection is then
    closed instead of going back to the pool."""
    proxy, backend, _ = mesh
    wait_for(lambda: not local_ports(proxy, backend), 5, what="no connection left from an earlier test")
    result = proxy.curl("brief", f"/delay/{int(DURATION * 1500)}")
    assert result.status == 200 and result.json()["service"] == "brief", result
    assert result.info["time_total"] >= DURATION * 1.5 * 0.95
    wait_for(lambda: not local_ports(proxy, backend), 3, what="the expired connection to close after its response")
