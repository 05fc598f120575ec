"""Mesh mTLS on the sidecar's connections.

- :class:`UpstreamTLS` wraps upstream connections to mesh endpoints in TLS with
  the workload certificate (the upstream codecs check the peer's identity with
  :func:`peer_problem` after the handshake), offers ALPN ``h2`` first for
  connections that would rather speak HTTP/2, and resumes sessions kept per
  peer (:class:`mesh.identity.tls.SessionCache`).
- :func:`inbound_peer` reads who the caller of a verified inbound mTLS
  connection is, and refuses a resumed session whose certificate has expired.
- :class:`InboundFactory` accepts the inbound port according to
  PeerAuthentication: STRICT (TLS only), PERMISSIVE (TLS or plaintext, told
  apart by the first byte: 0x16 starts a TLS handshake) or DISABLE.
"""

from __future__ import annotations

import time

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mesh.identity.tls import ALPN_HTTP1, ClientTLS, ServerTLS, keep_session, peer_certificate_facts, peer_identity

log = Logger()

TLS_HANDSHAKE_RECORD = 0x16
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"
#: ALPN offered by an upstream connection that would rather speak HTTP/2: the peer chooses.
ALPN_H2_FIRST = [b"h2", ALPN_HTTP1]


class UpstreamTLS:
    """Wraps pool factories in client TLS from a credential store.

    A *peer* is ``(address, port, expected SPIFFE id)`` of one endpoint's pool:
    sessions are kept and resumed per peer.
    """

    def __init__(self, store):
        self.store = store

    def refusal(self):
        """Why mTLS cannot be attempted now, or None."""
        if self.store.current is None:
            return ("the endpoint requires mTLS but this sidecar has no workload certificate yet; start it "
                    "with --control (or --cert/--key/--ca-bundle), or set the DestinationRule tls.mode DISABLE")
        return None

    def wrap(self, factory, peer, offer_h2=False):
        """``factory`` behind TLS to ``peer``, offering a session kept for it if there is one.

        ``offer_h2``: offer ALPN ``h2`` before ``http/1.1`` (the connection reads the
        peer's choice, ``negotiatedProtocol``, after the handshake).
        """
        creator = _OfferH2(self.store, peer) if offer_h2 else ClientTLS(self.store, peer)
        return TLSMemoryBIOFactory(creator, True, factory)

    def keep_session(self, peer, transport):
        """``transport`` (to ``peer``) passed the identity check and carried a response: keep its session."""
        keep_session(self.store, peer, transport.getHandle())


class _OfferH2(ClientTLS):
    """:class:`ClientTLS` whose connections offer ALPN ``h2`` first."""

    def clientConnectionForTLS(self, tlsProtocol):
        connection = super().clientConnectionForTLS(tlsProtocol)
        connection.set_alpn_protos(ALPN_H2_FIRST)
        return connection


def peer_problem(transport, expected):
    """Why the peer of a verified upstream TLS ``transport`` is not ``expected`` (a SPIFFE id), or None."""
    actual = peer_identity(transport)
    if actual == expected:
        return None
    return f"peer identity mismatch: expected {expected}, the endpoint presented {actual or 'no SPIFFE id'}"


def setup_failure(reason) -> str:
    """Why an upstream connection died before it was usable (TLS errors spelled out)."""
    if reason is None:
        return "connection closed during set-up"
    from OpenSSL.SSL import Error as TLSError

    if reason.check(TLSError):
        return f"TLS handshake failed: {reason.value}"
    return f"connection closed during set-up: {reason.getErrorMessage()}"


def inbound_peer(own_identity, transport):
    """``(caller's SPIFFE id, x-forwarded-client-cert value or None)`` of a verified mTLS connection.

    The client's chain must be valid now (:class:`mesh.identity.tls.ClientChains`):
    a resumed session carries the certificate verified when it was made, which
    may have expired since.  If not, the connection is aborted (nothing it sent
    reaches the app) and ``(None, None)`` is returned.
    """
    facts = peer_certificate_facts(transport)
    if facts is None:
        return None, None
    connection = transport.getHandle()
    if not connection.get_context().get_app_data().valid(connection, facts.sha256, time.time()):
        log.info("inbound mTLS connection refused: the certificate chain of {identity} is not valid now "
                 "(its resumed session outlived it); the client must renew its certificate",
                 identity=facts.identity)
        transport.abortConnection()
        return None, None
    parts = [f"By={own_identity}"] if own_identity else []
    parts += [f"Hash={facts.sha256}", 'Subject=""', f"URI={facts.identity or ''}"]
    return facts.identity, ";".join(parts).encode()


@implementer(IHalfCloseableProtocol)
class _Sniffer(Protocol):
    """Waits for the first byte, then hands the connection to TLS or plaintext.

    Until then it is one of the listener's connections (:mod:`mesh.proxy.listener`):
    it counts against ``--max-connections``, is idle (closed first under
    overload) and is closed when no byte comes within ``--header-timeout``.
    """

    def __init__(self, factory, addr):
        self.factory = factory
        self.addr = addr
        self.inner = None
        self.listener = factory.plain.listener
        self.last_activity = 0.0
        self.closing = False

    def connectionMade(self):
        self.last_activity = self.listener.reactor.seconds()
        self.listener.connection_opened(self)

    def dataReceived(self, data):
        if self.inner is None:
            if self.closing:
                return
            self.listener.connection_closed(self)  # from now on the chosen protocol is the connection
            self.inner = self.factory.choose(data[0], self.addr)
            if self.inner is None:
                self.transport.abortConnection()
                return
            self.inner.makeConnection(self.transport)
        self.inner.dataReceived(data)

    def connectionLost(self, reason=None):
        if self.inner is not None:
            self.inner.connectionLost(reason)
        else:
            self.listener.connection_closed(self)

    # -- as one of the listener's connections, until the first byte --------------------------
    def is_idle(self) -> bool:
        return not self.closing

    def check_timers(self, now):
        if not self.closing and now - self.last_activity > self.listener.limits.header_timeout:
            self.drain()

    def drain(self):
        self.closing = True
        self.transport.loseConnection()

    def abort(self):
        self.closing = True
        self.transport.abortConnection()

    def readConnectionLost(self):
        if self.inner is None:
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if self.inner is not None and IHalfCloseableProtocol.providedBy(self.inner):
            self.inner.writeConnectionLost()  # a plaintext TCP passthrough may go on reading
        else:
            self.transport.loseConnection()


#: ALPN of the inbound port, preferred first: the server codec speaks what the client chose
#: (:mod:`mesh.proxy.codec.h2_server` takes a connection that negotiated ``h2`` over).
INBOUND_ALPN = (b"h2", b"http/1.1")


class InboundFactory(ServerFactory):
    """The inbound port: plaintext and/or mTLS by the PeerAuthentication mode.

    :param plain_factory: builds the HTTP protocol (a DownstreamFactory).
    :param store: the workload's :class:`mesh.identity.tls.CredentialStore`.
    :param mode_of: ``() -> "STRICT" | "PERMISSIVE" | "DISABLE"``, read per
        connection so that a config change applies to new connections.
    """

    noisy = False

    def __init__(self, plain_factory, store, mode_of):
        self.plain = plain_factory
        self.store = store
        self.mode_of = mode_of
        self.tls = TLSMemoryBIOFactory(ServerTLS(store, INBOUND_ALPN), False, plain_factory)
        self.refused = 0

    def buildProtocol(self, addr):
        if not self.plain.listener.admit():
            return None
        return _Sniffer(self, addr)

    def choose(self, first_byte, addr):
        """The protocol for a connection whose first byte is ``first_byte``, or None to refuse."""
        mode = self.mode_of()
        is_tls = first_byte == TLS_HANDSHAKE_RECORD
        if is_tls and mode != DISABLE and self.store.current is not None:
            return self.tls.buildProtocol(addr)
        if not is_tls and mode != STRICT:
            return self.plain.buildProtocol(addr)
        self.refused += 1
        log.info("inbound connection from {peer} refused: {why}", peer=getattr(addr, "host", addr),
                 why="plaintext on a STRICT mTLS port" if not is_tls else "TLS but mTLS is disabled here")
        return None
