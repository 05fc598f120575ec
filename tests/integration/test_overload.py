"""Connection exhaustion (issue #10, item 6): idle connections cannot lock fresh work out of a listener.

A real sidecar with ``--max-connections 200``, started with a soft file-descriptor limit of 256 (hard
4096), is filled with idle connections (connected, silent) and a few busy ones (a request in flight to a
slow app).  Near the limit it closes the connections idle the longest, never a busy one, and a new client
is answered at once.  At start it raised its soft limit to the hard one.  docs/operations.md, "Overload".
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from mesh.proxy.overload import HIGH_WATER, LOW_WATER
from tests.harness import Proxy, closed_by_peer, wait_for
from tests.harness.net import http_request
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

LIMIT = 200
SOFT, HARD = 256, 4096
IDLE_FIRST, BUSY, IDLE_LATER = 150, 10, 60  # 220 connections in all, beyond the limit
BUSY_MS = 10000  # the busy requests stay in flight this long


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, backend_factory, process_log_dir):
    app = backend_factory("crowded-app")
    config = write_config(tmp_path_factory.mktemp("overload"), service_entry("crowded-app", [endpoint(app)]))
    sidecar = Proxy(config, "crowded", extra_args=["--max-connections", str(LIMIT)], log_dir=process_log_dir)
    sidecar.argv = ["prlimit", f"--nofile={SOFT}:{HARD}", *sidecar.argv]
    sidecar.start()
    yield sidecar
    sidecar.stop()


def _metric(proxy, name: str, listener: str = "outbound") -> float:
    """The value of ``name{listener="..."}`` on the sidecar's metrics port (0 when absent)."""
    status, body = http_request("127.0.0.1", proxy.metrics_port, "/stats/prometheus")
    assert status == 200, body
    found = re.search(rf'^{name}{{listener="{listener}"}} (\S+)$', body.decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _open_idle(proxy, count: int) -> list[socket.socket]:
    """``count`` connections to the outbound listener that send nothing; returned once the proxy holds them."""
    before = _metric(proxy, "mesh_downstream_cx_active")
    sockets = [socket.create_connection(("127.0.0.1", proxy.outbound_port)) for _ in range(count)]
    wait_for(lambda: _metric(proxy, "mesh_downstream_cx_active") >= before + count, 10.0,
             what=f"the sidecar to accept {count} connections")
    return sockets


def _soft_and_hard_fd_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_the_soft_fd_limit_is_raised_to_the_hard_limit_at_start(proxy):
    assert _soft_and_hard_fd_limits(proxy.pid) == (HARD, HARD)
    log = proxy.log_path.read_text()
    assert f"raised from {SOFT} to {HARD}" in log, proxy.describe("no log line about the raised fd limit")
    assert f"{LIMIT} connections per listener" in log, proxy.describe("no log line about the connection limit")


def test_idle_connections_are_closed_first_busy_ones_finish_and_a_new_client_is_answered(proxy):
    oldest = _open_idle(proxy, IDLE_FIRST)
    busy = [socket.create_connection(("127.0.0.1", proxy.outbound_port)) for _ in range(BUSY)]
    for sock in busy:
        sock.sendall(f"GET /delay/{BUSY_MS} HTTP/1.1\r\nHost: crowded-app\r\n\r\n".encode())
    wait_for(lambda: _metric(proxy, "mesh_downstream_cx_active") >= IDLE_FIRST + BUSY, 10.0,
             what="the busy connections to be accepted")
    newest = [socket.create_connection(("127.0.0.1", proxy.outbound_port)) for _ in range(IDLE_LATER)]
    try:
        started = time.monotonic()
        status, body = http_request("127.0.0.1", proxy.outbound_port, "/fresh", headers={"Host": "crowded-app"})
        took = time.monotonic() - started
        assert status == 200, body
        assert took < 5.0, f"the new client waited {took:.1f}s"

        closed = wait_for(lambda: [i for i, sock in enumerate(oldest) if closed_by_peer(sock)], 10.0,
                          what="idle connections to be closed")
        assert closed == list(range(len(closed))), f"not the longest idle first: {closed}"
        one_round = int(LIMIT * HIGH_WATER) + 1 - int(LIMIT * LOW_WATER)
        assert len(closed) > one_round, "the listener was expected to make room twice"
        assert not any(closed_by_peer(sock) for sock in newest), "a connection idle for less time was closed"
        assert _metric(proxy, "mesh_downstream_cx_overload_closed_total") >= len(closed)
        assert _metric(proxy, "mesh_downstream_cx_overflow_total") == 0
        assert _metric(proxy, "mesh_downstream_cx_limit") == LIMIT

        for sock in busy:  # never closed: each gets its answer when the app sends it
            sock.settimeout(BUSY_MS / 1000 + 10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 "), "a busy connection was not answered"
    finally:
        for sock in oldest + busy + newest:
            sock.close()
    log = proxy.log_path.read_text()
    assert log.count("outbound listener overloaded") == 1, proxy.describe("one line when the state is entered")
    wait_for(lambda: "outbound listener no longer overloaded" in proxy.log_path.read_text(), 10.0,
             what="the log line when the overload state is left")


def test_a_silent_inbound_connection_counts_and_is_closed_at_the_header_timeout(proxy_factory, backend_factory,
                                                                                tmp_path):
    """Before its first byte, an inbound connection (TLS or plaintext, not known yet) used to be neither
    counted against the limit nor timed out: silent ones could pile up for ever."""
    app = backend_factory("silent-app")
    sidecar = proxy_factory(write_config(tmp_path, name="empty.yaml"), "silent", app_port=app.port,
                            extra_args=["--header-timeout", "1"])
    with socket.create_connection(("127.0.0.1", sidecar.inbound_port)) as silent:
        wait_for(lambda: _metric(sidecar, "mesh_downstream_cx_active", "inbound") == 1, 5.0,
                 what="the silent inbound connection to be counted")
        silent.settimeout(10.0)
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert time.monotonic() - started < 5.0
    assert _metric(sidecar, "mesh_downstream_cx_active", "inbound") == 0


def test_the_metrics_port_holds_32_connections_at_most(proxy):
    """The metrics port is on the inbound (pod) address, reachable from other hosts: limited like the health
    port (mesh.webpages.SiteLimits), where it used to take any number of silent connections."""
    held = [socket.create_connection(("127.0.0.1", proxy.metrics_port)) for _ in range(32)]
    try:
        with socket.create_connection(("127.0.0.1", proxy.metrics_port)) as extra:
            extra.settimeout(5.0)
            assert extra.recv(1) == b"", "the 33rd connection to the metrics port was kept"
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: _metric(proxy, "mesh_downstream_cx_limit") == LIMIT, 10.0, what="the metrics port again")
