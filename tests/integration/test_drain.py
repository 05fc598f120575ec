"""SIGTERM drains a sidecar: in-flight requests finish with 200, new connections are refused, then it exits."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.harness import wait_for
from tests.harness.rawhttp import RawConnection
from tests.integration.test_proxy_support import curl_many, endpoint, service_entry, write_config


def start_in_flight(proxy, count, millis, results):
    """``count`` parallel GET /delay/<millis> through the proxy's outbound listener, in a thread."""
    def run():
        results.extend(curl_many(f"{proxy.outbound_url}/delay/{millis}", count, host="slow",
                                 write_out="%{http_code}", parallel=count, timeout=20))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def active_requests(proxy) -> int:
    return sum(row["active_requests"] for cluster in proxy.admin("/clusters").values() for row in cluster["endpoints"])


def refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def config(tmp_path_factory, backend_factory):
    backend = backend_factory("slow")
    return write_config(tmp_path_factory.mktemp("drain"), service_entry("slow", [endpoint(backend)]))


def test_sigterm_finishes_in_flight_requests_and_refuses_new_connections(config, proxy_factory):
    proxy = proxy_factory(config, "client", extra_args=["--drain-time", "5s"])
    # an idle keep-alive connection must not hold the drain up
    idle = socket.create_connection(("127.0.0.1", proxy.outbound_port))
    idle.sendall(b"GET /delay/0 HTTP/1.1\r\nHost: slow\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    results = []
    thread = start_in_flight(proxy, 20, 1000, results)
    wait_for(lambda: active_requests(proxy) == 20, timeout=5, what="20 requests in flight")
    started = time.monotonic()
    proxy.send_signal(15)
    wait_for(lambda: refused(proxy.outbound_port), timeout=0.5, what="the outbound port refusing connections")
    status, body = proxy.admin_request("/ready")
    assert status == 503 and b'"draining": true' in body
    thread.join(20)
    assert results == ["200"] * 20
    assert idle.recv(1) == b""  # the idle connection was closed by the proxy
    idle.close()
    wait_for(lambda: not proxy.running, timeout=6, what="the proxy to exit")
    took = time.monotonic() - started
    # twistd re-raises the signal that stopped it once shutdown is complete: -15 is a clean SIGTERM exit
    assert proxy.returncode in (0, -15), proxy.describe(f"exit code {proxy.returncode}")
    assert took < 3, f"drain took {took:.2f}s: it should end when the last request is answered (~1 s)"
    log = proxy.log_path.read_text()
    assert "draining: no new connections" in log and "drained; stopping" in log
    assert "Traceback" not in log
    proxy.stop()


def test_a_second_sigterm_during_the_drain_is_ignored(config, proxy_factory):
    """Orchestrators repeat SIGTERM, and a worker gets its parent's and then PR_SET_PDEATHSIG's: the second one
    must neither cut the drain short nor log Twisted's ReactorNotRunning traceback (the harness fails a test
    whose process logged one)."""
    proxy = proxy_factory(config, "twice", extra_args=["--drain-time", "5s"])
    results = []
    thread = start_in_flight(proxy, 2, 1000, results)
    wait_for(lambda: active_requests(proxy) == 2, timeout=5, what="2 requests in flight")
    proxy.send_signal(15)
    wait_for(lambda: "draining: no new connections" in proxy.log_path.read_text(), timeout=2, what="the drain")
    proxy.send_signal(15)
    wait_for(lambda: "while already shutting down: ignored" in proxy.log_path.read_text(), timeout=2,
             what="the second SIGTERM to be ignored")
    thread.join(20)
    assert results == ["200"] * 2
    wait_for(lambda: not proxy.running, timeout=6, what="the proxy to exit")
    assert proxy.returncode in (0, -15), proxy.describe(f"exit code {proxy.returncode}")
    assert "Traceback" not in proxy.log_path.read_text()
    proxy.stop()


def test_busy_keep_alive_connection_is_told_to_close(config, proxy_factory):
    """The response in flight when the drain starts says ``connection: close``, and the connection then closes."""
    proxy = proxy_factory(config, "busy", extra_args=["--drain-time", "5s"])
    with RawConnection("127.0.0.1", proxy.outbound_port) as connection:
        connection.send(b"GET /delay/0 HTTP/1.1\r\nHost: slow\r\n\r\n")
        first = connection.read_response()
        assert first.status == 200 and "close" not in first.headers.get("connection", "")
        connection.send(b"GET /delay/800 HTTP/1.1\r\nHost: slow\r\n\r\n")
        wait_for(lambda: active_requests(proxy) == 1, timeout=5, what="the request in flight")
        proxy.send_signal(15)
        second = connection.read_response()
        assert second.status == 200
        assert second.headers.get("connection") == "close", second.headers
        wait_for(connection.at_eof, timeout=2, what="the proxy to close the connection after the response")
    wait_for(lambda: not proxy.running, timeout=6, what="the proxy to exit")
    proxy.stop()


def test_drain_time_bounds_the_wait(config, proxy_factory):
    proxy = proxy_factory(config, "impatient", extra_args=["--drain-time", "1s"])
    results = []
    thread = start_in_flight(proxy, 3, 10000, results)
    wait_for(lambda: active_requests(proxy) == 3, timeout=5, what="3 requests in flight")
    started = time.monotonic()
    proxy.send_signal(15)
    wait_for(lambda: not proxy.running, timeout=5, what="the proxy to exit")
    took = time.monotonic() - started
    thread.join(20)
    assert 0.9 <= took < 3, f"took {took:.2f}s with --drain-time 1s"
    assert "drain time over: closing 3 connection(s) still busy" in proxy.log_path.read_text()
    assert results == ["000"] * 3  # cut: the requests outlived the drain time
    proxy.stop()


def test_sigterm_tells_the_control_plane_first(tmp_path, process_log_dir, control_factory):
    from tests.harness.plugin import ProcessFactory
    from tests.integration.test_distribution_support import ControlledProxy

    config = write_config(tmp_path / "config", service_entry("slow", [("127.0.0.1", 9)]))
    control = control_factory(extra_args=["--config-dir", str(config)])
    factory = ProcessFactory(ControlledProxy, process_log_dir)
    try:
        proxy = factory(control, "leaving")
        proxy.send_signal(15)
        wait_for(lambda: not proxy.running, timeout=8, what="the proxy to exit")
        log = control.log_path.read_text()
        wait_for(lambda: "is draining: removed from endpoints" in control.log_path.read_text(), timeout=2,
                 what="the control plane to log the DRAIN")
        assert "Traceback" not in log
    finally:
        factory.stop_all()
