"""The CA worker's side of mesh.identity.ca_workers: its framing, and its answers with a real CA.

The control plane's side (processes, a worker that dies, /ready) is tested with real processes in
tests/integration/test_ca_workers.py.
"""

from __future__ import annotations

import datetime
import io
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh.identity.agent import make_csr
from mesh.identity.ca import CertificateAuthority
from mesh.identity.ca_workers import answer, decode_fields, encode_fields, serve, worker_argv
from tests.unit.test_identity_ca import _now, _write

TD = "cluster.local"
URI = "spiffe://cluster.local/ns/shop/sa/frontend"
ID = struct.pack(">I", 7)


def _der(csr_pem: bytes) -> bytes:
    """What the control plane sends a worker to sign: the CSR's DER."""
    return x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    CertificateAuthority.load_or_create(str(state), TD)
    return CertificateAuthority.load(str(state), TD)


def test_fields_round_trip_whatever_their_bytes():
    fields = [b"", b"\0\0\x01", b"PEM\n" * 100]
    assert decode_fields(encode_fields(*fields)) == fields


def test_check_passes_a_good_csr_and_rejects_with_check_csrs_words(ca):
    good = make_csr(ec.generate_private_key(ec.SECP256R1()), URI)
    assert answer(ca, b"c" + ID + encode_fields(good, URI.encode())) == ID + b"+"
    other = answer(ca, b"c" + ID + encode_fields(good, b"spiffe://cluster.local/ns/shop/sa/other"))
    assert other == ID + b"-" + f"CSR asks for [{URI}] but the credential proves " \
                                 "spiffe://cluster.local/ns/shop/sa/other".encode()


def test_sign_issues_the_certificate_for_the_csrs_key(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    reply = answer(ca, b"s" + ID + encode_fields(_der(make_csr(key, URI)), URI.encode(), b"600.0"))
    assert reply[:5] == ID + b"+"
    cert = x509.load_pem_x509_certificate(decode_fields(reply[5:])[0])
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert 590 < (cert.not_valid_after_utc - _now()).total_seconds() <= 600
    cert.verify_directly_issued_by(ca.cert)


def test_sign_checks_the_csr_first(ca):
    """With the built-in CA selected the control plane only parses the CSR and sends its DER: the worker's
    sign checks it (its signature too)."""
    csr = _der(make_csr(ec.generate_private_key(ec.SECP256R1()), URI))
    reply = answer(ca, b"s" + ID + encode_fields(csr, b"spiffe://cluster.local/ns/shop/sa/other", b"600.0"))
    assert reply.startswith(ID + b"-CSR asks for [")
    tampered = csr[:-2] + bytes([csr[-2] ^ 1, csr[-1] ^ 1])  # the end of the signature's S
    assert answer(ca, b"s" + ID + encode_fields(tampered, URI.encode(), b"600.0"))[:5] == ID + b"-"
    junk = answer(ca, b"s" + ID + encode_fields(b"junk", URI.encode(), b"600.0"))
    assert junk == ID + b"-malformed CSR: expected one DER CSR"


def test_a_bug_is_an_error_answer_not_a_dead_worker(ca, capsys):
    assert answer(ca, b"?" + ID).startswith(ID + b"!ValueError: unknown request")
    assert "Traceback" in capsys.readouterr().err


def test_serve_answers_every_frame_then_ends_with_its_input(ca):
    requests = b"".join(struct.pack(">I", len(payload)) + payload for payload in
                        [b"c" + struct.pack(">I", n) + encode_fields(b"junk", URI.encode()) for n in (1, 2)])
    out = io.BytesIO()
    serve(io.BytesIO(requests), out, ca)
    data, replies = out.getvalue(), []
    while data:
        (length,) = struct.unpack_from(">I", data)
        replies.append(data[4:4 + length])
        data = data[4 + length:]
    assert [reply[:5] for reply in replies] == [struct.pack(">I", 1) + b"-", struct.pack(">I", 2) + b"-"]


def test_a_worker_loads_an_existing_rsa_root_and_writes_nothing(tmp_path):
    """State dirs made by other tools (or an operator's RSA root) keep working in the workers."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "rsa root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(_now()).not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    _write(tmp_path / "ca-key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()), 0o600)
    _write(tmp_path / "ca-cert.pem", cert.public_bytes(serialization.Encoding.PEM))
    before = sorted(path.name for path in tmp_path.iterdir())
    ca = CertificateAuthority.load(str(tmp_path), TD)
    reply = answer(ca, b"s" + ID + encode_fields(_der(make_csr(ec.generate_private_key(ec.SECP256R1()), URI)),
                                                 URI.encode(), b"60"))
    x509.load_pem_x509_certificate(decode_fields(reply[5:])[0]).verify_directly_issued_by(cert)
    assert sorted(path.name for path in tmp_path.iterdir()) == before


def test_worker_argv_names_files_never_key_material(tmp_path):
    argv = worker_argv("state", TD, ca_cert="c.pem", ca_key="k.pem")
    assert argv[1:3] == ["-m", "mesh.identity.ca_workers"]
    assert argv[argv.index("--ca-key") + 1] == str(Path("k.pem").resolve())
    assert "--ca-chain" not in argv
