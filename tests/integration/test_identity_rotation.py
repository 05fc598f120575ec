"""Certificate rotation under load: zero failed requests while both sidecars rotate, again and again.

mesh-control issues 20 s certificates (``--workload-cert-ttl 20s``), so each sidecar rotates about every
10 s. h2load drives 4 connections x 50 requests/s through frontend -> user-service for 60 s. A
DestinationRule caps upstream connections at 10 requests, so the frontend opens ~20 new mTLS connections
a second: handshakes happen before, during and after every rotation, on both sides, with both old and
new certificates. Meanwhile the test samples, on fresh connections, the certificate user-service
presents and the one frontend presents (the XFCC hash the app sees): they must change over time.

This test takes about 75 s (the other identity modules stay well under that).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest
from cryptography import x509

from tests.integration.test_identity_support import (
    assert_no_secrets_in_logs,
    issue_cert,
    mesh_ca,
    mtls_pair,
    parse_h2load,
    spiffe,
    xfcc,
)

NS = "shop"
DURATION = 60
INSTALLED = "workload certificate for {} installed"


@pytest.fixture(scope="module")
def pair(control_factory, backend_factory, proxy_factory, tmp_path_factory):
    control = control_factory(workload_cert_ttl="20s")
    app, server, client = mtls_pair(control, backend_factory, proxy_factory,
                                    tmp_path_factory.mktemp("rotation-config"), NS)
    return control, app, server, client


def server_certificate(port: int, cafile, cert, key) -> x509.Certificate:
    """The certificate the sidecar presents on a fresh connection (we present a valid mesh client cert)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False
    context.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def installed_count(proxy, identity: str) -> int:
    return proxy.log_path.read_text().count(INSTALLED.format(identity))


@pytest.mark.timeout(DURATION + 90)
def test_rotation_under_load_fails_no_request(pair, tmp_path):
    control, app, server, client = pair
    frontend_id, user_id = spiffe(NS, "frontend"), spiffe(NS, "user-service")
    probe_cert, probe_key = issue_cert(tmp_path, "probe", mesh_ca(control.state_dir), spiffe(NS, "probe"))
    installed_before = installed_count(client, frontend_id), installed_count(server, user_id)
    signed_before = control.admin()["csr_signed"]

    load = subprocess.Popen(
        ["h2load", "--h1", "-c", "4", "--rps", "50", "-D", str(DURATION), "-H", ":authority: user-service",
         f"{client.outbound_url}/load"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    server_serials, client_hashes, samples, problems = set(), set(), 0, []
    try:
        while load.poll() is None:
            samples += 1
            server_serials.add(server_certificate(server.inbound_port, control.root_cert, probe_cert, probe_key)
                               .serial_number)
            sample = client.curl("user-service", "/sample")
            if sample.status == 200:
                seen = xfcc(sample.json()["headers"]["x-forwarded-client-cert"])
                assert (seen["URI"], seen["By"]) == (frontend_id, user_id), seen
                client_hashes.add(seen["Hash"])
            else:
                problems.append(f"sample request: {sample.status} {sample.body[:300]!r} {sample.error}")
            for proxy in (client, server):
                status, body = proxy.admin_request("/ready")
                if status != 200:
                    problems.append(f"{proxy} /ready {status}: {body[:300]!r}")
            time.sleep(1.0)
        output = load.communicate(timeout=30)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()

    result = parse_h2load(output)

    rotations = (installed_count(client, frontend_id) - installed_before[0],
                 installed_count(server, user_id) - installed_before[1])
    report = (f"h2load: {result.done} done, {result.succeeded} succeeded, {result.failed} failed, "
              f"{result.errored} errored, {result.timeout} timeout, {result.status}; rotations (frontend, "
              f"user-service) {rotations}; {len(server_serials)} server certificates and {len(client_hashes)} "
              f"client certificates seen in {samples} samples\n{output[-1500:]}")
    assert result.done >= 0.9 * 200 * DURATION, report  # the load really ran at ~200 requests/s
    assert (result.failed, result.errored, result.timeout) == (0, 0, 0), report
    assert result.succeeded == result.done == result.status["2xx"], report
    assert result.status["5xx"] == result.status["4xx"] == 0, report
    assert not problems, "\n".join(problems) + "\n" + report
    # ~6 rotations each in 60 s at ~50% of 20 s (with jitter); "several" is at least 4
    assert min(rotations) >= 4, report
    assert control.admin()["csr_signed"] >= signed_before + sum(rotations)
    assert len(server_serials) >= 4 and len(client_hashes) >= 4, report
    for proxy, identity in ((client, frontend_id), (server, user_id)):
        assert "certificate renewal failed" not in proxy.log_path.read_text(), proxy.describe("a renewal failed")
        dump = proxy.admin("/config_dump")["certificate"]
        assert dump["identity"] == identity and dump["renewals"] >= min(rotations), dump
    # many keys were generated and many certificates signed: none of it leaks into a log
    assert_no_secrets_in_logs([control, client, server, app], tokens=control.tokens,
                              key_files=[control.state_dir / "ca-key.pem"])
    assert app.log_path.read_text().count("GET /load") >= result.succeeded
