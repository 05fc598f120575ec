"""The sidecar's health port (``--health-port``, Istio's 15021): ``GET /healthz/ready`` on the inbound (pod)
address for the kubelet's probes -- 503 with the reason before the proxy is ready and while it drains, 200
when it is ready -- and its limits: a slow, oversized or one-too-many connection is cut off."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.harness import Proxy, wait_for
from tests.harness.net import free_port
from tests.integration.test_proxy_support import curl_many, endpoint, service_entry, write_config

POD_ADDRESS = "127.0.0.2"  # stands for the pod IP: any loopback address other than the admin port's


@pytest.fixture(scope="module")
def config(tmp_path_factory, backend_factory):
    backend = backend_factory("slow")
    return write_config(tmp_path_factory.mktemp("health"), service_entry("slow", [endpoint(backend)]))


@pytest.fixture(scope="module")
def proxy(config, proxy_factory):
    """A ready sidecar whose health port answers on POD_ADDRESS, with a 1 s deadline for a request."""
    return proxy_factory(config, "probed", extra_args=["--inbound-address", POD_ADDRESS, "--header-timeout", "1"])


def exchange(port: int, data: bytes, address: str = POD_ADDRESS) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection((address, port), timeout=10) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything
        return _read_to_close(sock)


def _read_to_close(sock) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_ready_on_the_pod_address_only(proxy):
    assert proxy.health_request(address=POD_ADDRESS) == (200, b"ready\n")
    with pytest.raises(ConnectionRefusedError):
        proxy.health_request(address="127.0.0.1")  # not on every address: on the inbound one
    assert proxy.health_request("/healthz/live", address=POD_ADDRESS)[0] == 404
    answer = exchange(proxy.health_port, b"POST /healthz/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                         b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 "), answer


def test_a_trickling_request_is_cut_off_at_the_deadline(proxy):
    """One byte every 0.2 s keeps an idle timeout at bay, not the 1 s deadline (--header-timeout)."""
    head = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    started = time.monotonic()
    with socket.create_connection((POD_ADDRESS, proxy.health_port), timeout=10) as sock:
        sock.settimeout(0.2)
        answer = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
            except TimeoutError:
                continue  # not answered yet: send the next byte
            except (BrokenPipeError, ConnectionResetError):
                break
            break
        sock.settimeout(5)
        answer += _read_to_close(sock)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"took longer than 1s" in answer
    assert 0.9 <= took < 3, f"cut off after {took:.2f}s with a 1 s deadline"


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
    b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 100_000,
], ids=["head", "body"])
def test_an_oversized_request_is_cut_off(proxy, request_bytes):
    answer = exchange(proxy.health_port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"larger than 8192 bytes" in answer
    assert proxy.health_request(address=POD_ADDRESS)[0] == 200, "and the port still serves"


def test_connections_beyond_the_limit_are_closed(proxy):
    held = [socket.create_connection((POD_ADDRESS, proxy.health_port), timeout=5) for _ in range(32)]
    try:
        one_too_many = socket.create_connection((POD_ADDRESS, proxy.health_port), timeout=5)
        assert _read_to_close(one_too_many) == b"", "closed at once, unanswered"
        one_too_many.close()
        held.pop().close()
        wait_for(lambda: proxy.health_request(address=POD_ADDRESS)[0] == 200, timeout=5,
                 what="a connection to be accepted again once one closed")
    finally:
        for sock in held:
            sock.close()


def test_503_while_draining(config, proxy_factory):
    proxy = proxy_factory(config, "draining", extra_args=["--drain-time", "5s"])
    results = []
    request = threading.Thread(target=lambda: results.extend(curl_many(
        f"{proxy.outbound_url}/delay/1500", 1, host="slow", write_out="%{http_code}", timeout=20)))
    request.start()
    wait_for(lambda: any(row["active_requests"] for cluster in proxy.admin("/clusters").values()
                         for row in cluster["endpoints"]), timeout=5, what="the request in flight")
    proxy.send_signal(15)
    status, body = wait_for(lambda: (answer := proxy.health_request())[0] == 503 and answer, timeout=1,
                            what="/healthz/ready to turn 503 on SIGTERM")
    assert body == b"not ready: draining (the proxy is shutting down)\n"
    request.join(20)
    assert results == ["200"], "the in-flight request still finished"


def test_503_with_the_reason_until_the_certificate_comes(control_factory, config, tmp_path, process_log_dir):
    control = control_factory()
    args = control.proxy_args("default", "late")
    control.stop()  # the control plane is down when the sidecar starts

    class StartingProxy(Proxy):
        def is_ready(self) -> bool:  # started once the health port answers, ready or not
            return self.health_request()[0] in (200, 503)

    proxy = StartingProxy(config, "late", extra_args=args, log_dir=process_log_dir)
    with proxy.start():
        status, body = wait_for(lambda: (answer := proxy.health_request())[1].count(b"last error") and answer,
                                timeout=10, what="/healthz/ready to say why it is not ready")
        assert status == 503
        assert body.startswith(b"not ready: waiting for the workload certificate from the control plane "
                               b"(last error: "), body
        assert b"refused" in body.lower(), body
        control.start()
        wait_for(lambda: proxy.health_request() == (200, b"ready\n"), timeout=15,
                 what="/healthz/ready to turn 200 once the certificate is there")


def test_a_taken_health_port_is_logged_and_the_sidecar_serves(config, proxy_factory):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", port))
        taken.listen()
        proxy = proxy_factory(config, "crowded", extra_args=["--health-port", str(port)])
        assert proxy.admin_request("/ready")[0] == 200
        assert proxy.curl("slow", "/").status == 200
    log = proxy.log_path.read_text()
    assert f"health checks are not served: cannot listen on 0.0.0.0:{port}" in log
    assert "give each sidecar on this host its own --health-port (0 turns it off)" in log
