"""The control plane's CSR endpoint under hostile input, over real TLS (``POST /v1/csr``).

Every bad request must get a clean JSON error with the right status (400/401/403/413), a rejection line
with the reason in the control plane log (never the token, never a traceback) and a bump of the
``csr_rejected`` counters of ``/ready``. A sidecar whose token is refused waits, not ready, and says why.
"""

from __future__ import annotations

import datetime
import http.client
import json
import ssl
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.harness import Proxy, wait_for
from tests.integration.test_identity_support import (
    assert_no_secrets_in_logs,
    issue_cert,
    make_ca,
    mesh_ca,
    spiffe,
)
from tests.integration.test_proxy_support import service_entry, write_config
from tests.unit.test_identity_csr import build_csr

NS = "bank"
TTL_CAP = 3600  # the control plane's --workload-cert-ttl


@pytest.fixture(scope="module")
def control(control_factory):
    return control_factory(workload_cert_ttl="1h")


def tls_context(control) -> ssl.SSLContext:
    """Trusts the mesh root only. The control plane's certificate names it by SPIFFE id (a URI SAN), not by
    host name, so the chain is verified here and the SAN compared by :func:`test_endpoint_identity`."""
    context = ssl.create_default_context(cafile=str(control.root_cert))
    context.check_hostname = False
    return context


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Answer({self.status}, {self.body[:500]!r})"


def post(control, body, *, headers=None, path="/v1/csr", chunked=False, client_cert=None) -> Answer:
    """POST to the CSR endpoint; ``client_cert=(cert, key)`` presents a TLS client certificate."""
    context = tls_context(control)
    if client_cert is not None:
        context.load_cert_chain(*map(str, client_cert))
    conn = http.client.HTTPSConnection("127.0.0.1", control.port, context=context, timeout=20)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if chunked:
            conn.request("POST", path, body=iter([data]), encode_chunked=True,
                         headers={"content-type": "application/json", **(headers or {})})
        else:
            conn.request("POST", path, body=data, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def csr_for(service_account: str, key=None) -> str:
    return build_csr(key, sans=(spiffe(NS, service_account),)).decode()


def rejected_total(control) -> int:
    return sum(control.admin()["csr_rejected"].values())


# -- the good request, as a reference ----------------------------------------------------------------------

def test_endpoint_identity(control):
    with ssl.create_connection(("127.0.0.1", control.port), timeout=10) as raw:
        with tls_context(control).wrap_socket(raw) as tls:
            san = tls.getpeercert()["subjectAltName"]
            assert tls.version() == "TLSv1.3"
    assert san == (("URI", "spiffe://cluster.local/ns/mesh-system/sa/mesh-control"),)


def test_valid_request_is_signed(control):
    before = control.admin()["csr_signed"]
    key = ec.generate_private_key(ec.SECP256R1())
    answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller", key), "ttl": 600})
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "application/json"
    doc = answer.json()
    assert set(doc) == {"certificate", "chain", "trust_bundle", "not_after", "issuer"}
    assert doc["issuer"] == "builtin CA CN=txmesh root CA cluster.local,O=cluster.local"
    cert = x509.load_pem_x509_certificate(doc["certificate"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [spiffe(NS, "teller")]
    assert doc["trust_bundle"] == control.root_cert.read_text()
    assert datetime.datetime.fromisoformat(doc["not_after"]) == cert.not_valid_after_utc
    life = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 590 < life <= 600
    assert control.admin()["csr_signed"] == before + 1


def test_ttl_is_capped_by_the_control_plane(control):
    answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller"), "ttl": 30 * 86400})
    assert answer.status == 200, answer
    cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    life = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert TTL_CAP - 10 < life <= TTL_CAP


def test_default_ttl(control):
    answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller")})
    cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    life = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert TTL_CAP - 10 < life <= TTL_CAP


# -- hostile requests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expired_token(control):
    token = control.token(NS, "teller", ttl="1s")
    time.sleep(1.2)
    return token


@pytest.fixture(scope="module")
def foreign_tokens(control_factory, tmp_path_factory):
    """Tokens from another control plane (another key) and for another trust domain (this key)."""
    other = control_factory(tmp_path_factory.mktemp("other-state"))
    other_token = other.token(NS, "teller")
    other.stop()
    return other_token


def _tamper_claims(token: str) -> str:
    import base64
    prefix, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sa"] = "vault"
    forged = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{prefix}.{forged}.{signature}"


def _rsa_csr(bits):
    return build_csr(rsa.generate_private_key(65537, bits), sans=(spiffe(NS, "teller"),)).decode()


def _bad_signature_csr():
    der = x509.load_pem_x509_csr(csr_for("teller").encode()).public_bytes(serialization.Encoding.DER)
    der = der[:-2] + bytes([der[-2] ^ 1]) + der[-1:]
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


# (case id, request builder(control, tokens) -> body bytes or dict, expected status, counter key, reason text)
CASES = [
    ("garbage-json", lambda c, t: b"{this is not json", 400, "malformed request", "expected JSON"),
    ("binary", lambda c, t: bytes(range(256)) * 4, 400, "malformed request", "expected JSON"),
    ("json-array", lambda c, t: b"[1, 2, 3]", 400, "malformed request", "expected JSON"),
    ("json-string", lambda c, t: b'"credential"', 400, "malformed request", "expected JSON"),
    ("empty-object", lambda c, t: {}, 400, "malformed request", "expected JSON"),
    ("no-csr", lambda c, t: {"credential": t["good"]}, 400, "malformed request", "expected JSON"),
    ("no-credential", lambda c, t: {"csr": csr_for("teller")}, 401, None, "no credential"),
    ("csr-not-a-string", lambda c, t: {"credential": t["good"], "csr": 42}, 400, "malformed request", "JSON"),
    ("negative-ttl", lambda c, t: {"credential": t["good"], "csr": csr_for("teller"), "ttl": -5},
     400, "malformed request", "JSON"),
    ("ttl-not-a-number", lambda c, t: {"credential": t["good"], "csr": csr_for("teller"), "ttl": "forever"},
     400, "malformed request", "JSON"),
    ("empty-body", lambda c, t: b"", 400, "malformed request", "expected JSON"),
    ("oversize-body", lambda c, t: b'{"credential": "' + b"A" * 200_000 + b'"}', 413, None, "at most"),
    ("tampered-token", lambda c, t: {"credential": _tamper_claims(t["good"]), "csr": csr_for("vault")},
     401, "credential rejected", "signature is invalid"),
    ("expired-token", lambda c, t: {"credential": t["expired"], "csr": csr_for("teller")},
     401, "credential rejected", "token expired"),
    ("other-control-plane", lambda c, t: {"credential": t["foreign"], "csr": csr_for("teller")},
     401, "credential rejected", "another control plane"),
    ("garbage-token", lambda c, t: {"credential": "let-me-in", "csr": csr_for("teller")},
     401, "credential rejected", "malformed token"),
    ("token-not-a-string", lambda c, t: {"credential": {"sa": "teller"}, "csr": csr_for("teller")},
     401, "credential rejected", "malformed token"),
    ("huge-token", lambda c, t: {"credential": "txm1." + "A" * 10_000 + ".AAAA", "csr": csr_for("teller")},
     401, "credential rejected", "malformed token"),
    ("token-a-csr-b", lambda c, t: {"credential": t["good"], "csr": csr_for("vault")},
     403, "CSR rejected", f"but the credential proves {spiffe(NS, 'teller')}"),
    ("two-sans", lambda c, t: {"credential": t["good"],
                               "csr": build_csr(sans=(spiffe(NS, "teller"), spiffe(NS, "vault"))).decode()},
     403, "CSR rejected", "credential proves"),
    ("malformed-csr", lambda c, t: {"credential": t["good"], "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                                                    "-----END CERTIFICATE REQUEST-----\n"},
     400, "CSR rejected", "malformed CSR"),
    ("rsa-1024-csr", lambda c, t: {"credential": t["good"], "csr": _rsa_csr(1024)},
     400, "CSR rejected", "RSA 1024 bits"),
    ("ed25519-csr", lambda c, t: {"credential": t["good"],
                                  "csr": build_csr(ed25519.Ed25519PrivateKey.generate(),
                                                   sans=(spiffe(NS, "teller"),)).decode()},
     400, "CSR rejected", "key type not allowed"),
    ("bad-signature-csr", lambda c, t: {"credential": t["good"], "csr": _bad_signature_csr()},
     400, "CSR rejected", "signature is invalid"),
    ("no-san-csr", lambda c, t: {"credential": t["good"], "csr": build_csr(sans=None).decode()},
     400, "CSR rejected", "no subjectAltName"),
]


@pytest.fixture(scope="module")
def tokens(control, expired_token, foreign_tokens):
    return {"good": control.token(NS, "teller"), "expired": expired_token, "foreign": foreign_tokens}


@pytest.mark.parametrize("case, build, status, counter, reason", CASES, ids=[case[0] for case in CASES])
def test_hostile_request(control, tokens, case, build, status, counter, reason):
    before = control.admin()["csr_rejected"]
    log_size = control.log_path.stat().st_size
    answer = post(control, build(control, tokens))
    assert answer.status == status, answer
    assert answer.headers.get("content-type") == "application/json", answer
    doc = answer.json()
    assert set(doc) == {"error"} and reason in doc["error"], doc
    for secret in (tokens["good"], tokens["expired"], tokens["foreign"]):
        assert secret not in doc["error"]
    # the control plane logged the rejection with its reason (wait: the line may land just after the answer)
    line = wait_for(lambda: next((line for line in _new_log(control, log_size).splitlines()
                                  if "rejected:" in line and reason in line), None),
                    5, what=f"a rejection line with {reason!r} in the control plane log")
    assert "CSR from 127.0.0.1 rejected:" in line, line
    after = control.admin()["csr_rejected"]
    assert sum(after.values()) == sum(before.values()) + 1, (before, after)
    if counter is not None:
        assert after.get(counter, 0) == before.get(counter, 0) + 1, (before, after)


def _new_log(control, offset: int) -> str:
    with open(control.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode("utf-8", "replace")


def test_chunked_body_without_length_is_refused(control, tokens):
    before = rejected_total(control)
    answer = post(control, {"credential": tokens["good"], "csr": csr_for("teller")}, chunked=True)
    assert answer.status in (411, 413) and "Content-Length" in answer.json()["error"], answer
    assert rejected_total(control) == before + 1


def test_unknown_path_and_method(control, tokens):
    assert post(control, {}, path="/v1/sign").status == 404
    conn = http.client.HTTPSConnection("127.0.0.1", control.port, context=tls_context(control), timeout=10)
    try:
        conn.request("GET", "/v1/csr")
        assert conn.getresponse().status == 405
    finally:
        conn.close()


def test_plaintext_http_to_the_tls_port(control):
    """A plaintext client gets no answer, and the control plane keeps serving."""
    conn = http.client.HTTPConnection("127.0.0.1", control.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("POST", "/v1/csr", body=b"{}")
            conn.getresponse()
    finally:
        conn.close()
    assert control.admin()["ready"] is True


def test_many_bad_requests_at_once_leave_the_control_plane_healthy(control, tokens):
    import concurrent.futures
    before = rejected_total(control)
    bodies = [b"{", {"credential": "x", "csr": "y"}, {"credential": tokens["good"], "csr": csr_for("vault")}] * 10
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = sorted(answer.status for answer in pool.map(lambda body: post(control, body), bodies))
    assert statuses == [400] * 10 + [401] * 10 + [403] * 10
    assert rejected_total(control) == before + 30
    assert post(control, {"credential": tokens["good"], "csr": csr_for("teller")}).status == 200


def test_control_plane_log_is_clean(control, tokens):
    text = control.log_path.read_text()
    assert "Traceback" not in text and "Unhandled" not in text, control.describe("traceback in the log")
    assert "signing failed" not in text
    assert_no_secrets_in_logs([control], tokens=control.tokens + [tokens["foreign"]],
                              key_files=[control.state_dir / "ca-key.pem"])


# -- renewal with the current certificate instead of a token ---------------------------------------------------

@pytest.fixture(scope="module")
def client_certs(control, tmp_path_factory):
    directory = tmp_path_factory.mktemp("csr-client-certs")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca = mesh_ca(control.state_dir)
    return {
        "teller": issue_cert(directory, "teller", ca, spiffe(NS, "teller")),
        "expired": issue_cert(directory, "expired", ca, spiffe(NS, "teller"),
                              not_before=now - datetime.timedelta(hours=2),
                              not_after=now - datetime.timedelta(hours=1)),
        "other-ca": issue_cert(directory, "other-ca", make_ca("another mesh"), spiffe(NS, "teller")),
        "other-trust-domain": issue_cert(directory, "other-td", ca, spiffe(NS, "teller", "evil.example")),
        "not-k8s-spiffe": issue_cert(directory, "not-k8s", ca, "spiffe://cluster.local/teller"),
    }


def test_renewal_with_the_current_certificate(control, client_certs):
    answer = post(control, {"csr": csr_for("teller")}, client_cert=client_certs["teller"])
    assert answer.status == 200, answer
    cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [spiffe(NS, "teller")]


def test_renewal_certificate_proves_only_its_own_identity(control, client_certs):
    answer = post(control, {"csr": csr_for("vault")}, client_cert=client_certs["teller"])
    assert answer.status == 403 and "credential proves " + spiffe(NS, "teller") in answer.json()["error"], answer


def test_renewal_certificate_wins_over_a_token_for_another_identity(control, client_certs):
    """With both, the certificate is the proof: a token for vault does not let teller's sidecar become vault."""
    answer = post(control, {"credential": control.token(NS, "vault"), "csr": csr_for("vault")},
                  client_cert=client_certs["teller"])
    assert answer.status == 403, answer


@pytest.mark.parametrize("case", ["expired", "other-ca"])
def test_renewal_certificate_that_does_not_verify_gets_no_answer(control, client_certs, case):
    before = control.admin()
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        post(control, {"csr": csr_for("teller")}, client_cert=client_certs[case])
    after = control.admin()
    assert after["csr_signed"] == before["csr_signed"]
    assert after["ready"] is True


@pytest.mark.parametrize("case", ["other-trust-domain", "not-k8s-spiffe"])
def test_renewal_certificate_with_a_foreign_identity_is_refused(control, client_certs, case):
    """Chained to the mesh root (as a root shared with another mesh, or added to extra-roots.pem, would be)
    but not an identity of this trust domain: a clean 401 or 403, never a certificate, never a 500."""
    cert_path, _ = client_certs[case]
    uri = x509.load_pem_x509_certificate(cert_path.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)[0]
    key = ec.generate_private_key(ec.SECP256R1())
    answer = post(control, {"csr": build_csr(key, sans=(uri,)).decode()}, client_cert=client_certs[case])
    assert answer.status in (401, 403), answer
    assert set(answer.json()) == {"error"}, answer


# -- a sidecar whose credential is refused ------------------------------------------------------------------

class StartingProxy(Proxy):
    """A sidecar that counts as started once its admin port answers, ready (200) or not (503)."""

    def is_ready(self) -> bool:
        return self.admin_request("/ready")[0] in (200, 503)


@pytest.mark.parametrize("bad, reason", [
    ("expired", "(401): credential rejected: token expired"),
    ("other-account", "(403): CSR rejected: CSR asks for"),
], ids=["expired-token", "token-for-another-account"])
def test_sidecar_with_a_refused_token_waits_and_recovers(control, tokens, tmp_path, process_log_dir, bad, reason):
    config = write_config(tmp_path / "config",
                          service_entry("nothing", [{"address": "127.0.0.1", "ports": {"http": 9}}]))
    token_file = tmp_path / "token"
    token_file.write_text(tokens["expired"] if bad == "expired" else control.token(NS, "vault"))
    args = ["--control", control.address, "--ca-bundle", str(control.root_cert), "--token-file", str(token_file),
            "--service-account", "teller"]
    proxy = StartingProxy(config, f"teller-{bad}", namespace=NS, extra_args=args, log_dir=process_log_dir)
    with proxy.start():
        waiting = wait_for(lambda: (lambda s, b: s == 503 and json.loads(b).get("last_error") and json.loads(b))(
            *proxy.admin_request("/ready")), 15, what="/ready to explain why there is no certificate")
        assert waiting["waiting_for"] == "workload certificate"
        assert reason in waiting["last_error"], waiting
        assert "certificate renewal failed" in proxy.log_path.read_text()
        # the operator fixes the token file: the agent re-reads it on its next try
        token_file.write_text(control.token(NS, "teller"))
        wait_for(lambda: proxy.admin_request("/ready")[0] == 200, 30, what="the sidecar to get its certificate")
        assert f"workload certificate for {spiffe(NS, 'teller')} installed" in proxy.log_path.read_text()
        assert_no_secrets_in_logs([proxy, control], tokens=control.tokens + [tokens["expired"]])
