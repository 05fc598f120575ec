"""Certificates AWS Private CA returns, sorted out: the root workloads trust, the chain they send, and
the check that an issued certificate is the one asked for.  Pure functions on PEM bytes.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


class IssuedCertificateRejected(Exception):
    """The certificate AWS issued is not the one the CSR asked for (its message says how)."""


def pem(certificates) -> bytes:
    """The PEM bytes of ``certificates``, in order."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certificates)


def load(pem_text: str | bytes | None) -> list:
    """The certificates of a PEM text (none for an empty or missing one)."""
    if not pem_text:
        return []
    data = pem_text.encode() if isinstance(pem_text, str) else pem_text
    return x509.load_pem_x509_certificates(data)


def is_root(cert) -> bool:
    """Whether ``cert`` is self-signed (a root: its own issuer, and its signature verifies with its own key)."""
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):  # TypeError: a key type it cannot verify with
        return False
    return True


def roots_of(ca_certificate: str, ca_chain: str | None) -> bytes:
    """The root of a CA, from GetCertificateAuthorityCertificate's ``Certificate`` and ``CertificateChain``.

    A root CA's own certificate is its root; a subordinate CA's chain ends with one.

    :raises ValueError: when neither holds a self-signed certificate.
    """
    roots = [cert for cert in load(ca_certificate) + load(ca_chain) if is_root(cert)]
    if not roots:
        raise ValueError("its certificate chain holds no root (self-signed) certificate: import the full chain "
                         "up to the root with ImportCertificateAuthorityCertificate")
    return pem(roots)


def chain_without_roots(chain_pem: str | None) -> bytes:
    """GetCertificate's ``CertificateChain`` without its root: the intermediates a workload sends."""
    return pem(cert for cert in load(chain_pem) if not is_root(cert))


def check_issued(cert_pem: str, identity: str, csr) -> bytes:
    """The PEM of an issued certificate once checked against the request: exactly the URI SAN ``identity``
    and the CSR's public key.

    :raises IssuedCertificateRejected: saying what differs (e.g. a template that drops the SAN).
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except ValueError as error:
        raise IssuedCertificateRejected(f"AWS returned no PEM certificate ({error})") from None
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    uris = [name.value for name in names if isinstance(name, x509.UniformResourceIdentifier)]
    if len(names) != 1 or uris != [identity]:
        asked = ", ".join(str(getattr(name, "value", name)) for name in names) or "none"
        raise IssuedCertificateRejected(f"the issued certificate names [{asked}], not only {identity}: use an "
                                        "end-entity template that keeps the SPIFFE URI SAN")
    if cert.public_key() != csr.public_key():
        raise IssuedCertificateRejected("the issued certificate is not for the CSR's key")
    return cert.public_bytes(serialization.Encoding.PEM)
