"""Unit tests of the Kubernetes identity pieces of mesh-control that need no API server.

- :func:`mesh.control.kube.tokenreview.identity_of`: what a TokenReview answer proves (the identity comes from the
  review's username; unauthenticated, wrong-audience and non-service-account answers are refused, each
  with what to do)
- :class:`mesh.identity.credentials.DispatchingVerifier`: join tokens to one verifier, the rest to another
- :class:`mesh.control.kube.ca_secret.CAMaterial`: a Secret's data checked key by key, errors naming the Secret and
  the key; installed into the state dir with 0600 keys

The TokenReview and Secret round trips against the test API server are in
tests/integration/test_kube_identity.py.
"""

from __future__ import annotations

import base64
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.control.kube.ca_secret import CAMaterial, CASecretError
from mesh.control.kube.tokenreview import ReviewOutcome, identity_of
from mesh.identity.agent import make_csr
from mesh.identity.ca import CertificateAuthority, generate_root, to_pem
from mesh.identity.credentials import CredentialRejected, DispatchingVerifier, VerifierUnavailable
from mesh.identity.spiffe import SpiffeId
from mesh.identity.tokens import is_join_token, load_or_create_key

TD = "cluster.local"
WHERE = "Secret mesh-system/txmesh-ca"


# -- what a TokenReview proves ------------------------------------------------------------------------

def test_the_identity_comes_from_the_reviewed_username():
    outcome = ReviewOutcome(True, "system:serviceaccount:bank:teller", ["txmesh"], "")
    assert identity_of(outcome, TD) == SpiffeId(TD, "bank", "teller")
    assert identity_of(outcome, "example.org").uri == "spiffe://example.org/ns/bank/sa/teller"


@pytest.mark.parametrize("outcome, reason, advice", [
    (ReviewOutcome(False, "", [], "[invalid bearer token, token lookup failed]"),
     "did not authenticate the service-account token ([invalid bearer token, token lookup failed])",
     "unknown to this cluster"),
    (ReviewOutcome(False, "", [], "[invalid bearer token, service account token has expired]"),
     "has expired", "reads the mounted file"),
    (ReviewOutcome(False, "", [], 'token audiences ["vault"] is invalid for the target audiences ["txmesh"]'),
     'token audiences ["vault"]', "with audience txmesh"),
    (ReviewOutcome(True, "system:serviceaccount:bank:teller", ["https://kubernetes.default.svc"], ""),
     "not for audience txmesh (the API server accepted it for ['https://kubernetes.default.svc'])",
     "with audience txmesh"),
    (ReviewOutcome(True, "system:serviceaccount:bank:teller", [], ""), "not for audience txmesh",
     "--token-file"),
    (ReviewOutcome(True, "jane@example.com", ["txmesh"], ""), "belongs to 'jane@example.com', not to a service "
     "account", "projected service-account token"),
    (ReviewOutcome(True, "system:node:worker-1", ["txmesh"], ""), "not to a service account", "txmesh"),
    (ReviewOutcome(True, "system:serviceaccount:Bank:teller", ["txmesh"], ""),
     "service account Bank/teller has no valid SPIFFE id", "spiffe://"),
], ids=["unknown", "expired", "wrong-audience", "other-audience-only", "no-audiences", "a-user",
        "a-node", "invalid-namespace"])
def test_refusals_say_what_was_wrong_and_what_to_do(outcome, reason, advice):
    with pytest.raises(CredentialRejected) as caught:
        identity_of(outcome, TD)
    assert not isinstance(caught.value, VerifierUnavailable)
    assert reason in str(caught.value) and advice in str(caught.value), str(caught.value)


def test_a_review_without_status_proves_nothing():
    class Review:
        status = None

    outcome = ReviewOutcome.of(Review())
    with pytest.raises(CredentialRejected, match="without a status"):
        identity_of(outcome, TD)


# -- join tokens and everything else ------------------------------------------------------------------

class Recorder:
    def __init__(self, name):
        self.name, self.seen = name, []

    def verify(self, credential):
        self.seen.append(credential)
        return self.name


@pytest.mark.parametrize("credential, expected", [
    ("txm1.eyJucyI6ImJhbmsifQ.c2ln", "join"),
    (" txm1.abc.def\n", "join"),
    ("eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJhdWQiOlsidHhtZXNoIl19.c2ln", "kube"),
    ("txm1", "kube"),
    ("txm2.a.b", "kube"),
    ({"not": "a string"}, "kube"),
])
def test_dispatching_verifier_sends_join_tokens_to_the_join_token_verifier(credential, expected):
    join, kube = Recorder("join"), Recorder("kube")
    assert DispatchingVerifier(join, kube).verify(credential) == expected
    assert (join.seen, kube.seen) == (([credential], []) if expected == "join" else ([], [credential]))
    assert is_join_token(credential) == (expected == "join")


# -- the CA Secret's data -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def material():
    return CAMaterial.generate(TD)


def _data(material, **replace):
    data = material.secret_data()
    for key, value in replace.items():
        key = key.replace("_", "-").replace("-pem", ".pem")
        if value is None:
            del data[key]
        else:
            data[key] = value if isinstance(value, str) else base64.b64encode(value).decode()
    return data


def test_secret_data_round_trips(material):
    data = material.secret_data()
    assert set(data) == {"ca-cert.pem", "ca-key.pem", "token-key"}
    assert CAMaterial.from_secret_data(data, WHERE) == material
    assert len(material.token_key) == 32
    assert len(material.fingerprint()) == 64 and material.fingerprint() not in str(data)


def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _leaf_cert_and_key():
    """A workload certificate and its key: a valid pair, but no CA."""
    root_key, root = generate_root(TD)
    ca = CertificateAuthority(root_key, root, chain=[], bundle=[root], trust_domain=TD)
    key = ec.generate_private_key(ec.SECP256R1())
    uri = "spiffe://cluster.local/ns/a/sa/b"
    cert_pem, _ = ca.sign(x509.load_pem_x509_csr(make_csr(key, uri)), uri, 600)
    return cert_pem, _pkcs8(key)


@pytest.mark.parametrize("case, replace, message", [
    ("no-cert", {"ca_cert_pem": None}, f"{WHERE} has no 'ca-cert.pem' key; delete the Secret"),
    ("no-key", {"ca_key_pem": None}, f"{WHERE} has no 'ca-key.pem' key"),
    ("no-token-key", {"token_key": None}, f"{WHERE} has no 'token-key' key"),
    ("empty-token-key", {"token_key": ""}, f"{WHERE} has no 'token-key' key"),
    ("not-base64", {"ca_key_pem": "%%% not base64 %%%"}, f"{WHERE}: key 'ca-key.pem' is not base64"),
    ("cert-not-pem", {"ca_cert_pem": b"hello"}, f"{WHERE}: key 'ca-cert.pem' is not a PEM certificate"),
    ("key-not-pem", {"ca_key_pem": b"hello"}, f"{WHERE}: key 'ca-key.pem' is not an unencrypted PEM private key"),
    ("foreign-key", {"ca_key_pem": _pkcs8(generate_root(TD)[0])},
     f"{WHERE}: key 'ca-key.pem' does not belong to the certificate in 'ca-cert.pem'"),
    ("short-token-key", {"token_key": b"0123456789"}, f"{WHERE}: key 'token-key' has 10 bytes; it needs at least 32"),
    ("extra-not-base64", {"extra_roots_pem": "%%%"}, f"{WHERE}: key 'extra-roots.pem' is not base64"),
    ("extra-not-pem", {"extra_roots_pem": b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"},
     f"{WHERE}: key 'extra-roots.pem' is not a list of PEM certificates"),
], ids=lambda value: value if isinstance(value, str) and " " not in value else None)
def test_a_bad_secret_is_refused_naming_the_secret_and_the_key(material, case, replace, message):
    with pytest.raises(CASecretError) as caught:
        CAMaterial.from_secret_data(_data(material, **replace), WHERE)
    assert message in str(caught.value), str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_a_leaf_certificate_is_not_a_ca(material):
    cert_pem, key_pem = _leaf_cert_and_key()
    with pytest.raises(CASecretError, match="'ca-cert.pem' is not a CA certificate"):
        CAMaterial.from_secret_data(_data(material, ca_cert_pem=cert_pem, ca_key_pem=key_pem), WHERE)


def test_installed_material_is_what_the_ca_and_token_key_load(material, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # whatever the state dir held before (an earlier CA of this replica) is replaced by the Secret's
    CertificateAuthority.load_or_create(str(state), TD)
    load_or_create_key(str(state))
    material.install(str(state))
    for name in ("ca-key.pem", "token-key"):
        assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name
    ca = CertificateAuthority.load_or_create(str(state), TD)
    assert to_pem([ca.cert]) == material.cert_pem
    assert (state / "root-cert.pem").read_bytes() == material.cert_pem
    assert load_or_create_key(str(state)) == material.token_key


def test_a_leaf_certificate_is_no_extra_root(material):
    cert_pem, _ = _leaf_cert_and_key()
    with pytest.raises(CASecretError, match="'extra-roots.pem' holds .* which is not a CA certificate"):
        CAMaterial.from_secret_data(_data(material, extra_roots_pem=cert_pem), WHERE)


def test_extra_roots_join_the_trust_bundle_and_leave_it_with_the_secret(material, tmp_path):
    """A root rotation with --ca-secret: the Secret's extra-roots.pem is the state dir's, added and removed."""
    _, new_root = generate_root(TD)
    rotating = CAMaterial.from_secret_data(_data(material, extra_roots_pem=to_pem([new_root])), WHERE)
    assert set(rotating.secret_data()) == {"ca-cert.pem", "ca-key.pem", "token-key", "extra-roots.pem"}
    state = tmp_path / "state"
    rotating.install(str(state))
    ca = CertificateAuthority.load_or_create(str(state), TD)
    assert to_pem(ca.bundle) == material.cert_pem + to_pem([new_root])
    material.install(str(state))  # the last step: the Secret has no extra roots any more
    assert not (state / "extra-roots.pem").exists()
    assert to_pem(CertificateAuthority.load_or_create(str(state), TD).bundle) == material.cert_pem
