"""CSR checks (mesh.identity.csr.check_csr): what the CA refuses to sign, before any signer sees it."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from mesh.identity.agent import make_csr
from mesh.identity.csr import MAX_CSR_BYTES, CSRRejected, check_csr

URI = "spiffe://cluster.local/ns/shop/sa/frontend"


def build_csr(key=None, sans=(URI,), *, extensions=(), hash_algorithm=hashes.SHA256(), subject=()) -> bytes:
    """A PEM CSR; ``sans`` are URI strings or ready x509.GeneralName objects (None: no SAN extension)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(list(subject)))
    if sans is not None:
        names = [name if isinstance(name, x509.GeneralName) else x509.UniformResourceIdentifier(name)
                 for name in sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        hash_algorithm = None
    return builder.sign(key, hash_algorithm).public_bytes(serialization.Encoding.PEM)


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


def _rejected(pem: bytes, match: str, uri: str = URI) -> str:
    with pytest.raises(CSRRejected, match=match) as info:
        check_csr(pem, uri)
    return str(info.value)


# -- accepted --------------------------------------------------------------------------------

def test_agent_csr_is_accepted():
    """What the workload agent sends: ECDSA P-256, empty subject, one critical URI SAN."""
    csr = check_csr(make_csr(ec.generate_private_key(ec.SECP256R1()), URI), URI)
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier) == [URI]


@pytest.mark.parametrize("key", [
    pytest.param(lambda: ec.generate_private_key(ec.SECP384R1()), id="P-384"),
    pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="RSA-2048"),
])
def test_other_allowed_keys(key):
    check_csr(build_csr(key()), URI)


def test_subject_and_other_extensions_do_not_matter():
    pem = build_csr(subject=[x509.NameAttribute(NameOID.COMMON_NAME, "frontend")],
                    extensions=[x509.BasicConstraints(ca=False, path_length=None)])
    check_csr(pem, URI)


# -- malformed -------------------------------------------------------------------------------

@pytest.mark.parametrize("pem", [
    b"", b"hello", b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n",
    b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n",
    b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
    b"\x00\xff" * 100,
], ids=["empty", "text", "empty-pem", "not-der", "not-base64", "binary"])
def test_malformed_pem(pem):
    _rejected(pem, "malformed CSR: expected one PEM 'CERTIFICATE REQUEST'")


@pytest.mark.parametrize("change", [
    pytest.param(lambda pem: pem.replace(b"\n", b"\r\n"), id="crlf"),
    pytest.param(lambda pem: b"text before\n" + pem + b"text after\n", id="around"),
    pytest.param(lambda pem: pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"), id="new-label"),
])
def test_pem_armor_read_as_cryptography_reads_it(change):
    """mesh.identity.pem reads the armor (cheaper than cryptography's parser) and takes what it takes."""
    pem = change(build_csr())
    assert check_csr(pem, URI).public_bytes(serialization.Encoding.DER) == \
        x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("change", [
    pytest.param(lambda pem: pem.replace(b"-----END CERTIFICATE REQUEST-----", b""), id="no-end"),
    pytest.param(lambda pem: pem.replace(b"\n", b"\n*", 2), id="junk-in-base64"),
])
def test_pem_armor_refused_as_cryptography_refuses_it(change):
    pem = change(build_csr())
    with pytest.raises(ValueError):
        x509.load_pem_x509_csr(pem)
    _rejected(pem, "malformed CSR: expected one PEM 'CERTIFICATE REQUEST'")


def test_a_certificate_is_not_a_csr():
    from mesh.identity.ca import generate_root
    _, cert = generate_root("cluster.local")
    _rejected(cert.public_bytes(serialization.Encoding.PEM), "malformed CSR")


def test_truncated_pem():
    pem = build_csr()
    lines = pem.splitlines(keepends=True)
    _rejected(b"".join(lines[:3] + lines[-1:]), "malformed CSR")


def test_oversized():
    pem = build_csr()
    _rejected(pem + b"\n" * (MAX_CSR_BYTES + 1 - len(pem)), f"larger than {MAX_CSR_BYTES} bytes")


def test_bad_signature():
    """The CSR parses, but its self-signature does not match its content (a byte of the signature flipped)."""
    der = x509.load_pem_x509_csr(build_csr()).public_bytes(serialization.Encoding.DER)
    tampered = der[:-2] + bytes([der[-2] ^ 0x01]) + der[-1:]
    _rejected(_pem(tampered), "CSR signature is invalid")


def test_signature_by_another_key():
    """The CSR's public key is not the key that signed it: someone else's key, relabelled."""
    mine = x509.load_pem_x509_csr(build_csr())
    theirs = x509.load_pem_x509_csr(build_csr())
    mine_der = mine.public_bytes(serialization.Encoding.DER)
    old = mine.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    new = theirs.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert len(old) == len(new) and old in mine_der
    _rejected(_pem(mine_der.replace(old, new)), "CSR signature is invalid")


# -- key types -------------------------------------------------------------------------------

def test_rsa_1024():
    message = _rejected(build_csr(rsa.generate_private_key(65537, 1024)), "key type not allowed: RSA 1024 bits")
    assert "use ECDSA P-256" in message


@pytest.mark.parametrize("curve, name", [
    (ec.SECP521R1(), "secp521r1"), (ec.SECP256K1(), "secp256k1"), (ec.SECP224R1(), "secp224r1"),
    (ec.BrainpoolP256R1(), "brainpoolP256r1"),
])
def test_other_curves(curve, name):
    try:
        key = ec.generate_private_key(curve)
    except Exception as error:  # the local OpenSSL may not offer every curve
        pytest.skip(f"{name} unavailable here: {error}")
    _rejected(build_csr(key), f"key type not allowed: curve {name}; use ECDSA P-256")


def test_ed25519():
    _rejected(build_csr(ed25519.Ed25519PrivateKey.generate()), "key type not allowed: Ed25519PublicKey")


def test_ed448():
    _rejected(build_csr(ed448.Ed448PrivateKey.generate()), "key type not allowed: Ed448PublicKey")


# -- subjectAltName ----------------------------------------------------------------------------

def test_no_san():
    _rejected(build_csr(sans=None), f"no subjectAltName; it must ask for {URI}")


def test_san_only_in_the_subject_common_name():
    pem = build_csr(sans=None, subject=[x509.NameAttribute(NameOID.COMMON_NAME, URI)])
    _rejected(pem, "no subjectAltName")


def test_two_uri_sans():
    other = "spiffe://cluster.local/ns/shop/sa/admin"
    message = _rejected(build_csr(sans=(URI, other)), "credential proves")
    assert URI in message and other in message


def test_uri_plus_dns_san():
    _rejected(build_csr(sans=(URI, x509.DNSName("frontend.shop.svc"))), "credential proves")


def test_dns_san_only():
    message = _rejected(build_csr(sans=(x509.DNSName("frontend.shop.svc.cluster.local"),)),
                        f"asks for \\[frontend.shop.svc.cluster.local\\] but the credential proves {URI}")
    assert "CSR asks for" in message


@pytest.mark.parametrize("san", [
    x509.IPAddress(ipaddress.ip_address("10.0.0.1")), x509.RFC822Name("frontend@shop"),
])
def test_other_san_types(san):
    _rejected(build_csr(sans=(san,)), "credential proves")


@pytest.mark.parametrize("asked", [
    "spiffe://cluster.local/ns/shop/sa/admin",          # another service account
    "spiffe://cluster.local/ns/kube-system/sa/frontend",  # another namespace
    "spiffe://evil.example/ns/shop/sa/frontend",       # another trust domain
    URI + "/",                                           # not the exact string
    URI.upper(),
    "https://cluster.local/ns/shop/sa/frontend",
])
def test_san_mismatch(asked):
    message = _rejected(build_csr(sans=(asked,)), f"but the credential proves {URI}")
    assert asked in message


def test_duplicate_identical_sans_are_still_two():
    _rejected(build_csr(sans=(URI, URI)), "credential proves")
