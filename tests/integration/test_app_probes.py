"""App probes through the sidecar's health port (Istio's probe rewriting): a real ``twistd mesh-proxy
--health-port --app-probers`` in front of a real demo app and a small recording HTTP(S) server --
``/app-health/<container>/<kind>`` answers with the app's status, 503 with the reason when the app is down or
does not answer within the probe's timeout, 404 for any probe not recorded; path, headers and HTTPS reach the
app; the sidecar's own readiness is unaffected; a bad --app-probers stops mesh-proxy with what is wrong."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import wait_for
from tests.harness.net import free_port, http_request
from tests.harness.processes import venv_bin
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

POD_ADDRESS = "127.0.0.2"  # the pod IP the kubelet probes: not the app's loopback address
KUBELET = {"User-Agent": "kube-probe/1.31"}


class RecordingApp:
    """An HTTP (or HTTPS) server on 127.0.0.1 that answers 204 and records each request's target and headers.

    ``/hang`` never answers: it waits (up to 10 s) for the client to close, and records when in ``closed``.
    """

    def __init__(self, tls_context: ssl.SSLContext | None = None):
        self.requests = []
        self.closed = []
        recorded, closed = self.requests, self.closed

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                recorded.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                if self.path == "/hang":
                    self.connection.settimeout(10)
                    try:
                        self.connection.recv(1)  # b"": closed; the sidecar's abort resets it
                    except ConnectionResetError:
                        pass
                    except TimeoutError:
                        return
                    closed.append(time.monotonic())
                    return
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port("127.0.0.1")), Handler)
        self.server.daemon_threads = True
        if tls_context is not None:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def self_signed_context(directory) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for "app.local" (which nobody could verify)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.local")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    (directory / "app.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "app.pem")
    return context


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """The recording app over HTTP and over HTTPS."""
    plain, secure = RecordingApp(), RecordingApp(self_signed_context(tmp_path_factory.mktemp("tls")))
    yield plain, secure
    plain.close()
    secure.close()


def http_get(path: str, port: int, **extra) -> dict:
    return {"httpGet": {"path": path, "port": port, "scheme": "HTTP", **extra}, "timeoutSeconds": 1}


@pytest.fixture(scope="module")
def backend(backend_factory):
    return backend_factory("web")


@pytest.fixture(scope="module")
def closed_port():
    return free_port("127.0.0.1")  # nothing listens there


@pytest.fixture(scope="module")
def probers(backend, apps, closed_port):
    plain, secure = apps
    return {
        "/app-health/web/readyz": http_get("/status/200", backend.port),
        "/app-health/web/livez": http_get("/status/503", backend.port),
        "/app-health/web/startupz": http_get("/delay/5000", backend.port),
        "/app-health/moved/readyz": http_get("/status/302", backend.port),
        "/app-health/teapot/readyz": http_get("/status/418", backend.port),
        "/app-health/down/readyz": http_get("/", closed_port),
        "/app-health/echo/readyz": http_get("/health/deep?verbose=1", plain.port, httpHeaders=[
            {"name": "X-Probe", "value": "deep"}, {"name": "Host", "value": "app.example"}]),
        "/app-health/hang/livez": {"httpGet": {"path": "/hang", "port": plain.port}, "timeoutSeconds": 5},
        "/app-health/secure/readyz": {"httpGet": {"path": "/tls", "port": secure.port, "scheme": "HTTPS"},
                                      "timeoutSeconds": 2},
        "/app-health/web-tcp/livez": {"tcpSocket": {"port": backend.port}, "timeoutSeconds": 1},
        "/app-health/gone-tcp/livez": {"tcpSocket": {"port": closed_port}, "timeoutSeconds": 1},
    }


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, backend, probers, proxy_factory):
    config = write_config(tmp_path_factory.mktemp("app-probes"), service_entry("web", [endpoint(backend)]))
    return proxy_factory(config, "probed", app_port=backend.port,
                         extra_args=["--inbound-address", POD_ADDRESS, "--app-probers", json.dumps(probers)])


def probe(proxy, path: str, headers=KUBELET) -> tuple[int, str]:
    status, body = http_request(POD_ADDRESS, proxy.health_port, path, headers=headers, timeout=10)
    return status, body.decode()


@pytest.mark.parametrize("path, status", [
    ("/app-health/web/readyz", 200),
    ("/app-health/web/livez", 503),  # the app's own 503
    ("/app-health/moved/readyz", 302),  # 200-399 passes for the kubelet; the redirect is not followed
    ("/app-health/teapot/readyz", 418),
])
def test_the_answer_is_the_apps_status(proxy, path, status):
    answer, text = probe(proxy, path)
    assert answer == status, text
    assert text == f"the app answered {status} to GET /status/{status} on port {proxy.app_port}\n"


def test_an_app_that_is_down_fails_the_probe_with_the_reason(proxy, closed_port):
    status, text = probe(proxy, "/app-health/down/readyz")
    assert status == 503
    assert text.startswith(f"GET http://127.0.0.1:{closed_port}/: ") and "refused" in text.lower(), text


def test_an_app_that_hangs_fails_at_the_probes_timeout(proxy, backend):
    started = time.monotonic()
    status, text = probe(proxy, "/app-health/web/startupz")
    took = time.monotonic() - started
    assert status == 503
    assert text == (f"GET http://127.0.0.1:{backend.port}/delay/5000: no answer within 1s "
                    "(the probe's timeoutSeconds)\n")
    assert 0.9 <= took < 2.5, f"answered after {took:.2f}s with a 1 s timeout"


def test_hanging_probes_do_not_block_the_port_nor_the_sidecars_readiness(proxy):
    """Ten probes of a hanging app at once (the reactor is not blocked): /healthz/ready answers meanwhile,
    200 -- the app's failing probes are no part of the sidecar's readiness."""
    with ThreadPoolExecutor(10) as pool:
        hanging = [pool.submit(probe, proxy, "/app-health/web/startupz") for _ in range(10)]
        wait_for(lambda: proxy.health_request(address=POD_ADDRESS) == (200, b"ready\n"), timeout=0.5,
                 what="/healthz/ready while ten app probes hang")
        assert [future.result()[0] for future in hanging] == [503] * 10
    assert probe(proxy, "/app-health/web/readyz")[0] == 200


def test_path_headers_and_user_agent_reach_the_app(proxy, apps):
    plain, _ = apps
    before = len(plain.requests)
    assert probe(proxy, "/app-health/echo/readyz")[0] == 204
    (target, headers), = plain.requests[before:]
    assert target == "/health/deep?verbose=1"
    assert headers["x-probe"] == "deep" and headers["host"] == "app.example"
    assert headers["user-agent"] == "kube-probe/1.31", "the kubelet's own User-Agent"


def test_a_kubelet_that_hangs_up_cancels_its_probe(proxy, apps):
    """The probe's timeout is 5 s; the kubelet gives up once the probe reached the app: the sidecar closes its
    connection to the app then, not at the timeout."""
    plain, _ = apps
    before = len(plain.requests)
    with socket.create_connection((POD_ADDRESS, proxy.health_port), timeout=5) as kubelet:
        kubelet.sendall(b"GET /app-health/hang/livez HTTP/1.1\r\nHost: pod\r\n\r\n")
        wait_for(lambda: len(plain.requests) > before, timeout=2, what="the probe to reach the app")
        hung_up = time.monotonic()  # long before the probe's timeout
    wait_for(lambda: plain.closed and plain.closed[-1] > hung_up, timeout=2,
             what="the sidecar to close its connection to the app once the kubelet hung up")
    assert plain.closed[-1] - hung_up < 1.5


def test_an_https_app_is_probed_without_certificate_checks(proxy, apps):
    _, secure = apps
    before = len(secure.requests)
    status, text = probe(proxy, "/app-health/secure/readyz")
    assert status == 204, text
    assert [target for target, _ in secure.requests[before:]] == ["/tls"]


def test_tcp_socket_probes_connect_to_the_app(proxy, closed_port):
    assert probe(proxy, "/app-health/web-tcp/livez") == (200, f"port {proxy.app_port} accepts connections\n")
    status, text = probe(proxy, "/app-health/gone-tcp/livez")
    assert status == 503 and text.startswith(f"tcp connect to 127.0.0.1:{closed_port}: "), text


@pytest.mark.parametrize("path", [
    "/app-health/web/healthz",  # not a probe kind
    "/app-health/other/readyz",  # not a recorded container
    "/app-health/web/readyz/extra",
    "/app-health/web",
    "/app-health/",
    "/app-health/web/../moved/readyz",
])
def test_only_recorded_probes_are_reachable(proxy, path):
    status, text = probe(proxy, path)
    assert status == 404, text
    assert "the sidecar probes only what the injector recorded" in text


@pytest.mark.parametrize("given_as, words", [
    ("--app-probers", "port must be a number (1-65535), got 'http'; named ports are resolved by the injector"),
    ("$TXMESH_APP_PROBERS", "port must be a number (1-65535), got 'http'"),
])
def test_bad_app_probers_stop_mesh_proxy_with_what_is_wrong(tmp_path, given_as, words):
    """The parser's other messages: tests/unit/test_app_probes.py."""
    probers = '{"/app-health/web/readyz": {"httpGet": {"path": "/", "port": "http"}}}'
    argv = [venv_bin("twistd"), "-n", "--pidfile=", "mesh-proxy", "--config-dir", str(tmp_path),
            "--workload", "w", "--health-port", str(free_port())]
    env = dict(os.environ)
    if given_as == "--app-probers":
        argv += ["--app-probers", probers]
    else:
        env["TXMESH_APP_PROBERS"] = probers
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30, env=env)
    assert done.returncode != 0
    assert f"{given_as}: /app-health/web/readyz: " in done.stdout and words in done.stdout, done.stdout
