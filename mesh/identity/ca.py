"""The mesh certificate authority: a root (or intermediate) that signs workloads.

On first start the control plane generates a self-signed ECDSA P-256 root valid
for ten years in its state directory: ``ca-key.pem`` (mode 0600) and
``ca-cert.pem``.  Operators may instead provide a root, or an intermediate plus
its chain up to a root (``--ca-cert/--ca-key/--ca-chain``).

``root-cert.pem`` is the trust bundle that sidecars are given: the root of the
signing chain plus every root in ``extra-roots.pem``, so that a root can be
rotated by adding the new one first.

Workload certificates carry exactly one URI SAN, the SPIFFE id, key usage for
digital signature and key encipherment, and EKU for both TLS server and client.
Serving certificates (:meth:`CertificateAuthority.sign_serving`, for the
injection webhook) carry DNS SANs instead, and EKU for TLS server only.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity.files import write_private, write_public

CA_KEY = "ca-key.pem"
CA_CERT = "ca-cert.pem"
CA_CHAIN = "cert-chain.pem"
TRUST_BUNDLE = "root-cert.pem"
EXTRA_ROOTS = "extra-roots.pem"

ROOT_LIFETIME = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=5)


class CAError(Exception):
    """The CA's key material is missing, unreadable or inconsistent."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def pem_certs(data: bytes) -> list:
    """Every certificate in a PEM blob (in order)."""
    return x509.load_pem_x509_certificates(data) if data.strip() else []


def to_pem(certs) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def generate_root(trust_domain: str):
    """A new self-signed ECDSA P-256 root: ``(key, cert)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"txmesh root CA {trust_domain}")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass
class CertificateAuthority:
    """Signing key and certificate, the chain above it, and the trust bundle.

    ``chain`` lists the certificates from the signing cert (excluded) up to the
    root (included) -- empty when the signing cert is itself the root.

    What every certificate it issues shares (subject, issuer, the fixed
    extensions, the chain's PEM) is built once, here, not per signature: the
    control plane signs thousands of CSRs a second when many sidecars start.
    """

    key: object
    cert: x509.Certificate
    chain: list
    bundle: list
    trust_domain: str
    _templates: dict = field(init=False, repr=False, compare=False)
    _chain_pem: bytes = field(init=False, repr=False, compare=False)
    _bundle_pem: bytes = field(init=False, repr=False, compare=False)
    _authority_key_id: x509.AuthorityKeyIdentifier = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._chain_pem = to_pem([self.cert] + self.chain)
        self._bundle_pem = to_pem(self.bundle)
        self._authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        self._templates = {}  # extended key usages -> builder

    @classmethod
    def load_or_create(cls, state_dir: str, trust_domain: str, ca_cert=None, ca_key=None, ca_chain=None,
                       write_bundle: bool = True):
        """Open the CA of ``state_dir``, creating a root on first start.

        With ``ca_cert``/``ca_key`` (and ``ca_chain`` for an intermediate),
        those files are used instead and nothing is generated.  With
        ``write_bundle`` its trust bundle is written to ``STATE/root-cert.pem``
        (mesh-control writes the bundle of the CA ``--ca`` selected itself).
        """
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        if not (ca_cert or ca_key) and not os.path.exists(os.path.join(state_dir, CA_KEY)):
            key, cert = generate_root(trust_domain)
            write_private(os.path.join(state_dir, CA_KEY), key.private_bytes(serialization.Encoding.PEM,
                                                                             serialization.PrivateFormat.PKCS8,
                                                                             serialization.NoEncryption()))
            write_public(os.path.join(state_dir, CA_CERT), to_pem([cert]))
        ca = cls.load(state_dir, trust_domain, ca_cert, ca_key, ca_chain)
        if write_bundle:
            write_public(os.path.join(state_dir, TRUST_BUNDLE), ca.bundle_pem())
        if ca.chain:
            write_public(os.path.join(state_dir, CA_CHAIN), ca.chain_pem())
        return ca

    @classmethod
    def load(cls, state_dir: str, trust_domain: str, ca_cert=None, ca_key=None, ca_chain=None):
        """Open the CA :meth:`load_or_create` made or was given, creating and writing nothing.

        The CA workers (:mod:`mesh.identity.ca_workers`) read it so, from the same files and with the
        same checks (the key's mode 0600, the key matching the certificate).
        """
        if ca_cert or ca_key:
            if not (ca_cert and ca_key):
                raise CAError("--ca-cert and --ca-key go together; give both or neither")
            key_path, cert_path = ca_key, ca_cert
            chain = pem_certs(_read(ca_chain)) if ca_chain else []
        else:
            key_path, cert_path = os.path.join(state_dir, CA_KEY), os.path.join(state_dir, CA_CERT)
            chain = []
        key, cert = _read_key(key_path), _read_cert(cert_path)
        _check_private_mode(key_path)
        if key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise CAError("the CA key does not belong to the CA certificate")
        root = chain[-1] if chain else cert
        extra = pem_certs(_read(os.path.join(state_dir, EXTRA_ROOTS)))
        bundle = [root] + [c for c in extra if c != root]
        return cls(key=key, cert=cert, chain=chain, bundle=bundle, trust_domain=trust_domain)

    def bundle_pem(self) -> bytes:
        """The trust bundle, PEM."""
        return self._bundle_pem

    def chain_pem(self) -> bytes:
        """The signing certificate and the chain above it, PEM: what every issued certificate comes with."""
        return self._chain_pem

    def expires_in(self) -> float:
        """Seconds until the signing certificate expires."""
        return (self.cert.not_valid_after_utc - _now()).total_seconds()

    def sign(self, csr: x509.CertificateSigningRequest, spiffe_uri: str, ttl: float) -> tuple:
        """Issue a workload certificate; returns ``(cert_pem, chain_pem)``.

        ``chain_pem`` is the signing certificate and everything above it, so a
        peer can build the path to a root of the bundle.
        """
        return self._issue(csr.public_key(), [x509.UniformResourceIdentifier(spiffe_uri)], ttl,
                           [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])

    def sign_serving(self, public_key, dns_names, ttl: float) -> tuple:
        """Issue a TLS server certificate for ``dns_names`` (no SPIFFE id); returns ``(cert_pem, chain_pem)``.

        For the control plane's HTTPS endpoints that Kubernetes calls by
        Service name, such as the injection webhook
        (``mesh-control.mesh-system.svc``); clients trust the mesh root.
        """
        return self._issue(public_key, [x509.DNSName(name) for name in dns_names], ttl,
                           [ExtendedKeyUsageOID.SERVER_AUTH])

    def _issue(self, public_key, names: list, ttl: float, usages: list) -> tuple:
        now = _now()
        not_after = min(now + datetime.timedelta(seconds=ttl), self.cert.not_valid_after_utc)
        cert = (
            self._template(tuple(usages))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(self._authority_key_id, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), self._chain_pem

    def _template(self, usages: tuple) -> x509.CertificateBuilder:
        """The builder every certificate with extended key ``usages`` starts from (builders are immutable)."""
        template = self._templates.get(usages)
        if template is None:
            template = self._templates[usages] = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain)]))
                .issuer_name(self.cert.subject)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            )
        return template


def _read(path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return b""


def _read_cert(path) -> x509.Certificate:
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as error:
        raise CAError(f"{path}: not a PEM certificate ({error})") from None


def _read_key(path):
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise CAError(f"{path}: not an unencrypted PEM private key ({type(error).__name__})") from None


def _check_private_mode(path: str) -> None:
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise CAError(f"{path} has mode {mode:o}; a CA key must be 0600 (chmod 600 {path})")
