"""The mesh CA (mesh.identity.ca): generated root, plugged-in root or intermediate, workload certificates.

Chains are checked with the real ``openssl verify``, not only with the code that built them.
"""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity.agent import make_csr
from mesh.identity.ca import CAError, CertificateAuthority, generate_root, pem_certs, to_pem
from mesh.identity.tls import WorkloadCredentials, spiffe_id_of

TD = "cluster.local"
URI = "spiffe://cluster.local/ns/shop/sa/frontend"
UTC = datetime.timezone.utc


def _now():
    return datetime.datetime.now(UTC)


def _csr(uri=URI, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    return key, x509.load_pem_x509_csr(make_csr(key, uri))


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> str:
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def openssl_verify(tmp_path: Path, leaf_pem: bytes, roots_pem: bytes, untrusted_pem: bytes = b"",
                   purpose: str = "sslclient") -> subprocess.CompletedProcess:
    """``openssl verify -x509_strict -purpose P -CAfile roots [-untrusted intermediates] leaf``."""
    leaf = _write(tmp_path / "verify-leaf.pem", leaf_pem)
    argv = ["openssl", "verify", "-x509_strict", "-purpose", purpose,
            "-CAfile", _write(tmp_path / "verify-roots.pem", roots_pem)]
    if untrusted_pem:
        argv += ["-untrusted", _write(tmp_path / "verify-untrusted.pem", untrusted_pem)]
    return subprocess.run([*argv, leaf], capture_output=True, text=True, timeout=30)


# -- the generated root ------------------------------------------------------------------------

@pytest.fixture
def state(tmp_path):
    return tmp_path / "state"


@pytest.fixture
def ca(state):
    return CertificateAuthority.load_or_create(str(state), TD)


def test_root_is_generated_with_a_0600_key(ca, state):
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca-cert.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((state / "root-cert.pem").stat().st_mode) == 0o644
    assert not list(state.glob("*.tmp"))
    key = serialization.load_pem_private_key((state / "ca-key.pem").read_bytes(), password=None)
    assert key.public_key().public_numbers() == ca.cert.public_key().public_numbers()


def test_root_is_p256_ca_for_ten_years(ca, state):
    cert = x509.load_pem_x509_certificate((state / "ca-cert.pem").read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert cert.subject == cert.issuer
    lifetime = cert.not_valid_after_utc - _now()
    assert abs(lifetime - datetime.timedelta(days=3650)) < datetime.timedelta(minutes=1)
    assert cert.not_valid_before_utc <= _now()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is True
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert ca.bundle == [cert] and pem_certs((state / "root-cert.pem").read_bytes()) == [cert]
    assert 3649 * 86400 < ca.expires_in() <= 3650 * 86400


def test_root_passes_openssl_as_a_ca(ca, state, tmp_path):
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(state / "ca-cert.pem")],
                          capture_output=True, text=True, check=True).stdout
    assert "CA:TRUE" in text and "prime256v1" in text and "Certificate Sign" in text
    result = openssl_verify(tmp_path, ca.cert.public_bytes(serialization.Encoding.PEM), ca.bundle_pem(),
                            purpose="any")
    assert result.returncode == 0, result.stderr


def test_second_start_reuses_the_root(ca, state):
    again = CertificateAuthority.load_or_create(str(state), TD)
    assert again.cert == ca.cert
    assert _key_pem(again.key) == _key_pem(ca.key)


def test_extra_roots_join_the_bundle(ca, state):
    _, other_root = generate_root(TD)
    (state / "extra-roots.pem").write_bytes(to_pem([other_root, ca.cert]))  # the own root is not repeated
    again = CertificateAuthority.load_or_create(str(state), TD)
    assert again.bundle == [ca.cert, other_root]
    assert pem_certs((state / "root-cert.pem").read_bytes()) == [ca.cert, other_root]


# -- workload certificates ----------------------------------------------------------------------

def test_leaf_has_exactly_one_uri_san_and_both_ekus(ca):
    _, csr = _csr()
    cert_pem, chain_pem = ca.sign(csr, URI, 3600)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(URI)]
    assert spiffe_id_of(cert) == URI
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert cert.issuer == ca.cert.subject
    assert cert.public_key().public_numbers() == csr.public_key().public_numbers()
    assert pem_certs(chain_pem) == [ca.cert]


def test_leaf_san_comes_from_the_identity_not_the_csr(ca):
    """sign() trusts its ``spiffe_uri`` argument (check_csr has compared the two before)."""
    _, csr = _csr("spiffe://cluster.local/ns/shop/sa/other")
    cert = x509.load_pem_x509_certificate(ca.sign(csr, URI, 60)[0])
    assert spiffe_id_of(cert) == URI


@pytest.mark.parametrize("ttl", [20, 3600, 86400])
def test_leaf_lives_the_requested_ttl(ca, ttl):
    _, csr = _csr()
    before = _now()
    cert = x509.load_pem_x509_certificate(ca.sign(csr, URI, ttl)[0])
    after = _now()
    assert before + datetime.timedelta(seconds=ttl) - datetime.timedelta(seconds=1) \
        <= cert.not_valid_after_utc <= after + datetime.timedelta(seconds=ttl)
    assert cert.not_valid_before_utc <= before  # backdated for clock skew


def test_leaf_never_outlives_the_ca(ca):
    _, csr = _csr()
    cert = x509.load_pem_x509_certificate(ca.sign(csr, URI, 20 * 365 * 86400)[0])
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc


def test_leaf_serials_are_unique(ca):
    serials = {x509.load_pem_x509_certificate(ca.sign(_csr()[1], URI, 60)[0]).serial_number for _ in range(20)}
    assert len(serials) == 20


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_leaf_verifies_with_openssl(ca, tmp_path, purpose):
    _, csr = _csr()
    cert_pem, _ = ca.sign(csr, URI, 3600)
    result = openssl_verify(tmp_path, cert_pem, ca.bundle_pem(), purpose=purpose)
    assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr


def test_leaf_is_refused_by_openssl_against_another_root(ca, tmp_path):
    _, other_root = generate_root(TD)
    cert_pem, _ = ca.sign(_csr()[1], URI, 3600)
    result = openssl_verify(tmp_path, cert_pem, to_pem([other_root]))
    assert result.returncode != 0 and "unable to get local issuer certificate" in result.stdout + result.stderr


def test_signed_credentials_build_tls_contexts(ca):
    key, csr = _csr()
    cert_pem, chain_pem = ca.sign(csr, URI, 3600)
    creds = WorkloadCredentials.from_pem(_key_pem(key), cert_pem + chain_pem, ca.bundle_pem())
    assert creds.identity == URI and 3590 < creds.expires_in() <= 3600


# -- a provided CA -------------------------------------------------------------------------------

def _make_intermediate(root_key, root_cert, days=365):
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txmesh test intermediate")]))
            .issuer_name(root_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    return key, cert


@pytest.fixture
def corporate(tmp_path):
    """An offline root and an intermediate for the mesh, as files (the key 0600)."""
    root_key, root_cert = generate_root("corp.example")
    inter_key, inter_cert = _make_intermediate(root_key, root_cert)
    files = tmp_path / "corp"
    files.mkdir()
    return {
        "root": root_cert, "intermediate": inter_cert, "key": inter_key,
        "ca_cert": _write(files / "intermediate.pem", to_pem([inter_cert])),
        "ca_key": _write(files / "intermediate-key.pem", _key_pem(inter_key), 0o600),
        "ca_chain": _write(files / "root.pem", to_pem([root_cert])),
        "root_key": root_key,
    }


def test_provided_intermediate_signs_with_its_chain(corporate, state, tmp_path):
    ca = CertificateAuthority.load_or_create(str(state), TD, corporate["ca_cert"], corporate["ca_key"],
                                             corporate["ca_chain"])
    assert not (state / "ca-key.pem").exists(), "nothing is generated when a CA is provided"
    assert ca.bundle == [corporate["root"]]
    assert pem_certs((state / "root-cert.pem").read_bytes()) == [corporate["root"]]
    assert pem_certs((state / "cert-chain.pem").read_bytes()) == [corporate["intermediate"], corporate["root"]]
    assert 364 * 86400 < ca.expires_in() <= 365 * 86400  # the intermediate's life, not the root's

    cert_pem, chain_pem = ca.sign(_csr()[1], URI, 3600)
    assert pem_certs(chain_pem) == [corporate["intermediate"], corporate["root"]]
    assert x509.load_pem_x509_certificate(cert_pem).issuer == corporate["intermediate"].subject
    result = openssl_verify(tmp_path, cert_pem, ca.bundle_pem(), untrusted_pem=to_pem([corporate["intermediate"]]))
    assert result.returncode == 0, result.stdout + result.stderr
    # without the intermediate a peer cannot build the path: the chain must be sent along
    result = openssl_verify(tmp_path, cert_pem, ca.bundle_pem())
    assert result.returncode != 0


def test_leaf_of_an_intermediate_never_outlives_it(corporate, state):
    ca = CertificateAuthority.load_or_create(str(state), TD, corporate["ca_cert"], corporate["ca_key"],
                                             corporate["ca_chain"])
    cert = x509.load_pem_x509_certificate(ca.sign(_csr()[1], URI, 2 * 365 * 86400)[0])
    assert cert.not_valid_after_utc <= corporate["intermediate"].not_valid_after_utc


def test_provided_root_without_chain(corporate, state, tmp_path):
    root_key_file = _write(tmp_path / "root-key.pem", _key_pem(corporate["root_key"]), 0o600)
    ca = CertificateAuthority.load_or_create(str(state), TD, corporate["ca_chain"], root_key_file)
    assert ca.chain == [] and ca.bundle == [corporate["root"]]
    cert_pem, chain_pem = ca.sign(_csr()[1], URI, 60)
    assert pem_certs(chain_pem) == [corporate["root"]]
    assert openssl_verify(tmp_path, cert_pem, ca.bundle_pem()).returncode == 0


def test_provided_cert_without_key(corporate, state):
    with pytest.raises(CAError, match="--ca-cert and --ca-key go together"):
        CertificateAuthority.load_or_create(str(state), TD, ca_cert=corporate["ca_cert"])
    with pytest.raises(CAError, match="go together"):
        CertificateAuthority.load_or_create(str(state), TD, ca_key=corporate["ca_key"])


# -- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_a_state_key_readable_by_others(ca, state, mode):
    key_path = state / "ca-key.pem"
    key_path.chmod(mode)
    with pytest.raises(CAError, match=rf"ca-key.pem has mode {mode:o}; a CA key must be 0600 \(chmod 600 "):
        CertificateAuthority.load_or_create(str(state), TD)
    assert stat.S_IMODE(key_path.stat().st_mode) == mode, "the CA must not silently fix the mode"


def test_a_0400_state_key_is_fine(ca, state):
    (state / "ca-key.pem").chmod(0o400)
    assert CertificateAuthority.load_or_create(str(state), TD).cert == ca.cert


def test_refuses_a_provided_key_readable_by_others(corporate, state):
    os.chmod(corporate["ca_key"], 0o644)
    with pytest.raises(CAError, match="has mode 644; a CA key must be 0600"):
        CertificateAuthority.load_or_create(str(state), TD, corporate["ca_cert"], corporate["ca_key"],
                                            corporate["ca_chain"])


def test_refuses_state_key_and_cert_mismatch(ca, state):
    other_key, _ = generate_root(TD)
    _write(state / "ca-key.pem", _key_pem(other_key), 0o600)
    with pytest.raises(CAError, match="the CA key does not belong to the CA certificate"):
        CertificateAuthority.load_or_create(str(state), TD)


def test_refuses_provided_key_and_cert_mismatch(corporate, state, tmp_path):
    wrong = _write(tmp_path / "wrong-key.pem", _key_pem(ec.generate_private_key(ec.SECP256R1())), 0o600)
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.load_or_create(str(state), TD, corporate["ca_cert"], wrong, corporate["ca_chain"])


@pytest.mark.parametrize("what, content, match", [
    ("key", b"not a key", "not an unencrypted PEM private key"),
    ("cert", b"not a cert", "not a PEM certificate"),
    ("key", None, "not an unencrypted PEM private key"),
])
def test_refuses_unreadable_material(corporate, state, tmp_path, what, content, match):
    paths = {"cert": corporate["ca_cert"], "key": corporate["ca_key"]}
    target = tmp_path / f"bad-{what}.pem"
    if content is not None:
        _write(target, content, 0o600)
    paths[what] = str(target)
    with pytest.raises(CAError, match=match):
        CertificateAuthority.load_or_create(str(state), TD, paths["cert"], paths["key"], corporate["ca_chain"])


def test_refuses_an_encrypted_key(corporate, state, tmp_path):
    encrypted = corporate["key"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(b"secret"))
    path = _write(tmp_path / "encrypted.pem", encrypted, 0o600)
    with pytest.raises(CAError, match="not an unencrypted PEM private key"):
        CertificateAuthority.load_or_create(str(state), TD, corporate["ca_cert"], path, corporate["ca_chain"])
