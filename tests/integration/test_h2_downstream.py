"""HTTP/2 from clients to the sidecar (mesh.proxy.codec.h2_server), with real clients on real sockets.

- curl ``--http2-prior-knowledge`` and h2load (several streams per connection) through one sidecar
  to an HTTP/1.1 app, and through two sidecars with mTLS between them;
- the inbound port negotiates ALPN ``h2`` over mTLS (and still ``http/1.1``);
- request trailers reach the app; a reset stream leaves the others (and the connection) working;
- draining sends GOAWAY and lets the streams in flight finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from types import SimpleNamespace

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from tests.harness import free_port, wait_for
from tests.harness.backend import pattern_sha256
from tests.harness.curl import curl
from tests.integration.test_h2_support import H2Client, client_tls, mesh_certs
from tests.integration.test_identity_support import h2load, mesh_endpoint, spiffe
from tests.integration.test_proxy_support import endpoint, route_to, service_entry, virtual_service, write_config

NS = "default"
H2C = ["--http2-prior-knowledge"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, backend_factory, proxy_factory):
    """An HTTP/1.1 app behind a sidecar (workload ``echo``) and a client sidecar (``frontend``); the
    client reaches the app as ``plain`` (one sidecar) and as ``echo`` (two sidecars, mTLS)."""
    work = tmp_path_factory.mktemp("h2-downstream")
    ca, _bundle, options = mesh_certs(work / "certs", NS, "echo", "frontend")
    app = backend_factory("echo")
    inbound = free_port()
    config = write_config(work / "config", service_entry("echo", [mesh_endpoint(inbound, "echo")]),
                          service_entry("plain", [endpoint(app)]), service_entry("timed", [endpoint(app)]),
                          virtual_service("timed", ["timed"], [route_to("timed", timeout="1s")]))
    server = proxy_factory(config, "echo", app_port=app.port, inbound_port=inbound, extra_args=options["echo"])
    client = proxy_factory(config, "frontend", extra_args=options["frontend"])
    return SimpleNamespace(app=app, server=server, client=client, ca=ca, certs=work / "certs", config=config)


def test_curl_prior_knowledge_through_one_sidecar(mesh, tmp_path):
    client = mesh.client
    result = client.curl("plain", "/hello?x=1", extra_args=H2C)
    assert result.status == 200 and result.info["http_version"] == "2", result
    echo = result.json()
    assert (echo["path"], echo["version"], echo["headers"]["host"]) == ("/hello?x=1", "1.1", "plain")
    assert echo["headers"]["x-request-id"] and "x-forwarded-for" not in echo["headers"]  # sidecars append none
    assert echo["headers"]["x-forwarded-proto"] == "http"
    # a request body larger than the stream's window (64 KiB): the proxy gives the window back as it forwards
    body = os.urandom(300_000)
    posted = client.curl("plain", "/upload", data=body, extra_args=H2C).json()
    assert (posted["body_bytes"], posted["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    # a response larger than the windows of curl and of the proxy's upstream buffering comes intact
    out = tmp_path / "big"
    result = client.curl("plain", "/bytes/3000000", output=out, extra_args=H2C)
    assert result.status == 200
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(3_000_000)
    wait_for(lambda: '"path":"/hello?x=1"' in client.log_path.read_text(), timeout=5, what="the access log line")
    line = next(line for line in client.log_path.read_text().splitlines() if '"path":"/hello?x=1"' in line)
    assert '"protocol":"HTTP/2"' in line


def test_local_replies_are_http2_responses(mesh):
    result = mesh.client.curl("nowhere", "/", extra_args=H2C)
    assert result.status == 404 and result.info["http_version"] == "2"
    assert result.headers["x-mesh-flags"] == "NR" and b"no route to host 'nowhere'" in result.body


@pytest.mark.parametrize("host", ["plain", "echo"])
def test_h2load_several_streams_per_connection(mesh, host):
    """h2load: 3 connections with 10 streams each, through one sidecar (``plain``) or two with mTLS (``echo``)."""
    result = h2load(f"{mesh.client.outbound_url}/", args=["-n", 300, "-c", 3, "-m", 10, "-H", f":authority: {host}"],
                    timeout=60)
    assert (result.succeeded, result.status["2xx"]) == (300, 300), result.output


def test_inbound_port_negotiates_h2_over_mtls(mesh):
    """A mesh client offering ALPN h2 to the inbound port speaks HTTP/2 to it; the app sees HTTP/1.1 and the
    caller's identity; a client offering only http/1.1 still gets HTTP/1.1."""
    client = H2Client(mesh.server.inbound_port, tls=client_tls(mesh.ca, mesh.certs, NS, "frontend"))
    try:
        assert client.sock.selected_alpn_protocol() == "h2"
        streams = [client.request(f"/delay/300?n={n}", "echo") for n in range(5)]
        client.wait(lambda: client.done(*streams), what="5 concurrent streams")
        for stream in streams:
            response = client.responses[stream]
            assert response.status == 200, response
        echo = json.loads(client.responses[streams[0]].body)
        assert f"URI={spiffe(NS, 'frontend')}" in echo["headers"]["x-forwarded-client-cert"]
    finally:
        client.close()
    certs = mesh.certs
    proc = subprocess.run(["curl", "-sS", "-k", "--http1.1", "--cert", certs / "client-frontend.pem", "--key",
                           certs / "client-frontend-key.pem", "-w", "%{http_version}", "-o", os.devnull,
                           f"https://127.0.0.1:{mesh.server.inbound_port}/"], capture_output=True, text=True,
                          timeout=15)
    assert proc.stdout == "1.1", proc.stderr


def test_plaintext_prior_knowledge_on_the_permissive_inbound_port(mesh):
    """A client from outside the mesh (plaintext, PERMISSIVE by default) may speak h2c to the inbound port."""
    result = curl(f"{mesh.server.inbound_url}/from-outside", host="echo", extra_args=H2C)
    assert result.status == 200 and result.info["http_version"] == "2", result
    assert result.json()["path"] == "/from-outside"


@pytest.mark.parametrize("host", ["plain", "echo"])
def test_a_response_read_at_once_ends_on_its_last_data_frame(mesh, host):
    """The app's response (head and body in one read) leaves the sidecar as HEADERS and one DATA frame
    that carries END_STREAM, written together at the end of that read, not an empty DATA frame after
    (mesh.proxy.sockets.after_event); through two sidecars the upstream HTTP/2 hop does the same."""
    result = subprocess.run(["nghttp", "-v", "-n", "-H", f":authority: {host}", f"{mesh.client.outbound_url}/hello"],
                            capture_output=True, text=True, timeout=10)
    frames = re.findall(r"recv (HEADERS|DATA) frame <length=(\d+), flags=0x(\w+), stream_id=13>", result.stdout)
    assert [kind for kind, _length, _flags in frames] == ["HEADERS", "DATA"], result.stdout
    length, flags = int(frames[1][1]), int(frames[1][2], 16)
    assert length > 0 and flags & 0x1, result.stdout  # the body's bytes and END_STREAM together
    assert re.search(r"recv \(stream_id=13\) :status: 200", result.stdout), result.stdout


def test_request_trailers_reach_the_app(mesh):
    client = H2Client(mesh.client.outbound_port)
    try:
        stream = client.request("/grpc-like", "plain", method="POST", body=b"payload",
                                trailers=[("x-checksum", "abc123")])
        client.wait(lambda: client.done(stream))
        response = client.responses[stream]
        assert response.status == 200, response
    finally:
        client.close()
    echo = json.loads(response.body)
    assert echo["body_bytes"] == 7 and echo["headers"]["x-checksum"] == "abc123", echo


def test_a_reset_stream_leaves_the_others_working(mesh):
    client = H2Client(mesh.client.outbound_port)
    try:
        first, second, third = (client.request(f"/delay/600?stream={n}", "plain") for n in range(3))
        client.reset(second)
        client.wait(lambda: client.done(first, third), what="the streams that were not reset")
        assert [client.responses[s].status for s in (first, third)] == [200, 200]
        assert client.responses[second].status == 0  # nothing came for it
        again = client.request("/after-reset", "plain")
        client.wait(lambda: client.done(again))
        assert client.responses[again].status == 200 and client.terminated is None
    finally:
        client.close()
    # the reset stream's request was cut off upstream: the access log says the client went away
    log = mesh.client.log_path
    wait_for(lambda: '"path":"/delay/600?stream=1"' in log.read_text(), timeout=5, what="its access log line")
    line = next(line for line in log.read_text().splitlines() if '"path":"/delay/600?stream=1"' in line)
    assert '"response_flags":"DC"' in line, line


def test_a_failed_stream_is_reset_and_the_connection_goes_on(mesh):
    """A response cut short (its route's 1 s timeout passes while the client's window is closed) resets
    its stream only; a stream beside it, with an open window, gets its whole response."""
    client = H2Client(mesh.client.outbound_port, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0})
    try:
        cut = client.request("/bytes/1000000", "timed")
        whole = client.request("/delay/1500", "plain")
        client.conn.increment_flow_control_window(65535, stream_id=whole)
        client.flush()
        client.wait(lambda: client.done(cut, whole), what="both streams")
        assert (client.responses[cut].status, client.responses[cut].reset) == (200, ErrorCodes.INTERNAL_ERROR)
        assert client.responses[whole].status == 200 and client.responses[whole].ended
        assert client.terminated is None
    finally:
        client.close()


def test_a_stream_in_flight_has_no_idle_timeout(mesh, proxy_factory):
    """--idle-timeout 1, no route timeout: a stream whose app answers after 3 s gets its 200, and one whose
    request body pauses for as long is not cut, as in Istio (``stream_idle_timeout: 0s``).  The connection,
    with no stream left, is then closed at the idle timeout.  (The proxy once answered 504 UT instead.)"""
    proxy = proxy_factory(mesh.config, "patient", extra_args=["--idle-timeout", "1"])
    client = H2Client(proxy.outbound_port)
    try:
        paused = client.request("/upload", "plain", method="POST", body=b"he", end=False)
        started = time.monotonic()
        slow = client.request("/delay/3000", "plain")
        client.wait(lambda: client.done(slow), what="the slow response")
        assert (client.responses[slow].status, client.responses[slow].reset) == (200, None), client.responses
        assert time.monotonic() - started >= 3.0 and client.terminated is None
        client.conn.send_data(paused, b"llo", end_stream=True)   # 3 s after the first bytes of the body
        client.flush()
        client.wait(lambda: client.done(paused), what="the paused upload's response")
        assert client.responses[paused].status == 200, client.responses
        assert json.loads(client.responses[paused].body)["body_bytes"] == 5
        idle_since = time.monotonic()
        client.wait(lambda: client.closed, timeout=5, what="the idle connection to close")
        assert client.terminated is not None and 0.9 <= time.monotonic() - idle_since < 3.0
    finally:
        client.close()


def test_drain_sends_goaway_and_finishes_streams_in_flight(mesh, proxy_factory):
    """nghttp (a real HTTP/2 client) has a request in flight when the sidecar is told to stop: it gets the
    GOAWAY announcing the shutdown, then the one naming its stream as the last, then its response."""
    proxy = proxy_factory(mesh.config, "leaving", extra_args=["--drain-time", "5s"])
    nghttp = subprocess.Popen(["nghttp", "-v", "-n", "-H", ":authority: plain", f"{proxy.outbound_url}/delay/1000"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(row["active_requests"] for cluster in proxy.admin("/clusters").values()
                             for row in cluster["endpoints"]), timeout=5, what="the request in flight")
        started = time.monotonic()
        proxy.send_signal(15)
        output, _ = nghttp.communicate(timeout=10)
    finally:
        nghttp.kill()
    goaways = re.findall(r"recv GOAWAY frame.*\n\s*\(last_stream_id=(\d+), error_code=(\w+)", output)
    served = re.findall(r"recv \(stream_id=(\d+)\) :status: (\d+)", output)
    assert len(served) == 1 and served[0][1] == "200", output
    assert goaways == [("2147483647", "NO_ERROR"), (served[0][0], "NO_ERROR")], output
    wait_for(lambda: not proxy.running, timeout=6, what="the sidecar to exit")
    assert time.monotonic() - started < 4
    proxy.stop()
