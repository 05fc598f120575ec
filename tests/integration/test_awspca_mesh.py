"""``mesh-control --ca awspca``: workloads get their certificates from AWS Private CA, emulated by moto.

moto runs in server mode (``moto_server`` on loopback) with a root CA created and installed as
docs/identity.md tells an operator to; mesh-control reaches it through a Cable (a TCP forwarder the
test can cut) with ``AWS_ENDPOINT_URL`` and dummy credentials in its environment, found by boto3's
standard chain.  Two sidecars (frontend -> user-service over mTLS, new connections every 10 requests)
get their certificates from it.  moto records every request it gets, so the tests read what
mesh-control asked AWS for -- moto itself ignores much of it (docs/identity.md lists what).

- the workloads' and the control plane's certificates come from the CA, the trust bundle is its root,
  and IssueCertificate carried the SPIFFE id as ApiPassthrough SAN, the CA's signing algorithm and a
  validity of the certificate's TTL;
- the CA disabled: mesh-control not ready with the reason, CSRs 503 without asking AWS (moto would
  issue anyway), traffic flows; enabled again: ready, CSRs signed;
- AWS unreachable (the Cable cut), then moto stopped: not ready with the reason, CSRs 503 in bounded
  time, the trust bundle kept, traffic flows on the certificates in use.
"""

from __future__ import annotations

import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import wait_for
from tests.harness.cable import Cable
from tests.integration.test_awspca_support import MotoServer, aws_env, awspca_args, create_root_ca
from tests.integration.test_external_ca import metric
from tests.integration.test_identity_csr_api import post
from tests.integration.test_identity_support import mtls_pair, spiffe, xfcc
from tests.integration.test_meshctl_ops import meshctl
from tests.unit.test_identity_csr import build_csr

NS = "payments"
TTL = 3600  # mesh-control's --workload-cert-ttl: what every certificate is asked for
TIMEOUT = 3  # --awspca-timeout


@pytest.fixture(scope="module")
def aws(process_log_dir):
    """``(moto, cable, arn)``: moto with an ACTIVE root CA, and a Cable in front of it for mesh-control."""
    moto = MotoServer(process_log_dir).start()
    cable = Cable(moto.port).start()
    try:
        yield moto, cable, create_root_ca(moto.client())
    finally:
        cable.stop()
        moto.stop()


@pytest.fixture(scope="module")
def mesh(aws, control_factory, backend_factory, proxy_factory, tmp_path_factory):
    moto, cable, arn = aws
    control = control_factory(
        workload_cert_ttl="1h", env=aws_env(f"http://127.0.0.1:{cable.port}"),
        extra_args=awspca_args(arn, "--ca-status-interval", "200ms", "--awspca-refresh-interval", "0.5",
                               "--awspca-timeout", str(TIMEOUT)))
    app, server, client = mtls_pair(control, backend_factory, proxy_factory, tmp_path_factory.mktemp("pca-config"), NS)
    return control, server, client


def certificate(proxy) -> dict:
    return proxy.admin("/config_dump")["certificate"]


def signing(control) -> tuple[float, float]:
    """``(count, sum)`` of mesh-control's ``mesh_ca_csr_duration_seconds``: the CSRs it asked the CA to sign,
    and the seconds the CA took (from the ``mesh_sign_csr`` call to its answer, measured by mesh-control)."""
    series = 'mesh_ca_csr_duration_seconds_{}{{ca="awspca"}}'
    return metric(control, series.format("count")), metric(control, series.format("sum"))


def sign_one(control, account: str = "teller"):
    """POST one CSR for ``account`` to mesh-control; the answer and the seconds the CA took for it.

    The seconds are mesh-control's own (its signing histogram), not this client's wall clock: on a loaded
    machine the TLS handshake and the scheduling of this test process would count too.
    """
    request = {"credential": control.token(NS, account),
               "csr": build_csr(ec.generate_private_key(ec.SECP256R1()), sans=(spiffe(NS, account),)).decode()}
    count, seconds = signing(control)
    answer = post(control, request)
    after = wait_for(lambda: (lambda now: now[0] > count and now)(signing(control)), 5,
                     what="mesh-control to count the CSR in its signing histogram")
    assert after[0] == count + 1, (count, after)  # only this CSR reached the CA meanwhile
    return answer, after[1] - seconds


def not_ready_reason(control, expected: str) -> str:
    """``/ready``'s reason once it answers 503 with a reason starting with ``expected``.

    A status refresh that the change under test catches midway (between two AWS calls) may first
    give the reason of its second call; the next refresh gives the settled one.
    """
    seen = []

    def settled():
        status, body = control.admin_request("/ready")
        if status != 503:
            return None
        seen.append(json.loads(body)["reason"])
        return seen[-1] if seen[-1].startswith(expected) else None

    try:
        return wait_for(settled, 10, what=f"mesh-control's /ready to answer 503 with {expected!r}")
    except TimeoutError as error:
        raise AssertionError(f"{error}; reasons seen: {sorted(set(seen))}") from None


def assert_traffic_flows(client, label: str) -> None:
    """New mTLS connections every 10 requests: the certificates in use still verify."""
    for index in range(12):
        answer = client.curl("user-service", f"/{label}-{index}")
        assert answer.status == 200, answer
    assert xfcc(answer.json()["headers"]["x-forwarded-client-cert"])["URI"] == spiffe(NS, "frontend")


def test_workloads_get_their_certificates_from_aws_private_ca_and_talk_mtls(aws, mesh):
    moto, _, arn = aws
    control, server, client = mesh
    ca = moto.client().get_certificate_authority_certificate(CertificateAuthorityArn=arn)
    root = x509.load_pem_x509_certificate(ca["Certificate"].encode())
    assert x509.load_pem_x509_certificates(control.root_cert.read_bytes()) == [root]
    ready = control.admin()
    assert ready["ca"] == {"name": "awspca", "ready": True, "reason": None, "issuer": f"awspca {arn}", "roots": 1}
    for proxy, account in ((server, "user-service"), (client, "frontend")):
        cert = certificate(proxy)
        assert cert["identity"] == spiffe(NS, account)
        assert (cert["issuer"], cert["ca_issuer"]) == (root.subject.rfc4514_string(), f"awspca {arn}"), cert
    code, out, err = meshctl("proxy-config", "cert", "--admin", f"127.0.0.1:{client.admin_port}")
    assert code == 0 and f"awspca {arn}" in out, out + err
    assert_traffic_flows(client, "pca")

    issued = {request["ApiPassthrough"]["Extensions"]["SubjectAlternativeNames"][0]["UniformResourceIdentifier"]:
              request for request in moto.requests("IssueCertificate") if "ApiPassthrough" in request}
    assert set(issued) == {spiffe(NS, "user-service"), spiffe(NS, "frontend"),
                           "spiffe://cluster.local/ns/mesh-system/sa/mesh-control"}, issued
    for request in issued.values():
        assert request["ApiPassthrough"]["Extensions"]["SubjectAlternativeNames"] == [
            {"UniformResourceIdentifier": next(uri for uri, same in issued.items() if same is request)}]
        assert request["TemplateArn"] == "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"
        assert request["SigningAlgorithm"] == "SHA256WITHRSA"  # the CA's, from DescribeCertificateAuthority
        assert request["Validity"]["Type"] == "ABSOLUTE"
        # ABSOLUTE validity is whole seconds, rounded up from the moment of the request (before now)
        assert 0 < request["Validity"]["Value"] - time.time() <= TTL + 1
        assert "txmesh-awspca/" in request["UserAgent"] and "retry-mode#standard" in request["UserAgent"]
    assert len({request["IdempotencyToken"] for request in issued.values()}) == 3


def test_a_disabled_ca_is_not_ready_and_its_csrs_get_503_without_asking_aws(aws, mesh):
    moto, _, arn = aws
    control, server, client = mesh
    moto.client().update_certificate_authority(CertificateAuthorityArn=arn, Status="DISABLED")
    try:
        advice = (f"AWS Private CA {arn} is DISABLED: enable it "
                  "(aws acm-pca update-certificate-authority --status ACTIVE)")
        assert not_ready_reason(control, f"CA 'awspca' not ready: {advice}") == f"CA 'awspca' not ready: {advice}"
        asked = len(moto.requests("IssueCertificate"))
        answer, _ = sign_one(control)
        assert answer.status == 503 and answer.headers["retry-after"] == "30", answer
        assert answer.json() == {"error": f"CA unavailable: {advice}"}
        assert len(moto.requests("IssueCertificate")) == asked  # moto would have issued: it ignores the state
        assert all(proxy.admin_request("/ready")[0] == 200 for proxy in (server, client))
        assert_traffic_flows(client, "disabled")
    finally:
        moto.client().update_certificate_authority(CertificateAuthorityArn=arn, Status="ACTIVE")
    wait_for(lambda: control.admin_request("/ready")[0] == 200, 8, what="mesh-control ready once the CA is ACTIVE")
    answer, _ = sign_one(control)
    assert answer.status == 200, answer


def test_while_aws_is_unreachable_csrs_get_503_in_bounded_time_and_traffic_flows(aws, mesh):
    moto, cable, arn = aws
    control, server, client = mesh
    bundle = control.root_cert.read_bytes()
    cable.cut()
    try:
        not_ready_reason(control, f"CA 'awspca' not ready: cannot reach AWS Private CA {arn} at "
                                  f"http://127.0.0.1:{cable.port} for DescribeCertificateAuthority")
        answer, took = sign_one(control)
        assert answer.status == 503 and answer.headers["retry-after"] == "5", answer
        assert answer.json()["error"].startswith(f"CA unavailable: cannot reach AWS Private CA {arn}"), answer
        assert 0 < took < TIMEOUT + 2, took  # mesh-control's time: --awspca-timeout and a grace second
        assert json.loads(control.admin_request("/ready")[1])["ca"]["roots"] == 1
        assert control.root_cert.read_bytes() == bundle  # AWS away: the trust bundle stays
        assert_traffic_flows(client, "partition")
    finally:
        cable.splice()
    wait_for(lambda: control.admin_request("/ready")[0] == 200, 8, what="mesh-control ready once AWS is back")
    answer, _ = sign_one(control)
    assert answer.status == 200, answer

    moto.stop()  # the emulator itself down (its state is gone with it: this test is the module's last)
    not_ready_reason(control, f"CA 'awspca' not ready: cannot reach AWS Private CA {arn}")
    answer, took = sign_one(control)
    assert answer.status == 503 and answer.json()["error"].startswith("CA unavailable: cannot reach"), answer
    assert 0 < took < TIMEOUT + 2, took
    assert all(proxy.admin_request("/ready")[0] == 200 for proxy in (server, client))
    assert_traffic_flows(client, "moto-down")
