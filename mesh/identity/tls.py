"""TLS for mesh traffic: contexts from workload credentials, and peer checks.

OpenSSL verifies the peer's chain against the trust bundle during the
handshake (both directions: the inbound side requires a client certificate).
The peer's SPIFFE id is then compared *exactly* with the identity expected
for the destination.  (service_identity's URI-ID matches only scheme and host,
not the path that carries namespace and service account, so the exact SAN
comparison is done here with ``cryptography``.)

:class:`WorkloadCredentials` is immutable; rotation builds a new one and
swaps it into a :class:`CredentialStore`.  New connections use the new
contexts, existing connections keep theirs.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

ALPN_HTTP1 = b"http/1.1"
_CIPHERS_TLS12 = b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
                 b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"


def spiffe_id_of(cert: x509.Certificate):
    """The ``spiffe://`` URI SAN of a certificate, or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri
    return None


def peer_certificate(transport):
    """The verified peer certificate of a TLS transport (cryptography), or None."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    return cert.to_cryptography() if cert is not None else None


def peer_identity(transport):
    """The peer's SPIFFE id on a TLS transport, or None (plaintext / no cert)."""
    cert = peer_certificate(transport)
    return spiffe_id_of(cert) if cert is not None else None


def _select_alpn(connection, offered):
    return ALPN_HTTP1 if ALPN_HTTP1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@dataclass(frozen=True)
class WorkloadCredentials:
    """A workload's key, certificate chain and trust bundle, with TLS contexts.

    ``key`` never leaves memory unless the operator gave it as a file.
    """

    key: object
    chain: tuple  # leaf first
    bundle: tuple
    server_context: SSL.Context = field(repr=False, compare=False, default=None)
    client_context: SSL.Context = field(repr=False, compare=False, default=None)

    @classmethod
    def build(cls, key, chain, bundle, require_client_cert=True) -> "WorkloadCredentials":
        """Credentials with ready contexts.

        ``require_client_cert=False`` makes the server side ask for, but not
        insist on, a client certificate (the control plane's port, where new
        sidecars prove themselves with a token instead).
        """
        chain, bundle = tuple(chain), tuple(bundle)
        return cls(key, chain, bundle, _context(key, chain, bundle, server=True, require=require_client_cert),
                   _context(key, chain, bundle, server=False))

    @classmethod
    def from_pem(cls, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> "WorkloadCredentials":
        key = serialization.load_pem_private_key(key_pem, password=None)
        return cls.build(key, x509.load_pem_x509_certificates(chain_pem),
                         x509.load_pem_x509_certificates(bundle_pem))

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def identity(self):
        return spiffe_id_of(self.leaf)

    def expires_in(self, now=None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.leaf.not_valid_after_utc - now).total_seconds()


def _context(key, chain, bundle, server: bool, require: bool = True) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(_CIPHERS_TLS12)
    ctx.use_certificate(chain[0])
    for cert in chain[1:]:
        ctx.add_extra_chain_cert(cert)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    for root in bundle:
        store.add_cert(crypto.X509.from_cryptography(root))
    ctx.set_verify(SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require else 0))
    if server:
        ctx.set_alpn_select_callback(_select_alpn)
        ctx.set_session_id(b"txmesh")
    else:
        ctx.set_alpn_protos([ALPN_HTTP1])
    return ctx


class CredentialStore:
    """Holds the current :class:`WorkloadCredentials`; rotation swaps them.

    ``listeners`` are called with the new credentials after each swap.
    """

    def __init__(self, credentials=None):
        self.current = credentials
        self.listeners = []

    def swap(self, credentials) -> None:
        self.current = credentials
        for listener in list(self.listeners):
            listener(credentials)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server-side connections with the store's current credentials."""

    def __init__(self, store: CredentialStore):
        self.store = store

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.store.current.server_context, None)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """Client-side connections with the store's current credentials."""

    def __init__(self, store: CredentialStore):
        self.store = store

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self.store.current.client_context, None)
        connection.set_connect_state()
        return connection
