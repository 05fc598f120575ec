"""Pure parts of mesh.identity.tls: which certificates of a chain a peer is sent, and when a verified chain
is valid."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto

from mesh.identity.tls import presented_chain, validity

NOW = datetime.datetime.now(datetime.timezone.utc)


def certificate(subject: str, issuer=None, *, ca: bool = False):
    """``(key, cert)`` named ``subject``, signed by ``issuer`` = ``(key, cert)`` (None: self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1)).not_valid_after(NOW + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return key, cert


@pytest.fixture(scope="module")
def pki():
    root = certificate("root", ca=True)
    intermediate = certificate("intermediate", root, ca=True)
    return {"root": root, "intermediate": intermediate, "leaf": certificate("leaf", intermediate),
            "direct-leaf": certificate("direct leaf", root)}


def names(chain) -> list:
    return [cert.subject.rfc4514_string() for cert in chain]


def test_the_root_is_dropped_and_intermediates_kept(pki):
    chain = [pki[name][1] for name in ("leaf", "intermediate", "root")]
    assert names(presented_chain(chain)) == ["CN=leaf", "CN=intermediate"]


def test_a_leaf_of_the_root_is_sent_alone(pki):
    assert names(presented_chain([pki["direct-leaf"][1], pki["root"][1]])) == ["CN=direct leaf"]
    assert names(presented_chain([pki["direct-leaf"][1]])) == ["CN=direct leaf"]


def test_a_self_issued_certificate_of_another_key_is_kept(pki):
    """Same subject and issuer but signed by another key (a key rollover's link): not a root, so sent."""
    root_key, root = pki["root"]
    other_key = ec.generate_private_key(ec.SECP256R1())
    link = (x509.CertificateBuilder().subject_name(root.subject).issuer_name(root.subject)
            .public_key(other_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    assert presented_chain([pki["leaf"][1], link]) == [pki["leaf"][1], link]


@pytest.mark.parametrize("after_not_after", [-1.0, -0.2, 0.0, 0.5, 0.99, 1.0, 1.7])
def test_a_chain_is_valid_as_long_as_openssl_verifies_it(pki, after_not_after):
    """The window :class:`~mesh.identity.tls.ClientChains` checks every inbound connection against must end
    when OpenSSL stops verifying the chain: notAfter is inclusive, to the second.  It once ended at the
    notAfter itself, so for a certificate's last second the server sidecar aborted connections whose
    chain OpenSSL had just verified, and the client got 503s (seen while a root rotation's restarts of
    the control plane held back a renewal)."""
    _, root = pki["root"]
    _, leaf = pki["direct-leaf"]
    chain = [crypto.X509.from_cryptography(cert) for cert in (leaf, root)]
    when = leaf.not_valid_after_utc.timestamp() + after_not_after
    store = crypto.X509Store()
    store.add_cert(chain[1])
    store.set_time(datetime.datetime.fromtimestamp(when, datetime.timezone.utc))
    try:
        crypto.X509StoreContext(store, chain[0]).verify_certificate()
        verified = True
    except crypto.X509StoreContextError:
        verified = False
    start, until = validity(chain)
    assert (start <= when < until) == verified
    assert verified == (after_not_after < 1.0)  # the case is the one meant: OpenSSL's own verdict
