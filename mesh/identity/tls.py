"""TLS for mesh traffic: contexts from workload credentials, peer checks, session resumption.

OpenSSL verifies the peer's chain against the trust bundle during the
handshake (both directions: the inbound side requires a client certificate).
The peer's SPIFFE id is then compared *exactly* with the identity expected
for the destination.  (service_identity's URI-ID matches only scheme and host,
not the path that carries namespace and service account, so the exact SAN
comparison is done here with ``cryptography``.)

Every context (:func:`make_context`) offers what Envoy offers by default:
TLS 1.2 and 1.3, AEAD suites only (TLS 1.3 in Envoy's order, AES-128-GCM
first), the key exchange groups X25519, P-256 and P-384 and nothing else, and
as its certificate chain the leaf and its intermediates, never a self-signed
root (the peer has the roots; a root sent along is ignored by the peer, and
letting OpenSSL build the chain costs a chain verification per handshake).

:class:`WorkloadCredentials` is immutable; rotation builds a new one and
swaps it into a :class:`CredentialStore`.  New connections use the new
contexts, existing connections keep theirs.

Resumption between sidecars (TLS 1.3 tickets), and what binds a resumed
session to its peer: a resumed handshake carries no certificate, so OpenSSL
verifies nothing; the session carries the certificate verified when it was
made.  The verdict of a chain verification against a fixed trust bundle only
changes with time, so each side keeps the window in which the chain it
verified is valid (from the latest notBefore through the second of the earliest
notAfter, as OpenSSL has it: :func:`validity`) and checks it again for every
connection, resumed or not:

- Server side: tickets are encrypted with keys of the SSL context of the
  current credentials (certificate and bundle), and every rotation builds new
  contexts, so a ticket resumes only against the bundle that verified the
  client's chain.  :class:`ClientChains` (one per server context) keeps the
  window per client certificate; :func:`mesh.proxy.mtls.inbound_peer` refuses
  a connection outside it.  The caller's identity is read from the session's
  certificate for every connection (:func:`peer_certificate_facts`).
- Client side: :class:`SessionCache` (one per credentials, so rotation empties
  it) keeps a session per peer *and* expected SPIFFE id, only from a
  connection that passed both checks, each used once (RFC 8446 C.4, as
  Envoy), and offers it only inside the window of the peer's chain and of our
  own certificate.  After the handshake the peer's SPIFFE id is compared with
  the expected one exactly as after a full one.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import time
import weakref
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _openssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from zope.interface import implementer

ALPN_HTTP1 = b"http/1.1"
#: Key exchange groups, offered (client) and accepted (server): Envoy's defaults.
GROUPS = b"X25519:P-256:P-384"
_CIPHERS_TLS13 = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
_CIPHERS_TLS12 = b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
                 b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
#: SSL_MODE_NO_AUTO_CHAIN (pyOpenSSL has no name for it): send the chain given, never one built from the bundle.
_MODE_NO_AUTO_CHAIN = 0x8
#: Seconds a server-issued session ticket can be resumed (also the lifetime hint sent with it).
SESSION_LIFETIME = 7200
#: Client sessions kept per peer, and peers remembered, per credentials (see :class:`SessionCache`).
SESSIONS_PER_PEER = 4
MAX_PEERS = 1024
#: Distinct peer certificates whose facts (and, per server context, chain windows) are remembered.
_MAX_KNOWN_CERTIFICATES = 1024


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


@dataclass(frozen=True)
class PeerCertificate:
    """What the mesh reads from a peer's (verified) leaf certificate."""

    identity: str | None  # the SPIFFE id, or None
    sha256: str  # of the DER, hex (x-forwarded-client-cert ``Hash=``)


_known_certificates: dict = {}


def peer_certificate_facts(transport) -> PeerCertificate | None:
    """The :class:`PeerCertificate` of a TLS transport's peer, or None (plaintext / no certificate).

    On a resumed session the certificate is the one verified when the session
    was made.  Facts are remembered per DER encoding: a sidecar presents the
    same certificate on every connection until it rotates, so it is parsed once.
    """
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    facts = _known_certificates.get(der)
    if facts is None:
        if len(_known_certificates) >= _MAX_KNOWN_CERTIFICATES:
            _known_certificates.clear()
        facts = _known_certificates[der] = PeerCertificate(
            spiffe_id_of(x509.load_der_x509_certificate(der)), hashlib.sha256(der).hexdigest())
    return facts


def peer_identity(transport):
    """The peer's SPIFFE id on a TLS transport, or None (plaintext / no cert)."""
    facts = peer_certificate_facts(transport)
    return facts.identity if facts is not None else None


def _select_alpn(connection, offered):
    """The first protocol of the connection's preference (:class:`ServerTLS` ``alpn``; by default
    ``http/1.1`` only) that the client offered."""
    for protocol in getattr(connection, "alpn", _HTTP1_ONLY):
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


_HTTP1_ONLY = (ALPN_HTTP1,)


class _ChoosingConnection(SSL.Connection):
    """A server connection that selects ALPN by its own ``alpn`` preference (see :class:`ServerTLS`)."""

    def __init__(self, context, alpn):
        super().__init__(context, None)
        self.alpn = alpn


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False  # self-issued with another key: an intermediate of a key rollover
    return True


def presented_chain(chain) -> list:
    """The certificates to send for ``chain`` (leaf first): the leaf and its intermediates, no self-signed root."""
    return [chain[0], *(cert for cert in chain[1:] if not _self_signed(cert))]


def _seconds(asn1_time: bytes) -> float:
    stamp = datetime.datetime.strptime(asn1_time.decode(), "%Y%m%d%H%M%SZ")
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp()


def validity(chain) -> tuple:
    """``(from, until)`` in POSIX seconds: every certificate of ``chain`` (pyOpenSSL) is valid at
    ``from <= now < until``.

    As OpenSSL verifies it: a notAfter is inclusive (RFC 5280) and has one-second resolution, so a
    certificate is still valid during the second its notAfter names, and ``until`` is one second
    later.  A window that closed at the notAfter itself refused, for that last second, connections
    whose chain OpenSSL had just verified in a full handshake.
    """
    return (max(_seconds(cert.get_notBefore()) for cert in chain),
            min(_seconds(cert.get_notAfter()) for cert in chain) + 1)


class ClientChains:
    """When each client's verified chain is valid, for one server context (its trust bundle).

    A full handshake's chain is the one OpenSSL has just verified.  A resumed
    one has none: the client certificate of its session is verified again
    here against the same bundle with our own intermediates (those of the one
    mesh CA), unless its window is remembered from the handshake that made the
    session.
    """

    def __init__(self, store: crypto.X509Store, intermediates):
        self._store = store
        self._intermediates = [crypto.X509.from_cryptography(cert) for cert in intermediates]
        self._windows: dict = {}

    def valid(self, connection: SSL.Connection, key: str, now: float) -> bool:
        """Whether the chain of ``connection``'s client (``key``: its certificate's digest) is valid at ``now``."""
        window = self._windows.get(key)
        if window is None:
            chain = connection.get_verified_chain()
            if chain is None:
                try:
                    chain = crypto.X509StoreContext(self._store, connection.get_peer_certificate(),
                                                    self._intermediates).get_verified_chain()
                except crypto.X509StoreContextError:
                    return False
            if len(self._windows) >= _MAX_KNOWN_CERTIFICATES:
                self._windows.clear()
            window = self._windows[key] = validity(chain)
        return window[0] <= now < window[1]


def _offer_groups(context: SSL.Context) -> None:
    """Restrict key exchange to :data:`GROUPS`.

    pyOpenSSL can set one curve (``set_tmp_ecdh``) but not a list, so this calls
    OpenSSL's ``SSL_CTX_set1_groups_list`` (bound as ``SSL_CTX_set1_curves_list``)
    through the binding pyOpenSSL itself uses.
    """
    if _openssl.SSL_CTX_set1_curves_list(context._context, GROUPS) != 1:
        raise SSL.Error(f"this OpenSSL does not support the key exchange groups {GROUPS.decode()}")


def make_context(bundle, key=None, chain=(), *, server: bool, require_client_cert: bool = True,
                 resumption: bool = True, verify_callback=None, alpn=(ALPN_HTTP1,)) -> SSL.Context:
    """An OpenSSL context with the mesh's TLS settings (see the module docstring).

    :param bundle: trusted roots (cryptography certificates).
    :param key: private key presented with ``chain`` (leaf first); None: no certificate.
    :param server: a server context (ALPN selection, client certificate request) or a client one.
    :param require_client_cert: (server) refuse clients without a certificate;
        False asks for one but does not insist (the control plane's port, where new
        sidecars prove themselves with a token).
    :param resumption: (server) issue session tickets (stateless: no server-side
        session store); False issues none that can be resumed.
    :param verify_callback: pyOpenSSL verify callback, run after OpenSSL's own checks.
    :param alpn: (client) the ALPN protocols offered by default (empty: none).
    """
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(_CIPHERS_TLS12)
    ctx.set_tls13_ciphersuites(_CIPHERS_TLS13.encode())
    _offer_groups(ctx)
    ctx.set_mode(_MODE_NO_AUTO_CHAIN)
    sent = presented_chain(chain) if key is not None else []
    if key is not None:
        ctx.use_certificate(sent[0])
        for cert in sent[1:]:
            ctx.add_extra_chain_cert(cert)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    store = ctx.get_cert_store()
    for root in bundle:
        store.add_cert(crypto.X509.from_cryptography(root))
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server and require_client_cert else 0)
    ctx.set_verify(mode, verify_callback)
    if server:
        ctx.set_app_data(ClientChains(store, sent[1:]))
        ctx.set_alpn_select_callback(_select_alpn)
        if resumption:
            ctx.set_session_id(b"txmesh")
            ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER | SSL.SESS_CACHE_NO_INTERNAL_STORE)
            ctx.set_timeout(SESSION_LIFETIME)
        else:
            ctx.set_options(SSL.OP_NO_TICKET)
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    elif alpn:
        ctx.set_alpn_protos(list(alpn))
    return ctx


def origination_context(ca_pem=None, key_pem=None, chain_pem=None, *, verify=True, verify_callback=None) -> SSL.Context:
    """A client context for TLS originated to a server outside the mesh (:mod:`mesh.proxy.tls_origination`).

    The mesh's TLS settings (:func:`make_context`), offering no ALPN by default (as Istio programs
    Envoy for origination), with the server's chain verified against
    ``ca_pem`` (PEM roots) or, when None, the system's CA bundle; ``verify`` False checks
    nothing.  ``key_pem`` and ``chain_pem`` (leaf first) are the client certificate presented,
    if any.  Raises ValueError or ``SSL.Error`` when the PEM data is not usable.
    """
    bundle = x509.load_pem_x509_certificates(ca_pem) if ca_pem else ()
    key = serialization.load_pem_private_key(key_pem, password=None) if key_pem else None
    chain = x509.load_pem_x509_certificates(chain_pem) if chain_pem else ()
    ctx = make_context(bundle, key, chain, server=False, verify_callback=verify_callback, alpn=())
    if not verify:
        ctx.set_verify(SSL.VERIFY_NONE)
    elif not ca_pem:
        ctx.set_default_verify_paths()
    return ctx


class SessionCache:
    """Client-side TLS sessions for resumption, per peer, made with one client context: a
    :class:`WorkloadCredentials`' (mesh mTLS), or one TLS origination setting's
    (:class:`mesh.proxy.tls_origination.OriginationTLS`, whose peers have no SPIFFE id).

    A *peer* is ``(host, port, expected SPIFFE id)``.  :meth:`keep` is called
    only for a connection whose peer passed the chain check (OpenSSL) and the
    identity check (the caller); the session is kept with the time until which
    it may be offered: the earliest expiry of the peer's verified chain (for a
    resumed connection, that of the session it was offered) and of our own
    certificate.  :meth:`offer` hands a session out once.  At most :data:`SESSIONS_PER_PEER`
    sessions per peer and :data:`MAX_PEERS` peers are kept.
    """

    def __init__(self, own_not_after: float):
        self._own_not_after = own_not_after
        self._peers: dict = {}
        self._offered = weakref.WeakKeyDictionary()  # connection -> window of the session it was offered

    def offer(self, peer, connection: SSL.Connection, now: float) -> None:
        """Set a session kept for ``peer`` on the new ``connection``, if one may still be offered."""
        sessions = self._peers.get(peer)
        while sessions:
            session, usable_until = sessions.pop()
            if now < usable_until:
                connection.set_session(session)
                self._offered[connection] = usable_until
                return

    def keep(self, peer, connection: SSL.Connection, now: float) -> None:
        """Keep the session of ``connection`` (a verified connection to ``peer``) for a later one."""
        session = connection.get_session()
        chain = connection.get_verified_chain()  # None after a resumed handshake: nothing was verified
        peer_until = validity(chain)[1] if chain is not None else self._offered.pop(connection, None)
        if session is None or peer_until is None:
            return
        usable_until = min(self._own_not_after, peer_until)
        if now >= usable_until:
            return
        sessions = self._peers.get(peer)
        if sessions is None:
            if len(self._peers) >= MAX_PEERS:
                self._peers.clear()
            sessions = self._peers[peer] = []
        sessions.append((session, usable_until))
        del sessions[:-SESSIONS_PER_PEER]


@dataclass(frozen=True)
class WorkloadCredentials:
    """A workload's key, certificate chain and trust bundle, with TLS contexts.

    ``key`` never leaves memory unless the operator gave it as a file.
    ``sessions`` are the client sessions made with these credentials.
    """

    key: object
    chain: tuple  # leaf first
    bundle: tuple
    server_context: SSL.Context = field(repr=False, compare=False, default=None)
    client_context: SSL.Context = field(repr=False, compare=False, default=None)
    sessions: SessionCache = field(repr=False, compare=False, default=None)

    @classmethod
    def build(cls, key, chain, bundle, require_client_cert=True, resumption=True) -> WorkloadCredentials:
        """Credentials with ready contexts.

        ``require_client_cert=False`` makes the server side ask for, but not
        insist on, a client certificate; ``resumption=False`` makes it issue no
        resumable session (both for the control plane's ports).
        """
        chain, bundle = tuple(chain), tuple(bundle)
        return cls(key, chain, bundle,
                   make_context(bundle, key, chain, server=True, require_client_cert=require_client_cert,
                                resumption=resumption),
                   make_context(bundle, key, chain, server=False),
                   SessionCache(chain[0].not_valid_after_utc.timestamp()))

    @classmethod
    def from_pem(cls, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes) -> WorkloadCredentials:
        key = serialization.load_pem_private_key(key_pem, password=None)
        return cls.build(key, x509.load_pem_x509_certificates(chain_pem),
                         x509.load_pem_x509_certificates(bundle_pem))

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @functools.cached_property
    def identity(self):
        """Our SPIFFE id (parsed once: it is read for every inbound connection)."""
        return spiffe_id_of(self.leaf)

    def expires_in(self, now=None) -> float:
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return (self.leaf.not_valid_after_utc - now).total_seconds()


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
    """Server-side connections with the store's current credentials.

    ``alpn``: the ALPN protocols the port speaks, preferred first (``(b"h2", b"http/1.1")`` on
    the sidecar's inbound port); by default ``http/1.1`` only.
    """

    def __init__(self, store: CredentialStore, alpn=None):
        self.store = store
        self.alpn = alpn

    def serverConnectionForTLS(self, tlsProtocol):
        if self.alpn is not None:
            return _ChoosingConnection(self.store.current.server_context, self.alpn)
        return SSL.Connection(self.store.current.server_context, None)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """Client-side connections to one peer with the store's current credentials.

    ``peer`` is the key of :class:`SessionCache`: a session kept for it is offered.
    """

    def __init__(self, store: CredentialStore, peer):
        self.store = store
        self.peer = peer

    def clientConnectionForTLS(self, tlsProtocol):
        credentials = self.store.current
        connection = SSL.Connection(credentials.client_context, None)
        connection.set_connect_state()
        credentials.sessions.offer(self.peer, connection, time.time())
        return connection


def keep_session(store: CredentialStore, peer, connection: SSL.Connection) -> None:
    """Keep the session of a client ``connection`` to ``peer`` that passed the peer checks.

    Only if it was made with the store's current credentials: a session made
    with credentials rotated out meanwhile is dropped with them.
    """
    credentials = store.current
    if credentials is not None and connection.get_context() is credentials.client_context:
        credentials.sessions.keep(peer, connection, time.time())
