"""Mesh mTLS on the sidecar's connections.

- :class:`UpstreamTLS` wraps upstream connections to mesh endpoints in TLS with
  the workload certificate (the upstream codecs check the peer's identity with
  :func:`peer_problem` after the handshake), offers ALPN ``h2`` first for
  connections that would rather speak HTTP/2, always adds the mesh's marker
  :data:`MESH_ALPN` (never chosen by a server: it tells the peer sidecar that
  this ClientHello is mesh mTLS, as Istio's ``istio`` ALPN does), and resumes
  sessions kept per peer (:class:`mesh.identity.tls.SessionCache`).
- :func:`inbound_peer` reads who the caller of a verified inbound mTLS
  connection is, and refuses a resumed session whose certificate has expired.
- :class:`InboundFactory` accepts the inbound port according to
  PeerAuthentication: STRICT (TLS only), PERMISSIVE (TLS or plaintext, told
  apart by the first byte: 0x16 starts a TLS handshake) or DISABLE, the mode
  of the port the connection was sent to: its original destination when
  iptables captured it (``portLevelMtls`` applies to every captured port, as in
  Istio since 1.9), else the app port.  When the
  app port is a TCP, TLS or HTTPS port and the mode is not STRICT, a TLS
  ClientHello is read whole first (:mod:`mesh.proxy.tcp_sni`): only one that
  offers :data:`MESH_ALPN` is mesh mTLS; any other is the client's own TLS,
  passed to the app as TCP (Istio's "plain TLS" filter chain of a TCP port).
"""

from __future__ import annotations

import functools
import time

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mesh.identity.tls import ALPN_HTTP1, ClientTLS, ServerTLS, keep_session, peer_certificate_facts, peer_identity
from mesh.proxy.original_dst import original_dst
from mesh.proxy.retry import TLS_FAILURE
from mesh.proxy.tcp_sni import read_client_hello
from mesh.proxy.tls_origination import verify_failure
from mesh.proxy.tls_transport import lean_tls

log = Logger()

TLS_HANDSHAKE_RECORD = 0x16
STRICT, PERMISSIVE, DISABLE = "STRICT", "PERMISSIVE", "DISABLE"
#: The mesh's ALPN marker, offered last by every sidecar-to-sidecar connection and never selected
#: (no server lists it): the peer's inbound listener knows mesh mTLS from a client's own TLS by it.
MESH_ALPN = b"txmesh"
#: ALPN offered by an upstream connection that would rather speak HTTP/2: the peer chooses.
ALPN_H2_FIRST = [b"h2", ALPN_HTTP1, MESH_ALPN]
#: ALPN offered by the other upstream connections (HTTP/1.1, TCP tunnels).
ALPN_HTTP1_MESH = [ALPN_HTTP1, MESH_ALPN]


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
        creator = _MeshClientTLS(self.store, peer, ALPN_H2_FIRST if offer_h2 else ALPN_HTTP1_MESH)
        return lean_tls(TLSMemoryBIOFactory(creator, True, factory))

    def keep_session(self, peer, transport):
        """``transport`` (to ``peer``) passed the identity check and carried a response: keep its session."""
        keep_session(self.store, peer, transport.getHandle())

    def verifier(self, identity):
        """The check a connection passes after its handshake: the peer presented ``identity``."""
        return functools.partial(peer_problem, expected=identity)


class _MeshClientTLS(ClientTLS):
    """:class:`ClientTLS` whose connections offer the ALPN list ``alpn`` (with :data:`MESH_ALPN`)."""

    def __init__(self, store, peer, alpn):
        super().__init__(store, peer)
        self.alpn = alpn

    def clientConnectionForTLS(self, tlsProtocol):
        connection = super().clientConnectionForTLS(tlsProtocol)
        connection.set_alpn_protos(self.alpn)
        return connection


def peer_problem(transport, expected):
    """Why the peer of a verified upstream TLS ``transport`` is not ``expected`` (a SPIFFE id), or None."""
    actual = peer_identity(transport)
    if actual == expected:
        return None
    return f"peer identity mismatch: expected {expected}, the endpoint presented {actual or 'no SPIFFE id'}"


def setup_failure(reason, transport=None) -> str:
    """Why an upstream connection (``transport``) died before it was usable (TLS errors spelled out,
    with the certificate check that failed when there is one)."""
    if reason is None:
        return "connection closed during set-up"
    from OpenSSL.SSL import Error as TLSError

    if reason.check(TLSError):
        refused = verify_failure(transport.getHandle()) if transport is not None else None
        if refused is not None:
            return f"{TLS_FAILURE}the server's certificate was refused: {refused}"
        return f"{TLS_FAILURE}{reason.value}"
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
    """Waits for the first byte (for a ClientHello that must be read, all of it), then hands the
    connection to TLS or plaintext.

    Until then it is one of the listener's connections (:mod:`mesh.proxy.listener`):
    it counts against ``--max-connections``, is idle (closed first under
    overload) and is closed when no byte comes within ``--header-timeout``.
    """

    def __init__(self, factory, addr):
        self.factory = factory
        self.addr = addr
        self.inner = None
        self.buffer = b""
        self.listener = factory.plain.listener
        self.last_activity = 0.0
        self.closing = False
        self.dst_port = _UNREAD

    def original_port(self):
        """The port the client dialled when iptables captured the connection, else None; read once, and
        only when asked (when some port has a PeerAuthentication mode of its own)."""
        if self.dst_port is _UNREAD:
            dst = original_dst(self.transport)
            self.dst_port = None if dst is None else dst[1]
        return self.dst_port

    def connectionMade(self):
        self.last_activity = self.listener.reactor.seconds()
        self.listener.connection_opened(self)

    def dataReceived(self, data):
        if self.inner is None:
            if self.closing:
                return
            self.buffer += data
            inner = self.factory.choose(self.buffer, self.addr, self.original_port)
            if inner is _WAIT:
                return  # the rest of a ClientHello (bounded by tcp_sni, and by --header-timeout)
            self.listener.connection_closed(self)  # from now on the chosen protocol is the connection
            if inner is None:
                self.transport.abortConnection()
                return
            self.inner = inner
            data, self.buffer = self.buffer, b""
            inner.makeConnection(self.transport)
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


#: What :meth:`InboundFactory.choose` answers while a ClientHello is still coming.
_WAIT = object()
#: :attr:`_Sniffer.dst_port` before the original destination is read.
_UNREAD = object()


def _no_port():
    """``port_of`` of a connection that was not captured."""
    return None


#: ALPN of the inbound port, preferred first: the server codec speaks what the client chose
#: (:mod:`mesh.proxy.codec.h2_server` takes a connection that negotiated ``h2`` over).
INBOUND_ALPN = (b"h2", b"http/1.1")


class InboundFactory(ServerFactory):
    """The inbound port: plaintext and/or mTLS by the PeerAuthentication mode.

    :param plain_factory: builds the HTTP protocol (a DownstreamFactory).
    :param store: the workload's :class:`mesh.identity.tls.CredentialStore`.
    :param mode_of: ``(port_of) -> "STRICT" | "PERMISSIVE" | "DISABLE"``, read per
        connection so that a config change applies to new connections.  ``port_of()`` is the
        connection's original destination port (None when it was not captured: it goes to the
        app port); ``mode_of`` calls it only when some port has a mode of its own (``portLevelMtls``),
        so that other connections never read ``SO_ORIGINAL_DST`` here.
    :param tcp_port: ``() -> bool``, per connection: whether the app port is a TCP, TLS or HTTPS
        port (then a TLS ClientHello without :data:`MESH_ALPN` goes to the app, unless STRICT).
    """

    noisy = False

    def __init__(self, plain_factory, store, mode_of, tcp_port):
        self.plain = plain_factory
        self.store = store
        self.mode_of = mode_of
        self.tcp_port = tcp_port
        self.tls = lean_tls(TLSMemoryBIOFactory(ServerTLS(store, INBOUND_ALPN), False, plain_factory))
        self.refused = 0

    def buildProtocol(self, addr):
        if not self.plain.listener.admit():
            return None
        return _Sniffer(self, addr)

    def choose(self, data, addr, port_of=_no_port):
        """The protocol for a connection whose first bytes are ``data``, None to refuse, or
        :data:`_WAIT` until the whole ClientHello has come.

        The mode is that of the port the connection was sent to (``port_of()``, see ``mode_of``).

        A TLS ClientHello is mesh mTLS, except on a TCP, TLS or HTTPS app port when the mode is
        not STRICT: there only one offering :data:`MESH_ALPN` is, and any other is passed to the
        app as TCP (the app terminates its own TLS).  On an HTTP port every ClientHello is mesh mTLS,
        so that sidecars that offer no marker keep working (Istio closes them under PERMISSIVE).
        """
        mode = self.mode_of(port_of)
        is_tls = data[0] == TLS_HANDSHAKE_RECORD
        if is_tls and mode != STRICT and self.tcp_port():
            done, hello = read_client_hello(data)
            if not done:
                return _WAIT
            if hello is None or MESH_ALPN not in hello.alpn:
                return self.plain.buildProtocol(addr)
        if is_tls and mode != DISABLE and self.store.current is not None:
            return self.tls.buildProtocol(addr)
        if not is_tls and mode != STRICT:
            return self.plain.buildProtocol(addr)
        self.refused += 1
        port = port_of()
        log.info("inbound connection from {peer}{to} refused: {why}", peer=getattr(addr, "host", addr),
                 to="" if port is None else f" to port {port}",
                 why="plaintext on a STRICT mTLS port" if not is_tls else "TLS but mTLS is disabled here")
        return None
