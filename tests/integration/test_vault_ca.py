"""``mesh-control --ca vault``: workloads get their certificates from a real Vault-API server (OpenBao).

One OpenBao server for the module, with persistent (integrated) storage and HTTPS from a CA of its
own, which mesh-control trusts with ``--vault-ca-cert``; set up as docs/identity.md says (PKI mount,
root, role, policy).  Two sidecars (frontend -> user-service over mTLS, new connections every 10
requests) get 10 s certificates, so they renew every ~5 s.

- the workloads' and the control plane's certificates come from Vault: one URI SAN (the SPIFFE id), no
  common name, Vault's root as the trust bundle; traffic flows over mTLS;
- Vault sealed: ``/ready`` 503 with the reason, CSRs 503 with the reason and ``Retry-After``, the
  sidecars' renewals fail and they keep serving; unsealed: they renew;
- Vault stalled: a CSR is answered 503 after the timeout, nothing else waits;
- a root rotation in Vault (a new issuer, then the new default): the sidecars trust both roots first,
  then get certificates from the new one, and no request fails under load;
- a token from a file is renewed, and replaced when the file changes; AppRole auth (renewal, then a new
  login at the token's max TTL) and Kubernetes auth (Vault asks the test Kubernetes API server's
  TokenReview) sign too;
- a role whose settings cannot sign mesh workloads is named in ``/ready``;
- Vault restarted under load (a dev server would forget everything: this one keeps its state): no
  request fails, signing resumes by itself.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness import Control, wait_for
from tests.integration.test_external_ca import metric
from tests.integration.test_identity_csr_api import csr_for, post
from tests.integration.test_identity_support import assert_no_secrets_in_logs, mtls_pair, parse_h2load, spiffe
from tests.integration.test_vault_support import (
    MOUNT,
    ROLE,
    Bao,
    certificate,
    not_ready_reason,
    set_up_approle,
    set_up_kubernetes_auth,
    set_up_pki,
    token_file,
    vault_args,
)

NS = "bank"
CERT_TTL = "10s"
LOAD_SECONDS = 6  # of h2load at 50 requests/s, for the root rotation and the restart of Vault


@pytest.fixture(scope="module")
def vault(process_log_dir):
    bao = Bao(dev=False, tls=True, log_dir=process_log_dir).start()
    bao.initialize()
    bao.root_pem = set_up_pki(bao.client())
    yield bao
    bao.stop()


@pytest.fixture(scope="module")
def mesh(vault, control_factory, backend_factory, proxy_factory, tmp_path_factory):
    vault_token = token_file(vault.client(), tmp_path_factory.mktemp("vault-secrets"))
    control = control_factory(workload_cert_ttl="1h", extra_args=vault_args(
        vault, "--vault-auth", "token", "--vault-token-file", vault_token))
    control.vault_token = vault_token.read_text().strip()  # for the check that no log shows it
    app, server, client = mtls_pair(control, backend_factory, proxy_factory, tmp_path_factory.mktemp("vault-config"),
                                    NS, cert_ttl=CERT_TTL)
    return control, server, client


def issuer(vault) -> str:
    return f"vault {vault.addr} {MOUNT}/sign/{ROLE}"


def settle_on(control, reason: str) -> None:
    """Wait until ``/ready`` answers 503 with ``reason``.  A status refresh that the change under test catches
    midway (Vault sealed or stopped during its second call) may first give that call's error ("context
    canceled"); the next refresh gives the settled reason."""
    seen = []
    try:
        wait_for(lambda: seen.append(not_ready_reason(control)) or seen[-1] == reason, 10,
                 what=f"/ready to say {reason!r}")
    except TimeoutError as error:
        raise AssertionError(f"{error}; reasons seen: {sorted(set(map(str, seen)))}") from None


def signed_within(control, seconds: int) -> tuple[float, float]:
    """``(CSRs, of which within seconds)``: how many CSRs mesh-control's signing histogram counts, all and
    those the CA answered within ``seconds`` (one of its buckets' bounds)."""
    series = "mesh_ca_csr_duration_seconds_{}{{ca=\"vault\"{}}}"
    return (metric(control, series.format("count", "")),
            metric(control, series.format("bucket", f',le="{seconds:.1f}"')))


def signed_by_vault(control, account: str) -> dict:
    """A CSR for NS/account with a join token: the control plane's 200 answer."""
    answer = post(control, {"credential": control.token(NS, account), "csr": csr_for(account)})
    assert answer.status == 200, answer
    return answer.json()


def test_workloads_get_vault_certificates_and_talk_mtls(mesh, vault):
    control, server, client = mesh
    root = x509.load_pem_x509_certificate(vault.root_pem.encode())
    for proxy, account in ((server, "user-service"), (client, "frontend")):
        cert = certificate(proxy)
        assert (cert["identity"], cert["issuer"], cert["ca_issuer"]) == (
            spiffe(NS, account), "CN=txmesh test root 1", issuer(vault)), cert
    ready = control.admin()
    assert ready["ca"] == {"name": "vault", "ready": True, "reason": None, "issuer": issuer(vault), "roots": 1}
    assert x509.load_pem_x509_certificates(control.root_cert.read_bytes()) == [root]
    assert client.curl("user-service", "/").status == 200

    answer = signed_by_vault(control, "teller")
    leaf = x509.load_pem_x509_certificate(answer["certificate"].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(spiffe(NS, "teller"))] and len(leaf.subject) == 0
    assert leaf.issuer == root.subject and leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value \
        == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    assert answer["chain"] == "" and answer["issuer"] == issuer(vault)  # signed by the root itself
    assert x509.load_pem_x509_certificates(answer["trust_bundle"].encode()) == [root]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 3600 <= life.total_seconds() <= 3600 + 60, life  # the mesh's TTL (Vault backdates by 30 s)


def test_a_sealed_vault_answers_csrs_503_and_the_mesh_keeps_serving(mesh, vault):
    control, server, client = mesh
    before = {proxy: certificate(proxy)["serial"] for proxy in (server, client)}
    sealed = f"vault at {vault.addr} is sealed: unseal it (vault operator unseal)"
    vault.seal()
    try:
        settle_on(control, f"CA 'vault' not ready: {sealed}")
        answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller")})
        assert answer.status == 503 and answer.headers["retry-after"] == "5", answer
        assert answer.json() == {"error": f"CA unavailable: {sealed}"}
        for proxy in (server, client):  # their renewal (at about half of 10 s) is refused, and retried
            failing = wait_for(lambda proxy=proxy: "is sealed" in (certificate(proxy)["last_renewal_error"] or "")
                               and certificate(proxy), 8, what=f"{proxy} to fail a renewal")
            assert failing["serial"] == before[proxy] and "(503)" in failing["last_renewal_error"]
        for index in range(12):  # new mTLS connections every 10 requests: the certificates in use still work
            assert client.curl("user-service", f"/sealed-{index}").status == 200
    finally:
        vault.unseal()
    for proxy in (server, client):
        renewed = wait_for(lambda proxy=proxy: certificate(proxy)["serial"] != before[proxy] and certificate(proxy),
                           15, what=f"{proxy} to renew once Vault is unsealed")
        assert renewed["last_renewal_error"] is None
    assert control.admin_request("/ready")[0] == 200
    assert "vault CA not ready: " + sealed in control.log_path.read_text()


def test_a_stalled_vault_times_csrs_out_and_blocks_nothing_else(mesh, vault):
    """Vault stopped (SIGSTOP: connections are accepted, nothing is answered): a CSR is answered 503 after
    --vault-timeout (3 s), while mesh-control's other ports and the mesh's traffic go on."""
    control, server, client = mesh
    token, csr = control.token(NS, "teller"), csr_for("teller")
    answered, within = signed_within(control, 5)
    vault.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = post(control, {"credential": token, "csr": csr})
        waited = time.monotonic() - started
        assert answer.status == 503 and answer.json()["error"].startswith(
            f"CA unavailable: vault at {vault.addr} did not answer"), answer
        assert waited >= 2.5, waited  # this client's time: at least mesh-control's, which waited for Vault
        # mesh-control's own time (its histogram, not this client's clock, which a loaded machine stretches):
        # every CSR it answered meanwhile (this one, and the sidecars' renewals) within the timeout and 2 s
        now = signed_within(control, 5)
        assert now[0] > answered and now[0] - answered == now[1] - within, (answered, within, now)
        started = time.monotonic()
        assert control.admin_request("/ready")[0] in (200, 503) and time.monotonic() - started < 1
        assert client.curl("user-service", "/stalled").status == 200
    finally:
        vault.send_signal(signal.SIGCONT)
    wait_for(lambda: control.admin_request("/ready")[0] == 200, 10, what="mesh-control to be ready again")
    assert signed_by_vault(control, "teller")["issuer"] == issuer(vault)


@pytest.mark.timeout(60)
def test_a_root_rotation_in_vault_reaches_every_sidecar_and_fails_no_request(mesh, vault):
    control, server, client = mesh
    load = subprocess.Popen(
        ["h2load", "--h1", "-c", "2", "--rps", "25", "-D", str(LOAD_SECONDS), "-H",
         ":authority: user-service", f"{client.outbound_url}/rotation"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        root2 = vault.client().write_data(f"{MOUNT}/root/rotate/internal", data={
            "common_name": "txmesh test root 2", "issuer_name": "root-2", "key_type": "ec", "ttl": "87600h"})
        for proxy in (server, client):  # first every sidecar trusts both roots ...
            # Vault's status refresh, then a push round (--push-max-delay): seconds on a loaded machine
            wait_for(lambda proxy=proxy: certificate(proxy)["trust_bundle_roots"] == 2, 15,
                     what=f"{proxy} to trust the new root too")
        vault.client().write_data(f"{MOUNT}/root/replace", data={"default": "root-2"})
        for proxy in (server, client):  # ... then the new root signs
            wait_for(lambda proxy=proxy: certificate(proxy)["issuer"] == "CN=txmesh test root 2", 15,
                     what=f"{proxy} to get a certificate from the new root")
        output = load.communicate(timeout=30)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = parse_h2load(output)
    assert result.done >= 0.9 * 50 * LOAD_SECONDS, output
    assert (result.failed, result.errored, result.timeout, result.status["5xx"]) == (0, 0, 0, 0), output
    roots = x509.load_pem_x509_certificates(control.root_cert.read_bytes())
    assert [root.subject.rfc4514_string() for root in roots] == ["CN=txmesh test root 1", "CN=txmesh test root 2"]
    assert root2["data"]["certificate"].encode() in control.root_cert.read_bytes()
    assert control.admin()["ca"]["roots"] == 2


def test_in_a_namespace_the_token_file_is_renewed_and_reread_when_replaced(vault, control_factory, tmp_path):
    """``--vault-namespace``: the mount, the role, the policy and the token live in a Vault namespace.  A short
    token is renewed before it expires; a new token written to the file (as Vault Agent's sink does) is
    taken up without a restart."""
    vault.client().sys.create_namespace("team-a")
    team = vault.client(namespace="team-a")
    team_root = x509.load_pem_x509_certificate(set_up_pki(team).encode())
    path = token_file(team, tmp_path, ttl="6s")
    control = control_factory(workload_cert_ttl="1h", extra_args=vault_args(
        vault, "--vault-token-file", path, "--vault-namespace", "team-a"))
    wait_for(lambda: "vault: token renewed (valid 6s, renewable)" in control.log_path.read_text(), 8,
             what="mesh-control to renew its 6 s Vault token")
    path.write_text(token_file(team, tmp_path).read_text())
    wait_for(lambda: control.log_path.read_text().count(f"vault: using the token in {path}") == 2, 10,
             what="mesh-control to take the new token up")
    assert re.search(rf"vault: using the token in {re.escape(str(path))} \(valid 3\d{{3}}s, renewable\)",
                     control.log_path.read_text())  # the remaining TTL: 3600 s, or a second less
    leaf = x509.load_pem_x509_certificate(signed_by_vault(control, "teller")["certificate"].encode())
    leaf.verify_directly_issued_by(team_root)  # the namespace's root, not the root namespace's
    assert x509.load_pem_x509_certificates(control.root_cert.read_bytes()) == [team_root]
    control.stop()


def test_approle_login_is_renewed_then_done_again_at_the_max_ttl(vault, control_factory, tmp_path):
    client = vault.client()
    role_id, secret_id_file = set_up_approle(client, tmp_path, token_ttl="2s", token_max_ttl="4s")
    control = control_factory(workload_cert_ttl="1h", extra_args=vault_args(
        vault, "--vault-auth", "approle", "--vault-approle-role-id", role_id,
        "--vault-approle-secret-id-file", secret_id_file))
    wait_for(lambda: control.log_path.read_text().count("vault: logged in with approle auth (valid 2s, renewable)")
             >= 2, 12, what="a login, renewals up to the max TTL, and a new login")
    assert "vault: token renewed" in control.log_path.read_text()
    assert signed_by_vault(control, "teller")["issuer"] == issuer(vault)
    assert secret_id_file.read_text().strip() not in control.log_path.read_text()
    control.stop()


def test_kubernetes_auth_logs_in_with_the_service_account_token(vault, kube_api, control_factory, tmp_path):
    jwt_file = set_up_kubernetes_auth(vault.client(), kube_api, tmp_path)
    control = control_factory(workload_cert_ttl="1h", extra_args=vault_args(
        vault, "--vault-auth", "kubernetes", "--vault-kubernetes-role", "txmesh",
        "--vault-kubernetes-jwt-file", jwt_file))
    assert "vault: logged in with kubernetes auth (valid 3600s, renewable)" in control.log_path.read_text()
    assert any(request["path"] == "/apis/authentication.k8s.io/v1/tokenreviews" for request in kube_api.requests())
    assert signed_by_vault(control, "teller")["issuer"] == issuer(vault)
    control.stop()


def test_a_role_that_cannot_sign_mesh_workloads_is_named_in_ready(vault, process_log_dir, tmp_path):
    vault.client().write_data(f"{MOUNT}/roles/strict", data={"allowed_uri_sans": "spiffe://other.td/*",
                                                            "require_cn": True})
    vault.client().sys.create_or_update_policy("strict", f'path "{MOUNT}/sign/strict" {{ capabilities = ["update"] }}'
                                                         f'\npath "{MOUNT}/roles/strict" {{ capabilities = ["read"] }}')
    token = vault.client().auth.token.create(policies=["strict"], ttl="1h")["auth"]["client_token"]
    (tmp_path / "token").write_text(token)
    control = Control(log_dir=process_log_dir, extra_args=vault_args(
        vault, "--vault-token-file", tmp_path / "token", "--vault-pki-role", "strict"))
    with control.spawn():
        reason = wait_for(lambda: "PKI role" in (not_ready_reason(control) or "") and not_ready_reason(control), 10,
                          what="/ready to name the role's problems")
    assert reason == (
        f"CA 'vault' not ready: PKI role {MOUNT}/roles/strict: set require_cn=false (workload CSRs carry no common "
        f"name, only the SPIFFE id); PKI role {MOUNT}/roles/strict: set allowed_uri_sans=spiffe://cluster.local/* "
        "(it allows spiffe://other.td/*)")


@pytest.mark.timeout(60)
def test_a_vault_restart_under_load_fails_no_request(mesh, vault):
    """Vault stops (CSRs 503) and starts again, sealed: unsealed, it has kept mesh-control's token, the
    mount and its roots, and the sidecars renew from it; meanwhile no data-plane request fails."""
    control, server, client = mesh
    load = subprocess.Popen(
        ["h2load", "--h1", "-c", "2", "--rps", "25", "-D", str(LOAD_SECONDS), "-H", ":authority: user-service",
         f"{client.outbound_url}/restart"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    down = f"vault at {vault.addr} is unreachable ([Errno 111] Connection refused): start it, or check --vault-addr"
    try:
        vault.stop()
        settle_on(control, f"CA 'vault' not ready: {down}")
        answer = post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller")})
        assert answer.status == 503 and answer.json() == {"error": f"CA unavailable: {down}"}, answer
        vault.start()
        vault.unseal()
        before = {proxy: certificate(proxy)["serial"] for proxy in (server, client)}
        wait_for(lambda: control.admin_request("/ready")[0] == 200, 10, what="mesh-control to be ready again")
        for proxy in (server, client):  # the sidecars renew from the restarted Vault
            wait_for(lambda proxy=proxy: certificate(proxy)["serial"] != before[proxy], 15,
                     what=f"{proxy} to renew after the restart")
        output = load.communicate(timeout=30)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    result = parse_h2load(output)
    assert result.done >= 0.9 * 50 * LOAD_SECONDS, output
    assert (result.failed, result.errored, result.timeout, result.status["5xx"]) == (0, 0, 0, 0), output
    assert post(control, {"credential": control.token(NS, "teller"), "csr": csr_for("teller")}).status == 200
    log = control.log_path.read_text()
    assert f"vault CA not ready: {down}" in log and log.rindex("vault CA ready") > log.index(down)
    assert control.admin()["ca"]["ready"] is True
    # after every test of the module: no log holds Vault's tokens or the unseal key, nor a private key
    assert_no_secrets_in_logs([control, server, client, vault],
                              tokens=[control.vault_token, vault.root_token, vault.unseal_key, *control.tokens])
