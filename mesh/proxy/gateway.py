"""The ingress gateway: ``twistd mesh-proxy --gateway`` (docs/gateway.md).

A gateway proxy is a sidecar without an app: its workload identity calls mesh services over
mTLS like any sidecar, and it listens on the ports of the Gateways that select it
(:mod:`mesh.config.gateway` compiles them into ``ProxyConfig.gateway``: one route table per
plaintext port, one per server of an HTTPS port).

- :class:`GatewayListeners` follows the config: after each apply it opens a listener for every
  new port (HTTPS ports terminate TLS with the server's certificate, see :func:`server_context`),
  closes the ports no Gateway has any more, and swaps the TLS context of the HTTPS ports kept.
  ``--gateway-port PORT=LOCAL`` maps a server port to the local port it listens on.
- :class:`GatewayRouter` handles each request of one port: authentication and authorization as
  for any workload (AuthorizationPolicies that select the gateway's labels), then routing with the
  port's table through ``mesh_route``, exactly as the sidecar's outbound listener routes.  On an
  HTTPS port the table is that of the server whose TLS settings the connection's handshake used
  (the SNI chose them): at the end of the handshake, once per connection, the connection moves to
  that server's listener (:class:`_HttpsListener`), whose router has the server's table, so a
  client that reached one server cannot reach another's hosts by its Host header.
- A TCP server's port takes each connection through :class:`_TcpServer`: the gateway's
  AuthorizationPolicies for TCP, then the port's ``tcp`` routes
  (:meth:`mesh.proxy.tcp_proxy.OutboundTcp.accept_gateway`), spliced to a mesh endpoint over mTLS.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mesh.config.tables import RouteTable
from mesh.identity.tls import make_context
from mesh.plugins import fast_caller
from mesh.proxy.codec.http1_server import DownstreamConnection, DownstreamFactory
from mesh.proxy.listener import Listener
from mesh.proxy.paths import normalizer
from mesh.proxy.runtime import OutboundRouter, Snapshot, admit
from mesh.proxy.tcp_proxy import InboundTcp, OutboundTcp, TcpFactory

log = Logger()

_TLS_VERSIONS = {"TLSV1_2": SSL.TLS1_2_VERSION, "TLSV1_3": SSL.TLS1_3_VERSION}
_NO_ROUTES = RouteTable()


@dataclass(frozen=True)
class GatewaySettings:
    """``--gateway`` options: the address the ports listen on, and ``ports`` mapping a Gateway server
    port to the local port that serves it (``--gateway-port``; unmapped ports listen on their number)."""

    address: str = "0.0.0.0"
    ports: dict = field(default_factory=dict)

    def local_port(self, port: int) -> int:
        """The local port that serves the Gateway server port ``port``."""
        return self.ports.get(port, port)


def server_context(tls) -> SSL.Context:
    """An OpenSSL server context for a :class:`mesh.config.gateway.ServerTLS`: its certificate chain and key,
    client certificates required (MUTUAL), verified if given (OPTIONAL_MUTUAL) or not asked for (SIMPLE)."""
    context = make_context(tls.client_cas, tls.key, tls.chain, server=True, require_client_cert=tls.mode == "MUTUAL")
    if tls.mode == "SIMPLE":
        context.set_verify(SSL.VERIFY_NONE)
    context.set_min_proto_version(_TLS_VERSIONS[tls.min_version])
    if tls.max_version is not None:
        context.set_max_proto_version(_TLS_VERSIONS[tls.max_version])
    return context


#: ALPN of the HTTPS ports, preferred first (the downstream codec speaks HTTP/2 when ``h2`` is chosen).
_ALPN = (b"h2", b"http/1.1")


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    """Server connections of one HTTPS port with the TLS settings of its servers (swapped by
    :class:`GatewayListeners` with :meth:`update`).  The SNI of the ClientHello picks the server as Envoy's
    filter chain match does: an exact name, else the longest wildcard, else ``*``; without SNI, or for a
    name no server has, the first server's.  The connection's ``gateway_server`` is the
    :class:`mesh.config.gateway.GatewayServer` whose settings it uses (read when the handshake is done:
    :meth:`_HttpsListener.server_listener`).  ALPN chooses ``h2`` or ``http/1.1`` (the context's select
    callback reads the connection's ``alpn``)."""

    def __init__(self, entry):
        self.update(entry)

    def update(self, entry) -> None:
        """Build the contexts of a :class:`mesh.config.gateway.GatewayPort`'s servers."""
        exact, wildcards, default = {}, [], None
        for server in entry.servers:
            context = server_context(server.tls)
            context.set_tlsext_servername_callback(self._choose)
            chosen = (context, server)
            default = default or chosen
            for name in server.sni:
                if name.startswith("*"):
                    wildcards.append((name[1:], chosen))
                else:
                    exact.setdefault(name, chosen)
        wildcards.sort(key=lambda item: -len(item[0]))
        self._exact, self._wildcards, self._default = exact, tuple(wildcards), default
        self.context = default[0]

    def _choose(self, connection) -> None:
        """The servername callback: switch to the context of the server the client named."""
        name = connection.get_servername()
        if name is None:
            return
        name = name.decode("ascii", "replace").lower()
        chosen = self._exact.get(name)
        if chosen is None:
            chosen = next((chosen for suffix, chosen in self._wildcards if name.endswith(suffix)), None)
        if chosen is not None and chosen[0] is not connection.get_context():
            context, connection.gateway_server = chosen
            connection.set_context(context)
            connection.set_verify(context.get_verify_mode())  # OpenSSL keeps the first context's otherwise

    def serverConnectionForTLS(self, tlsProtocol):
        context, server = self._default
        connection = SSL.Connection(context, None)
        connection.alpn = _ALPN
        connection.gateway_server = server
        return connection


class _PortView:
    """The runtime as one port's router sees it: the snapshot in force, with the port's routes as its
    route table, or those of the port's HTTPS server ``server`` (a :class:`mesh.config.gateway.GatewayServer`:
    the server of the config in force equal to it, with the same name, hosts and TLS settings; none: no
    routes); rebuilt once per snapshot."""

    def __init__(self, runtime, port, server=None):
        self.runtime = runtime
        self.port = port
        self.server = server
        self._source = self._view = None

    @property
    def snapshot(self):
        snapshot = self.runtime.snapshot
        if snapshot is not self._source:
            self._view = Snapshot(replace(snapshot.config, routes=self._routes(snapshot.config)), snapshot.clusters)
            self._source = snapshot
        return self._view

    def _routes(self, config) -> RouteTable:
        entry = config.gateway.get(self.port)
        if entry is None:
            return _NO_ROUTES
        if self.server is None:
            return entry.routes
        return next((server.routes for server in entry.servers if server == self.server), _NO_ROUTES)


class GatewayRouter(OutboundRouter):
    """Routes the requests of one gateway port (or of one server of an HTTPS port: ``server``): authenticate
    and authorize them as the gateway workload's (:func:`mesh.proxy.runtime.admit`), then route them by the
    port's (the server's) table (a miss is 404 ``NR``)."""

    def __init__(self, runtime, hooks, port, server=None):
        super().__init__(_PortView(runtime, port, server), hooks)
        self.port = port
        self._authorize = hooks.mesh_authorize

    def bind_hooks(self, hooks):
        super().bind_hooks(hooks)
        self._authorize = fast_caller(hooks.mesh_authorize)

    def route(self, ctx):
        runtime = self.runtime.runtime
        admit(runtime, self._authorize, ctx, runtime.snapshot.config)
        return super().route(ctx)


def _serves(entry) -> str:
    """What a port's listener does with its connections: routes TCP, terminates TLS, or reads HTTP."""
    return "tcp" if entry.tcp is not None else "https" if entry.tls is not None else "http"


class _HttpsListener(Listener):
    """The listener of an HTTPS port.  Each of its connections, once its handshake is done, moves to the
    listener of the server whose TLS settings the handshake used (:meth:`server_listener`, once per
    connection), whose router routes with that server's table: Istio's route configuration per server
    (``https.PORT.NAME.GATEWAY.NAMESPACE``).  A server's listener shares this one's connections and overload
    state, so the port's timer sweep, connection limit, metrics and draining see them all."""

    def __init__(self, runtime, port, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._runtime = runtime
        self._port = port
        self._current = frozenset()  # the GatewayServers of the port in force
        self._servers = {}  # GatewayServer -> its Listener
        self._bound = False

    def bind_hooks(self):
        super().bind_hooks()
        self._bound = True
        for listener in self._servers.values():
            listener.bind_hooks()

    def update(self, entry) -> None:
        """Follow the port's servers (a :class:`mesh.config.gateway.GatewayPort`): the connections of a server
        that is gone, or whose hosts or TLS settings changed, are drained (they finish their requests and
        close; new requests on them get 404 ``NR``), as Envoy drains the connections of a filter chain it
        removes."""
        self._current = frozenset(entry.servers)
        for server in [server for server in self._servers if server not in self._current]:
            gone = self._servers.pop(server)
            for connection in list(self.connections):
                if connection.listener is gone:
                    connection.drain()

    def server_listener(self, connection) -> Listener | None:
        """The listener of the server whose TLS settings ``connection`` (an ``SSL.Connection`` whose handshake
        is done) used; None refuses it: a connection to a ``MUTUAL`` server without a client certificate
        (OpenSSL resumes the TLS 1.3 session a client made with another server of the port without asking
        for one; Envoy's filter chains would not share it), or one whose handshake began with settings the
        config no longer has."""
        server = connection.gateway_server
        if server not in self._current or (server.tls.mode == "MUTUAL" and connection.get_peer_certificate() is None):
            log.debug("gateway port {port}: connection refused after its TLS handshake: no client certificate for "
                      "{server} (a session resumed from another server), or its settings changed",
                      port=self._port, server=server.name)
            return None
        listener = self._servers.get(server)
        if listener is None:
            router = GatewayRouter(self._runtime, self._hooks, self._port, server)
            listener = Listener(self.reactor, self.direction, router, self.limits, self._hooks,
                                own_identity=self._own_identity, normalize_path=self.normalize_path)
            listener.forwarded_proto = self.forwarded_proto
            listener.label = f"gateway:{self._port} {server.name}"
            listener.connections, listener.overload = self.connections, self.overload
            if self._bound:
                listener.bind_hooks()
            self._servers[server] = listener
        return listener


class _HttpsConnection(DownstreamConnection):
    """A connection of an HTTPS port: when its handshake is done it becomes a connection of its server's
    listener (:meth:`_HttpsListener.server_listener`), so its requests, HTTP/1.1 or HTTP/2 (which takes the
    connection over with its listener), are routed with that server's table; or it is closed."""

    def handshakeCompleted(self):
        listener = self.listener.server_listener(self.transport.getHandle())
        if listener is None:
            self.closing = True
            self.transport.abortConnection()
            return
        self.listener = listener
        super().handshakeCompleted()


class _HttpsFactory(DownstreamFactory):
    """Builds an :class:`_HttpsConnection` per accepted socket the port's listener admits."""

    protocol = _HttpsConnection


class _TcpServer:
    """The handler of a TCP server port (:class:`~mesh.proxy.tcp_proxy.TcpFactory`)."""

    def __init__(self, proxy, port):
        self.port = port
        self.routes = OutboundTcp(proxy.reactor, proxy.runtime)
        self.authorize = InboundTcp(proxy.reactor, proxy.runtime, proxy.plugins.hook, None, port).authorize

    def accept(self, conn):
        self.routes.accept_gateway(conn, self.port, self.authorize)


class _Bound:
    """A listening port as :class:`mesh.proxy.service.ProxyService` stops it when it drains."""

    def __init__(self, port):
        self.port = port

    def stopService(self):
        return self.port.stopListening()


class GatewayListeners:
    """The gateway's listeners, one per port of the config in force (see the module docstring)."""

    def __init__(self, proxy, settings: GatewaySettings):
        self.proxy = proxy
        self.settings = settings
        self.open = {}  # Gateway server port -> (Listener, _ServerTLS or None, what it serves: _serves)

    def update(self, config) -> None:
        """Open, keep or close listeners for the ports of ``config.gateway``."""
        wanted = config.gateway
        for port in sorted(set(self.open) - set(wanted)):
            self._close(port, "no Gateway that selects this proxy has it any more")
        for port, entry in sorted(wanted.items()):
            current = self.open.get(port)
            if current is not None and current[2] == _serves(entry):
                if entry.tls is not None:
                    current[1].update(entry)
                    current[0].update(entry)
                continue
            if current is not None:  # HTTP <-> HTTPS <-> TCP: listen again once the old socket is closed
                self._close(port, "its protocol changed").addCallback(lambda _, port=port, entry=entry:
                                                                      self._open(port, entry))
            else:
                self._open(port, entry)

    def describe(self) -> dict:
        """Server port -> the local address it listens on, for /config_dump."""
        return {str(port): f"{self.settings.address}:{self.settings.local_port(port)}" for port in sorted(self.open)}

    def _open(self, port, entry) -> None:
        proxy = self.proxy
        args = (proxy.reactor, "outbound", GatewayRouter(proxy.runtime, proxy.plugins.hook, port),
                proxy.settings.limits, proxy.plugins.hook)
        options = {"own_identity": proxy.own_identity, "normalize_path": normalizer(proxy.settings.path_normalization)}
        tls = None
        if entry.tls is not None:
            listener = _HttpsListener(proxy.runtime, port, *args, **options)
            listener.update(entry)
            tls = _ServerTLS(entry)
            factory = TLSMemoryBIOFactory(tls, False, _HttpsFactory(listener))
        elif entry.tcp is not None:
            listener = Listener(*args, **options)
            factory = TcpFactory(listener, _TcpServer(proxy, port))
        else:
            listener = Listener(*args, **options)
            factory = DownstreamFactory(listener)
        listener.label = f"gateway:{port}"
        listener.forwarded_proto = b"http" if tls is None else b"https"  # an edge, as Istio's gateways
        local = self.settings.local_port(port)
        try:
            bound = proxy.reactor.listenTCP(local, factory, backlog=1024, interface=self.settings.address)
        except CannotListenError as error:
            log.error("gateway port {port} ({protocol}) cannot listen on {address}:{local}: {reason}; free the port "
                      "or map it elsewhere with --gateway-port {port}=LOCAL", port=port, protocol=entry.protocol,
                      address=self.settings.address, local=local, reason=str(error.socketError))
            return
        listener.server = _Bound(bound)
        proxy.listeners.append(listener)
        if proxy.running:
            listener.start()
        self.open[port] = (listener, tls, _serves(entry))
        log.info("gateway port {port} ({protocol}) listening on {address}:{local}", port=port,
                 protocol=entry.protocol, address=self.settings.address, local=local)

    def _close(self, port, why):
        """Stop listening on ``port`` (its connections finish their requests); a Deferred that fires when the
        socket is closed."""
        listener = self.open.pop(port)[0]
        self.proxy.listeners.remove(listener)
        stopped = defer.maybeDeferred(listener.server.stopService)
        listener.stop()
        for connection in list(listener.connections):
            connection.drain()
        log.info("gateway port {port} closed: {why}", port=port, why=why)
        return stopped
