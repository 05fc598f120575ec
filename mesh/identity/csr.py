"""Checking certificate signing requests before they reach a signer."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh.identity.pem import pem_der

MAX_CSR_BYTES = 16 * 1024
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048
_CSR_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")  # the labels cryptography's PEM loader takes


class CSRRejected(Exception):
    """The CSR is malformed or asks for something the caller may not have."""


def load_csr(data: bytes, der: bool = False) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR (its DER with ``der``) of at most :data:`MAX_CSR_BYTES`, checking nothing else
    (:func:`check_csr` does).

    With ``--ca-workers`` and the built-in CA, the control plane only parses and sends the DER; the CA
    worker that signs checks it first (:meth:`mesh.identity.ca_workers.CAWorkers.sign`).
    """
    if len(data) > MAX_CSR_BYTES:
        raise CSRRejected(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        return x509.load_der_x509_csr(data if der else pem_der(data, _CSR_LABELS))
    except ValueError:
        raise CSRRejected("malformed CSR: expected one DER CSR" if der else
                          "malformed CSR: expected one PEM 'CERTIFICATE REQUEST'") from None


def check_csr(pem: bytes, expected_uri: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check it asks for exactly ``expected_uri``.

    Rejects: oversized or unparsable input, a bad self-signature, keys other
    than ECDSA P-256/P-384 or RSA >= 2048 bits, and any SAN set other than the
    single URI the credential proved.
    """
    return check_loaded_csr(load_csr(pem), expected_uri)


def check_loaded_csr(csr: x509.CertificateSigningRequest, expected_uri: str) -> x509.CertificateSigningRequest:
    """The checks of :func:`check_csr` on a CSR already parsed: ``csr`` itself, or CSRRejected."""
    if not csr.is_signature_valid:
        raise CSRRejected("CSR signature is invalid")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise CSRRejected(f"key type not allowed: curve {key.curve.name}; use ECDSA P-256")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CSRRejected(f"key type not allowed: RSA {key.key_size} bits; use ECDSA P-256 or RSA >= 2048")
    else:
        raise CSRRejected(f"key type not allowed: {type(key).__name__}; use ECDSA P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CSRRejected(f"CSR has no subjectAltName; it must ask for {expected_uri}") from None
    except ValueError:
        raise CSRRejected("CSR extensions are malformed") from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or uris != [expected_uri]:
        asked = ", ".join(str(getattr(name, "value", name)) for name in names)
        raise CSRRejected(f"CSR asks for [{asked}] but the credential proves {expected_uri}")
    return csr
