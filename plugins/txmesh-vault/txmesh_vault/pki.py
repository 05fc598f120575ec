"""Pure functions over what Vault's PKI secrets engine answers: roots, chains, issued certificates, roles.

Nothing here talks to Vault; :mod:`txmesh_vault.vault` does, and hands the answers to these functions.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID


class IssuedCertificateRejected(Exception):
    """Vault issued a certificate the mesh cannot use (the message says which role setting to change)."""


def pem(certs: Iterable[x509.Certificate]) -> bytes:
    """The certificates as one PEM blob, in order."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def load_pems(texts: Iterable[str]) -> list[x509.Certificate]:
    """Every certificate in the PEM strings (each may hold several)."""
    return [cert for text in texts if text and text.strip() for cert in x509.load_pem_x509_certificates(text.encode())]


def is_self_signed(cert: x509.Certificate) -> bool:
    """Whether ``cert`` is a root: issued by its own subject, and its signature checks with its own key."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):  # another name, an unsupported key, a bad signature
        return False
    return True


def roots_of_issuers(issuers: Mapping[str, Mapping]) -> tuple[list[x509.Certificate], list[str]]:
    """The roots the mount's issuers lead to, and a problem for each issuer that leads to none.

    :param issuers: issuer id -> ``GET MOUNT/issuer/ID/json``'s data (``certificate``, ``ca_chain``,
        ``issuer_name``).  A root issuer is its own root; an intermediate's root is the self-signed
        certificate at the top of its ``ca_chain`` (present when the operator imported the chain).
    :return: ``(roots, problems)``: the distinct roots, oldest first (by notBefore, then serial), so that
        the trust bundle is stable while nothing changes; during a rotation it holds old and new roots.
    """
    roots: dict[bytes, x509.Certificate] = {}
    problems = []
    for issuer_id, data in sorted(issuers.items()):
        chain = load_pems([data.get("certificate") or "", *(data.get("ca_chain") or ())])
        found = [cert for cert in chain if is_self_signed(cert)]
        if not found:
            name = data.get("issuer_name") or issuer_id
            problems.append(f"issuer {name} has no root certificate in its chain: import the chain up to the "
                            "root with the issuer (MOUNT/intermediate/set-signed or MOUNT/issuers/import/bundle)")
        for cert in found:
            roots[cert.public_bytes(serialization.Encoding.DER)] = cert
    ordered = sorted(roots.values(), key=lambda cert: (cert.not_valid_before_utc, cert.serial_number))
    return ordered, problems


@functools.lru_cache(maxsize=32)
def chain_without_roots(ca_chain: tuple[str, ...], issuing_ca: str = "") -> bytes:
    """The chain above a workload certificate, up to (not including) the root, as PEM.

    Vault's ``ca_chain`` holds the issuing CA and its parents, root included; a root-issued certificate
    has an empty chain (the root is in every sidecar's trust bundle).  Cached: every certificate of an
    issuer comes with the same chain, and checking which one is a root costs a signature check.
    """
    chain = load_pems(ca_chain) or load_pems([issuing_ca])
    return pem(cert for cert in chain if not is_self_signed(cert))


def check_issued(cert_pem: str, identity: str) -> x509.Certificate:
    """The certificate Vault issued, if the mesh can use it: its only name is ``identity`` (a URI SAN),
    and it may serve and authenticate as a TLS client and server.

    :raises IssuedCertificateRejected: saying which role setting adds what.
    """
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    if [getattr(name, "value", name) for name in names] != [identity] or \
            not isinstance(names[0], x509.UniformResourceIdentifier):
        shown = ", ".join(str(getattr(name, "value", name)) for name in names) or "none"
        raise IssuedCertificateRejected(
            f"vault issued a certificate for {identity} whose names are [{shown}]: the role must add no other "
            "name (set allowed_domains=[], allow_ip_sans=false, and sign CSRs with no common name)")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return cert  # no EKU: any usage
    wanted = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    if not wanted <= set(usages):
        raise IssuedCertificateRejected(
            f"vault issued a certificate for {identity} that is not for both TLS server and client "
            "authentication: set the role's server_flag=true and client_flag=true")
    return cert


def role_problems(role: Mapping, trust_domain: str, verbatim: bool) -> list[str]:
    """What in a PKI role (``GET MOUNT/roles/ROLE``'s data) keeps it from signing mesh workloads.

    ``pki/sign`` needs CSRs without a common name and URI SANs in the trust domain; both endpoints need
    certificates for TLS server and client.  (``pki/sign-verbatim`` ignores the name settings.)
    """
    problems = []
    if not (role.get("server_flag", True) and role.get("client_flag", True)):
        problems.append("set server_flag=true and client_flag=true (sidecars are TLS servers and clients)")
    if verbatim:
        return problems
    if role.get("require_cn", True):
        problems.append("set require_cn=false (workload CSRs carry no common name, only the SPIFFE id)")
    sample = f"spiffe://{trust_domain}/ns/default/sa/default"
    patterns = role.get("allowed_uri_sans") or []
    if not role.get("allowed_uri_sans_template") and not any(fnmatchcase(sample, pattern) for pattern in patterns):
        problems.append(f"set allowed_uri_sans=spiffe://{trust_domain}/* (it allows "
                        f"{', '.join(patterns) or 'no URI SAN'})")
    return problems
