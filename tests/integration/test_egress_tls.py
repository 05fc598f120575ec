"""Egress TLS through a real sidecar (issue #13, "Egress"): TLS origination, as Istio's "Egress TLS Origination".

::

    this test (the app, plain HTTP, Host: X) ---> sidecar outbound ---> TLS server outside the mesh
                                                  (DestinationRule tls)  tests/apps/tls_origin.py: answers
                                                                         with the SNI, client certificate
                                                                         and ALPN it saw

One TLS server (a certificate for api.example, mutual.example and db.example from a test CA; its second port
requires a client certificate) and one sidecar whose ServiceEntries, as in Istio's task, have an
HTTP port 80 with ``targetPort`` the server's TLS port, and whose DestinationRules originate TLS:

- api.example         SIMPLE, portLevelSettings port 80, caCertificates the test CA: 200, SNI api.example
- custom-sni.example  SIMPLE, sni api.example: the server sees that SNI, the name checked is it
- alias.example       SIMPLE, subjectAltNames [api.example]: the name sent (alias.example) is not checked
- other-ca.example    SIMPLE, caCertificates another CA: 503 UF, the chain refused
- wrong-name.example  SIMPLE, the test CA, the certificate is not for the name: 503 UF
- system-ca.example   SIMPLE without caCertificates: the system's roots, which do not have the test CA: 503
- skip.example        SIMPLE, insecureSkipVerify: 200 despite an unknown CA and another name
- missing.example     SIMPLE, caCertificates a file that does not exist: 503 UF saying so
- mutual.example      subset v1 (VirtualService) MUTUAL with a client certificate: the server saw it
- *.wild.example      SIMPLE, no sni: no name to check, so 503 UF (Envoy would take it from each Host);
                      *.wild-sni.example with sni api.example: 200
- db.example          a TCP port (an explicit --outbound-tcp-port): the app's bytes go over the TLS the
                      sidecar originates; with another CA (db-other-ca.example) the connection is closed
"""

from __future__ import annotations

import datetime
import errno
import json
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import ManagedProcess, free_port, venv_bin
from tests.harness.waiting import wait_for
from tests.integration.test_identity_support import make_ca
from tests.integration.test_proxy_support import write_config
from tests.integration.test_telemetry_support import access_log

NS = "egress"
NETWORKING = "networking.istio.io/v1"
ORIGIN = Path(__file__).resolve().parents[1] / "apps" / "tls_origin.py"


class TlsOrigin(ManagedProcess):
    """``tests/apps/tls_origin.py``: ready once it printed ``serving``."""

    kind = "tls-origin"

    def __init__(self, name, *args, log_dir):
        super().__init__(name, [venv_bin("python"), ORIGIN, *args], Path(log_dir) / f"tls-origin-{name}.log")

    def is_ready(self) -> bool:
        return self.log_path.exists() and "serving" in self.log_path.read_text()


def _pem(directory: Path, name: str, issuer, common_name: str, dns_names=()) -> tuple[Path, Path]:
    """A leaf certificate signed by ``issuer`` = ``(key, cert)``; returns its ``(cert, key)`` PEM paths."""
    issuer_key, issuer_cert = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(issuer_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1)))
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]),
                                        critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _write_ca(directory: Path, name: str):
    ca = make_ca(name)
    path = directory / f"{name}.pem"
    path.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    return ca, path


def _resource(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": NETWORKING, "kind": kind, "metadata": {"name": name, "namespace": NS}, "spec": spec}


def _service_entry(host: str, target_port: int, labels=None, number=80, protocol="HTTP") -> dict:
    """Istio's task shape: port 80 HTTP, ``targetPort`` the server's TLS port, a STATIC loopback endpoint."""
    endpoint = {"address": "127.0.0.1", **({"labels": labels} if labels else {})}
    return _resource("ServiceEntry", host.split(".")[0], {
        "hosts": [host], "location": "MESH_EXTERNAL", "resolution": "STATIC",
        "ports": [{"number": number, "name": protocol.lower(), "protocol": protocol, "targetPort": target_port}],
        "endpoints": [endpoint]})


def _rule(host: str, **tls) -> dict:
    return _resource("DestinationRule", host.split(".")[0], {"host": host, "trafficPolicy": {"tls": tls}})


@pytest.fixture(scope="module")
def egress(proxy_factory, tmp_path_factory, process_log_dir):
    work = tmp_path_factory.mktemp("egress-tls")
    ca, ca_path = _write_ca(work, "external-ca")
    _, other_ca_path = _write_ca(work, "other-ca")
    server_cert, server_key = _pem(work, "server", ca, "api.example", ("api.example", "mutual.example", "db.example"))
    client_cert, client_key = _pem(work, "client", ca, "sleep-client")
    port, mutual_port = free_port(), free_port()
    TlsOrigin("server", "--port", port, "--mutual-port", mutual_port, "--client-ca", ca_path,
              "--cert", server_cert, "--key", server_key, log_dir=process_log_dir).start()
    simple = {"mode": "SIMPLE", "caCertificates": str(ca_path)}
    documents = [_service_entry(host, port) for host in (
        "api.example", "custom-sni.example", "alias.example", "other-ca.example", "wrong-name.example",
        "system-ca.example", "skip.example", "missing.example")]
    documents += [
        _resource("DestinationRule", "api", {"host": "api.example", "trafficPolicy": {
            "portLevelSettings": [{"port": {"number": 80}, "tls": simple}]}}),
        _rule("custom-sni.example", **simple, sni="api.example"),
        _rule("alias.example", **simple, subjectAltNames=["api.example"]),
        _rule("other-ca.example", mode="SIMPLE", caCertificates=str(other_ca_path)),
        _rule("wrong-name.example", **simple),
        _rule("system-ca.example", mode="SIMPLE"),
        _rule("skip.example", mode="SIMPLE", insecureSkipVerify=True),
        _rule("missing.example", mode="SIMPLE", caCertificates=str(work / "no-such-ca.pem")),
        _service_entry("mutual.example", mutual_port, labels={"version": "v1"}),
        _resource("DestinationRule", "mutual", {"host": "mutual.example", "subsets": [{
            "name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"tls": {
                "mode": "MUTUAL", "caCertificates": str(ca_path), "clientCertificate": str(client_cert),
                "privateKey": str(client_key)}}}]}),
        _resource("VirtualService", "mutual", {"hosts": ["mutual.example"], "http": [
            {"route": [{"destination": {"host": "mutual.example", "subset": "v1"}}]}]}),
    ]
    for name, host, extra in (("wild", "*.wild.example", {}),
                              ("wild-sni", "*.wild-sni.example", {"sni": "api.example"})):
        entry = _service_entry(host, port)
        documents += [{**entry, "metadata": {**entry["metadata"], "name": name}},
                      _resource("DestinationRule", name, {"host": host, "trafficPolicy": {"tls": {**simple, **extra}}})]
    tcp_ports = {"db.example": free_port(), "db-other-ca.example": free_port()}
    documents += [_service_entry(host, port, number=number, protocol="TCP") for host, number in tcp_ports.items()]
    documents += [_rule("db.example", **simple),
                  _rule("db-other-ca.example", mode="SIMPLE", caCertificates=str(other_ca_path))]
    config = write_config(work / "config", *documents)
    log = work / "access.log"
    listeners = [arg for number in tcp_ports.values() for arg in ("--outbound-tcp-port", number)]
    proxy = proxy_factory(config, "sleep", namespace=NS, extra_args=["--access-log", log, *listeners])
    proxy.tcp_ports = tcp_ports
    return proxy, log


def _logged(log: Path, request_id: str) -> dict:
    def entry():
        return next((line for line in access_log(log) if line["request_id"] == request_id), None)

    return wait_for(entry, 10, what=f"the access-log line of {request_id} in {log}")


def _get(egress, host: str, request_id: str):
    proxy, _ = egress
    return proxy.curl(host, f"/{request_id}", headers={"x-request-id": request_id})


@pytest.mark.parametrize("host, sni", [
    ("api.example", "api.example"),  # the service's host is the SNI and the name checked (Istio's auto SNI)
    ("custom-sni.example", "api.example"),  # tls.sni is sent, and checked
    ("alias.example", "alias.example"),  # subjectAltNames are checked instead of the SNI
    ("skip.example", "skip.example"),  # insecureSkipVerify: neither the chain nor the name
])
def test_origination_sends_plain_http_over_verified_tls(egress, host, sni):
    result = _get(egress, host, f"ok-{host}")
    assert result.status == 200, result
    seen = result.json()
    # no ALPN offered for HTTP/1.1, as Istio programs Envoy
    assert (seen["sni"], seen["client"], seen["alpn"], seen["path"]) == (sni, None, None, f"/ok-{host}")


def test_a_new_connection_resumes_the_session_of_a_verified_one(egress):
    first = _get(egress, "alias.example", "first/close")  # the server closes: the next request needs a new one
    second = _get(egress, "alias.example", "second/close")
    assert (first.status, second.status) == (200, 200), (first, second)
    assert (first.json()["reused"], second.json()["reused"]) == (False, True)
    assert second.json()["sni"] == "alias.example"  # the resumed connection sends the SNI too


@pytest.mark.parametrize("host, reason", [
    ("other-ca.example", "the server's certificate was refused: unable to get local issuer certificate"),
    ("system-ca.example", "the server's certificate was refused: unable to get local issuer certificate"),
    ("wrong-name.example", "the server's certificate is not for wrong-name.example (its names: api.example, "
                           "mutual.example, db.example)"),
])
def test_a_server_that_fails_the_checks_gets_503_uf_with_the_reason(egress, host, reason):
    request_id = f"refused-{host}"
    result = _get(egress, host, request_id)
    assert (result.status, result.headers.get("x-mesh-flags")) == (503, "URX,UF"), result  # retried, as Envoy
    assert f"TLS handshake failed: {reason}" in result.body.decode(), result.body
    entry = _logged(egress[1], request_id)
    assert entry["response_flags"] == "URX,UF"
    assert entry["response_code_details"].startswith(
        "upstream_reset_before_response_started{connection_failure,TLS_error:"), entry
    assert reason.replace(" ", "_") in entry["response_code_details"], entry


def test_a_ca_file_that_cannot_be_read_is_named(egress):
    result = _get(egress, "missing.example", "missing-ca")
    assert (result.status, result.headers.get("x-mesh-flags")) == (503, "URX,UF"), result
    assert "cannot read tls.caCertificates" in result.body.decode() and "no-such-ca.pem" in result.body.decode()


def test_a_wildcard_host_without_sni_or_subject_alt_names_is_refused(egress):
    """Envoy (Istio's auto SNI and SAN validation) would take the name from the request's Host; txmesh does not,
    so it refuses rather than accept any certificate its CAs trust (the server's is for api.example, not
    a.wild.example). With sni the name is checked (and sent)."""
    refused = _get(egress, "a.wild.example", "wild-no-name")
    assert (refused.status, refused.headers.get("x-mesh-flags")) == (503, "URX,UF"), refused
    assert ("tls.mode SIMPLE without sni or subjectAltNames has no name to check the server's certificate against"
            in refused.body.decode()), refused.body
    named = _get(egress, "a.wild-sni.example", "wild-sni")
    assert named.status == 200 and named.json()["sni"] == "api.example", named


def test_an_http2_request_offers_h2_and_gets_the_http1_the_server_chose(egress):
    proxy, _ = egress
    result = proxy.curl("api.example", "/h2", extra_args=["--http2-prior-knowledge"])
    assert result.status == 200, result
    assert (result.json()["alpn"], result.json()["sni"]) == ("http/1.1", "api.example")


def test_config_dump_shows_the_tls_originated_to_each_endpoint(egress):
    clusters = {cluster["name"]: cluster for cluster in egress[0].admin("/config_dump")["config"]["clusters"]}
    [endpoint] = clusters["outbound|80||custom-sni.example"]["endpoints"]
    assert endpoint["tls_origination"] == {
        "mode": "SIMPLE", "sni": "api.example", "subject_alt_names": [], "ca_certificates": endpoint[
            "tls_origination"]["ca_certificates"], "client_certificate": None, "insecure_skip_verify": False}
    assert endpoint["tls_origination"]["ca_certificates"].endswith("external-ca.pem")
    assert endpoint["identity"] is None


def test_mutual_presents_the_client_certificate_of_the_subset(egress):
    result = _get(egress, "mutual.example", "mutual")
    assert result.status == 200, result
    assert json.loads(result.body)["client"] == "sleep-client"


def _tcp_exchange(egress, host: str, data: bytes) -> bytes:
    """Send ``data`` on a TCP connection to the sidecar's explicit listener of ``host``; all it answered
    before it closed the connection.  A close that finds ``data`` still unread in the sidecar's socket
    is a reset (the kernel's choice, not the sidecar's): it ends the answer as a FIN does, whenever it
    comes (on a busy host, before ``sendall`` or ``shutdown`` too: then they find the connection gone)."""
    proxy, _ = egress
    chunks = []
    with socket.create_connection(("127.0.0.1", proxy.tcp_ports[host]), timeout=10) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
        except OSError as error:
            if error.errno != errno.ENOTCONN:
                raise
    return b"".join(chunks)


def test_a_tcp_port_carries_the_apps_bytes_over_the_originated_tls(egress):
    answer = _tcp_exchange(egress, "db.example", b"GET /over-tcp HTTP/1.1\r\nHost: db.example\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert json.loads(body)["sni"] == "db.example" and json.loads(body)["path"] == "/over-tcp"


def test_a_tcp_port_to_a_refused_server_is_closed(egress):
    assert _tcp_exchange(egress, "db-other-ca.example", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
