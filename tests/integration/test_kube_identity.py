"""Identity of mesh-control in Kubernetes mode, against the test API server with real processes.

- two replicas ``twistd mesh-control --kubernetes --kubeconfig F --ca-secret txmesh-ca`` started at once
  against a cluster without the Secret: one creates it, both serve the same CA (same trust bundle, keys
  0600 in each state dir, a certificate from one verifies with the other's bundle), join tokens verify on
  both; a replica that loses the create race (409) reads the winner's Secret
- a real sidecar bootstraps with a projected service-account token (TokenReview) from a replica whose
  bundle it got from the other; its certificate carries the identity of the review; a sidecar whose flags
  claim another service account than its token proves is refused (403) and says why
- TokenReview rejections at the CSR endpoint: wrong audience, expired, unknown token (401 with what to do);
  the API server down (connection reset or 503) or not answering (timeout): 503 "credential not verified",
  and the same token works once the API server is back
- an invalid Secret or an unreachable API server at start: mesh-control exits naming the Secret and the key
- no token and no key material in any log
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import stat
import subprocess
import threading
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.harness import Control, KubeAPI, Proxy, free_port, venv_bin, wait_for
from tests.integration.test_identity_csr_api import StartingProxy, csr_for, post
from tests.integration.test_identity_rotation import server_certificate
from tests.integration.test_identity_support import assert_no_secrets_in_logs, issue_cert, mesh_ca, spiffe
from tests.integration.test_proxy_support import service_entry, write_config

NS = "bank"  # csr_for() and post() of test_identity_csr_api build CSRs for this namespace
SECRET = "txmesh-ca"
CONTROL_NS = "mesh-system"
SECRET_KEYS = {"ca-cert.pem", "ca-key.pem", "token-key"}


def projected_token() -> str:
    """A token shaped like a projected service-account token (a JWT: three dot-separated parts)."""
    return ".".join(base64.urlsafe_b64encode(secrets.token_bytes(n)).rstrip(b"=").decode() for n in (27, 150, 64))


@pytest.fixture(scope="module")
def kube(process_log_dir):
    from kubernetes import client

    with KubeAPI(log_dir=process_log_dir) as kube:
        core = client.CoreV1Api(kube.api_client())
        for namespace in (CONTROL_NS, NS):
            core.create_namespace({"metadata": {"name": namespace}})
        yield kube


class Tokens:
    """Projected tokens registered in the test API server (all kept, to check that no log shows one)."""

    def __init__(self, kube):
        self.kube = kube
        self.all: list[str] = []

    def add(self, service_account: str, **kwargs) -> str:
        """A new token of ``bank/<service_account>`` (``audiences``, ``expires_in`` as :meth:`KubeAPI.add_token`)."""
        token = projected_token()
        self.kube.add_token(token, NS, service_account, **kwargs)
        self.all.append(token)
        return token


@pytest.fixture(scope="module")
def tokens(kube):
    return Tokens(kube)


@pytest.fixture(scope="module")
def kubeconfig(kube, process_log_dir):
    return kube.write_kubeconfig(process_log_dir / "kubeconfig")


def kube_args(kubeconfig, secret: str | None = SECRET) -> list[str]:
    return ["--kubernetes", "--kubeconfig", str(kubeconfig), *(["--ca-secret", secret] if secret else [])]


def read_secret(kube, name: str = SECRET) -> dict:
    """The Secret's data, decoded."""
    from kubernetes import client

    secret = client.CoreV1Api(kube.api_client()).read_namespaced_secret(name, CONTROL_NS)
    return {key: base64.b64decode(value) for key, value in secret.data.items()}


@pytest.fixture(scope="module")
def replicas(kube, kubeconfig, process_log_dir):
    """Two replicas started at the same time, before the CA Secret exists."""
    pair = [Control(workload_cert_ttl="1h", extra_args=kube_args(kubeconfig), log_dir=process_log_dir)
            for _ in range(2)]
    try:
        for replica in pair:
            replica.spawn()
        for replica in pair:
            replica.wait_ready(replica.ready_timeout)
        yield pair
    finally:
        for replica in pair:
            replica.stop()


# -- HA: one CA for every replica ------------------------------------------------------------------------

def test_the_replicas_share_one_ca_from_the_secret(replicas, kube):
    data = read_secret(kube)
    assert set(data) == SECRET_KEYS
    for replica in replicas:
        assert replica.root_cert.read_bytes() == data["ca-cert.pem"]
        assert (replica.state_dir / "ca-key.pem").read_bytes() == data["ca-key.pem"]
        assert (replica.state_dir / "token-key").read_bytes() == data["token-key"]
        for name in ("ca-key.pem", "token-key"):
            assert stat.S_IMODE(os.stat(replica.state_dir / name).st_mode) == 0o600, name
    logs = [replica.log_path.read_text() for replica in replicas]
    created = [log for log in logs if f"generated a new CA root and stored it in Secret {CONTROL_NS}/{SECRET}" in log]
    assert len(created) == 1, "exactly one replica creates the Secret"
    fingerprint = x509.load_pem_x509_certificate(data["ca-cert.pem"]).fingerprint(hashes.SHA256()).hex()
    assert all(fingerprint in log for log in logs), "each replica logs which root it uses"
    # each replica has its own serving certificate, issued by the shared root
    served = [server_certificate_of(replica) for replica in replicas]
    assert served[0].serial_number != served[1].serial_number
    root = x509.load_pem_x509_certificate(data["ca-cert.pem"])
    for cert in served:
        cert.verify_directly_issued_by(root)


def server_certificate_of(control) -> x509.Certificate:
    """The control plane's TLS certificate on its CSR/config port (verified against its own bundle)."""
    import ssl
    context = ssl.create_default_context(cafile=str(control.root_cert))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", control.port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_a_certificate_from_one_replica_verifies_with_the_others_bundle(replicas, tokens):
    token = tokens.add("teller")
    first, second = replicas
    for signer, other in ((first, second), (second, first)):
        answer = post(signer, {"credential": token, "csr": csr_for("teller")})
        assert answer.status == 200, answer
        cert = x509.load_pem_x509_certificate(answer.json()["certificate"].encode())
        (root,) = x509.load_pem_x509_certificates(other.root_cert.read_bytes())
        cert.verify_directly_issued_by(root)
        assert answer.json()["trust_bundle"] == other.root_cert.read_text()


def test_join_tokens_verify_on_every_replica(replicas):
    first, second = replicas
    join_token = first.token(NS, "teller")  # meshctl token create --state-dir <first's state dir>
    answer = post(second, {"credential": join_token, "csr": csr_for("teller")})
    assert answer.status == 200, answer


def test_a_replica_that_loses_the_create_race_uses_the_winners_secret(kube):
    """It read "no Secret", generated a CA, and then its create got 409: the Secret keeps the winner's CA."""
    from mesh.control.kube.ca_secret import CASecret
    from mesh.control.kube.client import make_api_client

    api = make_api_client(str(kube.write_kubeconfig(kube.log_path.parent / "kubeconfig-race")))
    winner = CASecret(api, CONTROL_NS, "race-ca")
    winning = winner.load_or_create("cluster.local")
    assert read_secret(kube, "race-ca")["ca-cert.pem"] == winning.cert_pem

    class ReadBeforeTheWinnerCreated(CASecret):
        first_read = True

        def _read(self):
            if self.first_read:
                self.first_read = False
                return None
            return super()._read()

    def creates() -> int:
        return sum(r["method"] == "POST" and r["path"] == f"/api/v1/namespaces/{CONTROL_NS}/secrets"
                   for r in kube.requests())

    before = creates()
    loser = ReadBeforeTheWinnerCreated(api, CONTROL_NS, "race-ca")
    assert loser.load_or_create("cluster.local") == winning
    assert creates() == before + 1  # the loser did try to create it (and got 409)
    assert read_secret(kube, "race-ca")["ca-cert.pem"] == winning.cert_pem


# -- a sidecar bootstrapping with its service-account token ---------------------------------------------------

def sidecar_args(control, bundle_from, token_file, service_account: str) -> list[str]:
    return ["--control", control.address, "--ca-bundle", str(bundle_from.root_cert), "--token-file", str(token_file),
            "--service-account", service_account]


def test_a_sidecar_bootstraps_with_its_projected_token(replicas, kube, tokens, tmp_path, process_log_dir):
    first, second = replicas
    token_file = tmp_path / "token"
    token_file.write_text(tokens.add("teller") + "\n")
    reviews_before = len(token_reviews(kube))
    config = write_config(tmp_path / "config",
                          service_entry("nothing", [{"address": "127.0.0.1", "ports": {"http": 9}}]))
    # the trust bundle from one replica, the certificate from the other
    with Proxy(config, "teller", namespace=NS, app_port=free_port(),
               extra_args=sidecar_args(second, first, token_file, "teller"),
               log_dir=process_log_dir).start() as proxy:
        probe = issue_cert(tmp_path, "probe", mesh_ca(first.state_dir), spiffe(NS, "probe"))
        cert = server_certificate(proxy.inbound_port, first.root_cert, *probe)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        assert uris == [spiffe(NS, "teller")]
        (root,) = x509.load_pem_x509_certificates(first.root_cert.read_bytes())
        cert.verify_directly_issued_by(root)
    assert len(token_reviews(kube)) > reviews_before


def token_reviews(kube) -> list[dict]:
    return [r for r in kube.requests() if r["method"] == "POST"
            and r["path"] == "/apis/authentication.k8s.io/v1/tokenreviews"]


def test_a_sidecar_claiming_another_service_account_is_refused(replicas, tokens, tmp_path, process_log_dir):
    """The token proves bank/teller; the sidecar's flags say vault: the CSR is refused, whatever the flags say."""
    first, _ = replicas
    token_file = tmp_path / "token"
    token_file.write_text(tokens.add("teller"))
    config = write_config(tmp_path / "config",
                          service_entry("nothing", [{"address": "127.0.0.1", "ports": {"http": 9}}]))
    with StartingProxy(config, "vault", namespace=NS, extra_args=sidecar_args(first, first, token_file, "vault"),
                       log_dir=process_log_dir).start() as proxy:
        waiting = wait_for(lambda: (lambda s, b: s == 503 and json.loads(b).get("last_error") and json.loads(b))(
            *proxy.admin_request("/ready")), 15, what="/ready to explain why there is no certificate")
    assert waiting["waiting_for"] == "workload certificate"
    assert f"(403): CSR rejected: CSR asks for [{spiffe(NS, 'vault')}]" in waiting["last_error"], waiting
    assert f"the credential proves {spiffe(NS, 'teller')}" in waiting["last_error"], waiting


# -- TokenReview rejections ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case, token_kwargs, reason", [
    ("wrong-audience", {"audiences": ("https://kubernetes.default.svc.cluster.local",)},
     "token audiences [\"https://kubernetes.default.svc.cluster.local\"] is invalid for the target audiences "
     "[\"txmesh\"]]); mount a projected service-account token with audience txmesh"),
    ("expired", {"expires_in": -10}, "service account token has expired]); the kubelet refreshes projected tokens"),
    ("unknown", None, "token lookup failed]); the token is unknown to this cluster"),
])
def test_tokenreview_rejections(replicas, tokens, case, token_kwargs, reason):
    control = replicas[0]
    token = tokens.add("teller", **token_kwargs) if token_kwargs is not None else projected_token()
    before = control.admin()["csr_rejected"]
    answer = post(control, {"credential": token, "csr": csr_for("teller")})
    assert answer.status == 401, answer
    error = answer.json()["error"]
    assert error.startswith("credential rejected: the Kubernetes API server did not authenticate the "
                            "service-account token ("), error
    assert reason in error and token not in error, error
    after = control.admin()["csr_rejected"]
    assert after.get("credential rejected", 0) == before.get("credential rejected", 0) + 1
    wait_for(lambda: reason in control.log_path.read_text(), 5, what="the rejection in the control plane log")


@pytest.mark.parametrize("how, cause", [("reset", "is unreachable (ProtocolError)"),
                                        ("503", "failed the TokenReview (503 Service Unavailable)")])
def test_api_server_down_is_not_a_bad_token(replicas, kube, tokens, how, cause):
    """503 (retry), not 401: the token is fine, the API server could not be asked; once back, it works."""
    control = replicas[1]
    token = tokens.add("teller")
    kube.set_down(True, how)
    try:
        answer = post(control, {"credential": token, "csr": csr_for("teller")})
    finally:
        kube.set_down(False)
    assert answer.status == 503, answer
    error = answer.json()["error"]
    assert error.startswith("credential not verified: the Kubernetes API server") and cause in error, error
    assert "the sidecar retries" in error
    assert control.admin()["csr_rejected"].get("credential not verified", 0) >= 1
    assert post(control, {"credential": token, "csr": csr_for("teller")}).status == 200


def test_an_api_server_that_does_not_answer_times_out(kube, control_factory, process_log_dir):
    """A TokenReview that hangs ends after 5 s with a 503 (the review runs on a thread: the admin port answers
    meanwhile)."""
    hole = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts nothing: requests hang
    try:
        kubeconfig = process_log_dir / "kubeconfig-black-hole"
        kube.write_kubeconfig(kubeconfig)
        kubeconfig.write_text(kubeconfig.read_text().replace(kube.url, f"http://127.0.0.1:{hole.getsockname()[1]}"))
        # without the Kubernetes config sources: their first lists would wait for the black hole (PRIME_TIMEOUT)
        control = control_factory(extra_args=[*kube_args(kubeconfig, secret=None),
                                              "--disable-plugin", "builtin.kubernetes_registry",
                                              "--disable-plugin", "builtin.kubernetes_crds"])
        outcome = {}
        request = threading.Thread(target=lambda: outcome.update(
            answer=post(control, {"credential": projected_token(), "csr": csr_for("teller")})))
        request.start()
        assert control.admin()["ready"] is True  # the reactor is not blocked by the review
        request.join(30)
        answer = outcome["answer"]
        assert answer.status == 503, answer
        assert "did not answer the TokenReview within 5s; the sidecar retries" in answer.json()["error"], answer
        control.stop()
    finally:
        hole.close()


# -- a Secret mesh-control cannot use ---------------------------------------------------------------------------

def run_control(tmp_path, kubeconfig, secret: str) -> subprocess.CompletedProcess:
    argv = [venv_bin("twistd"), "-n", "--pidfile=", "mesh-control", "--state-dir", str(tmp_path / "state"),
            "--address", "127.0.0.1", "--port", str(free_port()), "--admin-port", str(free_port()),
            *kube_args(kubeconfig, secret)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("case", ["missing-token-key", "foreign-key"])
def test_an_invalid_secret_stops_mesh_control_naming_secret_and_key(kube, kubeconfig, replicas, tmp_path, case):
    from kubernetes import client

    data = {key: base64.b64encode(value).decode() for key, value in read_secret(kube).items()}
    if case == "missing-token-key":
        del data["token-key"]
        expected = f"Secret {CONTROL_NS}/broken-{case} has no 'token-key' key; delete the Secret"
    else:
        data["ca-cert.pem"] = base64.b64encode(other_root_pem()).decode()  # the key stays the mesh's
        expected = f"Secret {CONTROL_NS}/broken-{case}: key 'ca-key.pem' does not belong to the certificate"
    client.CoreV1Api(kube.api_client()).create_namespaced_secret(
        CONTROL_NS, {"metadata": {"name": f"broken-{case}"}, "data": data})
    proc = run_control(tmp_path, kubeconfig, f"broken-{case}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert expected in output, output
    assert "PRIVATE KEY" not in output and "Traceback" not in output


def other_root_pem() -> bytes:
    from mesh.identity.ca import generate_root, to_pem
    return to_pem([generate_root("cluster.local")[1]])


def test_extra_roots_in_the_secret_join_the_trust_bundle(kube, kubeconfig, replicas, process_log_dir):
    """Step 1 of a root rotation with --ca-secret: the Secret's extra-roots.pem is trusted, the signer unchanged."""
    from kubernetes import client

    data = {key: base64.b64encode(value).decode() for key, value in read_secret(kube).items()}
    new_root = other_root_pem()
    data["extra-roots.pem"] = base64.b64encode(new_root).decode()
    client.CoreV1Api(kube.api_client()).create_namespaced_secret(
        CONTROL_NS, {"metadata": {"name": "rotating-ca"}, "data": data})
    control = Control(extra_args=kube_args(kubeconfig, "rotating-ca"), log_dir=process_log_dir)
    try:
        control.start()
        status, bundle = control.admin_request("/ca/root-cert.pem")
        assert status == 200 and bundle == read_secret(kube)["ca-cert.pem"] + new_root
        assert control.root_cert.read_bytes() == bundle
        signing_root = x509.load_pem_x509_certificate(read_secret(kube)["ca-cert.pem"])
        server_certificate_of(control).verify_directly_issued_by(signing_root)  # raises if the new root signed it
        assert "1 extra trusted root(s)" in control.log_path.read_text()
    finally:
        control.stop()


def test_an_unreachable_api_server_at_start_stops_mesh_control(kube, tmp_path):
    kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
    kubeconfig.write_text(kubeconfig.read_text().replace(kube.url, f"http://127.0.0.1:{free_port()}"))
    proc = run_control(tmp_path, kubeconfig, SECRET)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert f"cannot read Secret {CONTROL_NS}/{SECRET}: the Kubernetes API server at http://127.0.0.1:" in output
    assert "mesh-control needs it to load its CA" in output


# -- nothing secret in the logs ---------------------------------------------------------------------------------

def test_no_token_and_no_key_material_in_any_log(replicas, kube, tokens, process_log_dir):
    """Every process log of this module (replicas, sidecars), the API server's aside."""
    data = read_secret(kube)
    logs = [SimpleNamespace(log_path=path) for path in process_log_dir.glob("*.log") if path != kube.log_path]
    assert len(logs) >= 5
    assert_no_secrets_in_logs(logs, tokens=tokens.all,
                              key_files=[replica.state_dir / "ca-key.pem" for replica in replicas])
    secret_values = [base64.b64encode(data["token-key"]).decode(), data["token-key"].hex(),
                     base64.b64encode(data["ca-key.pem"]).decode()[:64]]
    for log in logs:
        text = log.log_path.read_text(errors="replace")
        assert not [value for value in secret_values if value in text], log.log_path
        assert "Traceback" not in text, log.log_path
