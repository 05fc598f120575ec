"""The TCP proxy's idle timeout and maximum duration from a DestinationRule, at a real sidecar.

Istio gives Envoy's ``tcp_proxy`` the ``connectionPool.tcp.idleTimeout`` and ``maxConnectionDuration`` of the
top-level ``trafficPolicy`` of the route's DestinationRule::

    this test ---> client sidecar, explicit TCP listeners ---> echo server (plain TCP, no sidecar)
      IDLE    DestinationRule tcp.idleTimeout 1s: a connection without a byte either way for 1 s is closed
      BRIEF   DestinationRule tcp.maxConnectionDuration 2s: a busy connection is closed at 2 s (flag DT)
      PLAIN   no DestinationRule: the listener's --idle-timeout (300 s by default) applies
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.harness import closed_by_peer, free_port, wait_for
from tests.integration.test_proxy_support import write_config
from tests.integration.test_tcp_routes import NETWORKING, NS, TcpPeers, plain_endpoint, resource
from tests.integration.test_telemetry_support import total

IDLE, BRIEF, PLAIN = (free_port() for _ in range(3))


def echo_service(name: str, port: int, echo_port: int) -> dict:
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": NS},
            "spec": {"hosts": [name], "location": "MESH_EXTERNAL", "resolution": "STATIC",
                     "ports": [{"number": port, "name": "tcp-main", "protocol": "TCP"}],
                     "endpoints": [plain_endpoint(echo_port, "TCP")]}}


@pytest.fixture(scope="module")
def client(proxy_factory, tmp_path_factory, process_log_dir):
    echo = free_port()
    TcpPeers("echo", "--echo", echo, log_dir=process_log_dir).start()
    config = write_config(
        tmp_path_factory.mktemp("tcp-timeouts"),
        echo_service("idle", IDLE, echo), echo_service("brief", BRIEF, echo), echo_service("plain", PLAIN, echo),
        resource("DestinationRule", "idle", {"host": "idle", "trafficPolicy": {
            "connectionPool": {"tcp": {"idleTimeout": "1s"}}}}),
        resource("DestinationRule", "brief", {"host": "brief", "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnectionDuration": "2s"}}}}))
    args = [arg for port in (IDLE, BRIEF, PLAIN) for arg in ("--outbound-tcp-port", port)]
    return proxy_factory(config, "client", namespace=NS, extra_args=args)


def echoed(sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` and read it back: False once the sidecar has closed the connection."""
    try:
        sock.sendall(data)
        received = b""
        while len(received) < len(data):
            chunk = sock.recv(len(data) - len(received))
            if not chunk:
                return False
            received += chunk
        return received == data
    except (ConnectionResetError, BrokenPipeError):
        return False


def test_an_idle_connection_is_closed_at_the_rules_idle_timeout_and_a_busy_one_is_not(client):
    with socket.create_connection(("127.0.0.1", IDLE), timeout=5) as busy, \
            socket.create_connection(("127.0.0.1", IDLE), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", PLAIN), timeout=5) as plain:
        for sock in (busy, idle, plain):
            assert echoed(sock, b"hello\n")
        last_byte = time.monotonic()
        # bytes every 0.3 s keep one connection open well past 1 s while the other, idle one is closed
        while not closed_by_peer(idle):
            assert time.monotonic() - last_byte < 5, "the idle connection was not closed within 5 s"
            assert echoed(busy, b"tick\n"), "the busy connection was closed"
            time.sleep(0.3)  # paces the busy connection's traffic; the loop waits on the idle one's close
        assert time.monotonic() - last_byte >= 1.0
        assert echoed(busy, b"still here\n")
        assert echoed(plain, b"still here\n")  # no rule: the listener's 300 s


def test_a_busy_connection_is_closed_at_the_rules_max_duration_with_dt(client):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", BRIEF), timeout=5) as sock:
        while echoed(sock, b"tick\n"):
            assert time.monotonic() - started < 6, "the connection outlived its 2 s maximum"
            time.sleep(0.2)  # paces the traffic; the loop ends when the sidecar closes the connection
    assert time.monotonic() - started >= 2.0
    wait_for(lambda: total(client, "istio_tcp_connections_closed_total", response_flags="DT",
                           destination_service_name="brief") == 1, timeout=5, what="the connection reported with DT")
