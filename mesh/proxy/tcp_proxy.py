"""Routed TCP: connections to the TCP, TLS and HTTPS ports of mesh services, through both sidecars.

Outbound (:class:`OutboundTcp`), a connection reaches the routing by its destination ``(ip, port)``:
captured by iptables (:mod:`mesh.proxy.passthrough` hands it over when the destination is a TCP
service port), or accepted on an explicit TCP listener
(``--outbound-tcp-port``, Istio's Sidecar egress listener with ``captureMode: NONE``), whose own
address is the destination.  A captured connection to a TCP service port is routed at once,
never sniffed (:meth:`mesh.proxy.passthrough.Passthrough.detecting`).  Then, as Envoy's
``tcp_proxy`` behind Istio's filter chains:

1. the listener of the destination in the compiled :class:`mesh.config.tables.L4Table`; for a
   TLS or HTTPS port the server name is read from the ClientHello first
   (:mod:`mesh.proxy.tcp_sni`), within ``--header-timeout``, without terminating TLS;
2. the chain that matches (destination subnet, SNI): when none does, an explicit listener closes
   the connection (``NR``) and a captured one goes to the passthrough (:mod:`mesh.proxy.passthrough`:
   its destination under ALLOW_ANY, closed under REGISTRY_ONLY), as Istio's passthrough filter chain;
3. a cluster by the route's weights (``NC`` if it does not exist), an endpoint among its healthy
   ones by ``mesh_pick_endpoint`` (``UH`` if none), with the DestinationRule's load balancer
   (a connection counts as a request: LEAST_REQUEST is least connections; a consistent hash
   can only use the source IP); if the cluster's open connections (connecting or spliced, in
   this sidecar) are at its ``connectionPool.tcp.maxConnections``, the connection is closed at
   once (``UO``, counted in ``mesh_upstream_cx_overflow_total``), as Envoy's ``tcp_proxy`` does
   with the cluster's :class:`mesh.proxy.circuit.CircuitBreaker`;
4. a connection to it within the cluster's ``connectTimeout``, over mesh mTLS when the endpoint
   has an identity (the peer's SPIFFE id is checked before any client byte is sent), or over TLS
   the sidecar originates when the DestinationRule's ``tls`` mode is SIMPLE or MUTUAL
   (:mod:`mesh.proxy.tls_origination`: the server's chain and name are checked first); a
   failure closes the client's connection (``UF``) and counts for outlier detection, as a
   connect failure does for HTTP; a success ends the endpoint's failure streak;
5. the two connections are spliced (:class:`mesh.proxy.passthrough.TcpUpstream`).

Inbound (:class:`InboundTcp`), when the app port is a TCP port (``ProxyConfig.app_protocol`` is
TCP, TLS or HTTPS), the inbound listener carries every connection as TCP, plaintext or mTLS by
PeerAuthentication: ``mesh_authorize`` decides it with the AuthorizationPolicies compiled for
TCP (``ProxyConfig.tcp_authz``) -- a denied connection is closed at once (``RBAC``), as Envoy's
RBAC network filter does -- and an allowed one is spliced to the app.

Every connection is reported to ``mesh_connection_open``/``_complete`` with its cluster and
flags (:func:`mesh.proxy.passthrough.report`), which is where Istio's TCP metrics and the access
log come from.  The hooks that take a request (``mesh_pick_endpoint``, ``mesh_authorize``) get a
:class:`TcpContext`.
"""

from __future__ import annotations

import ipaddress
from types import MappingProxyType

from twisted.internet.interfaces import IHandshakeListener, INegotiated
from twisted.internet.protocol import ClientFactory, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from mesh.config.resources import TCP_PROTOCOLS
from mesh.config.security_tables import NO_ALLOW_MATCHED
from mesh.plugins import fast_caller
from mesh.proxy import outlier
from mesh.proxy.codec.http1_server import DownstreamConnection
from mesh.proxy.context import PluginExtra
from mesh.proxy.mtls import setup_failure
from mesh.proxy.passthrough import TcpUpstream, report
from mesh.proxy.pool import describe_connect_failure
from mesh.proxy.runtime import rbac_details
from mesh.proxy.sockets import set_nodelay
from mesh.proxy.tcp_sni import read_server_name
from mesh.proxy.tls_transport import IHalfCloseOverTLS

log = Logger()

#: Client bytes held while a route is chosen and its upstream connects; beyond, reading pauses.
_HOLD_LIMIT = 64 * 1024
_NO_HEADERS = MappingProxyType({})


class TcpContext(PluginExtra):
    """One TCP connection as the request hooks see it (a :class:`mesh.api.RequestView`).

    Its HTTP fields are empty (``method``, ``path``, ``uri_path``, ``host`` are ``""``,
    ``headers`` is empty); ``protocol`` is ``"tcp"``.  ``port`` is the destination port of the
    connection (what AuthorizationPolicy ``ports`` test) and ``server_name`` the SNI of a TLS
    ClientHello (None if none was read).
    """

    __slots__ = ("direction", "source_address", "peer", "start", "port", "server_name", "route", "cluster",
                 "upstream_host", "attempts", "response_flags", "error", "bytes_received", "bytes_sent",
                 "upstream_start", "upstream_time", "authz_policy", "authz_dry_run")

    protocol = "tcp"
    method = path = uri_path = host = http_version = request_id = ""
    authority = b""
    headers = _NO_HEADERS
    raw_headers = ()
    response_code = 0
    request_auth = None  # no end-user token on a TCP connection
    grpc = None  # never a gRPC call

    def __init__(self, direction, source_address, peer, start, port, server_name=None):
        self.direction = direction
        self.source_address = source_address
        self.peer = peer
        self.start = start
        self.port = port
        self.server_name = server_name
        self.route = self.cluster = self.upstream_host = self.error = None
        self.attempts = 0
        self.response_flags = ""
        self.bytes_received = self.bytes_sent = 0
        self.upstream_start = self.upstream_time = None
        self.authz_policy = self.authz_dry_run = None
        self._extra = None


@implementer(IHalfCloseOverTLS)
class TcpDownstreamConnection(DownstreamConnection):
    """A downstream connection that carries TCP from its first byte (an explicit TCP listener, or the
    inbound listener of a TCP app port): the HTTP codec's connection, diverted and made a tunnel at once.

    Its bytes wait in a :class:`HeldBytes` until ``handler.accept(conn)`` (an :class:`OutboundTcp` or
    :class:`InboundTcp`) has routed it: at once in plaintext, after the handshake over mTLS (which
    tells who the peer is).  Over mesh mTLS (TLS 1.3) it half-closes both ways as over TCP
    (:class:`~mesh.proxy.tls_transport.IHalfCloseOverTLS`).
    """

    def __init__(self, listener, handler):
        super().__init__(listener)
        self.handler = handler
        self.held = None

    def connectionMade(self):
        set_nodelay(self.transport)
        self.source_address = self.transport.getPeer().host
        listener = self.listener
        self.start = self.last_activity = listener.reactor.seconds()
        listener.connection_opened(self)
        self.become_tunnel()
        self.held = HeldBytes(self)
        self.divert(self.held)
        if not INegotiated.providedBy(self.transport):  # over TLS: once the handshake tells who the peer is
            self.handler.accept(self)

    def handshakeCompleted(self):
        super().handshakeCompleted()
        if not (self.closing or self.transport.disconnecting):  # inbound_peer aborts an expired chain
            self.handler.accept(self)


class TcpFactory(ServerFactory):
    """Builds a :class:`TcpDownstreamConnection` per accepted socket that ``listener`` admits."""

    noisy = False

    def __init__(self, listener, handler):
        self.listener = listener
        self.handler = handler

    def buildProtocol(self, addr):
        if not self.listener.admit():
            return None
        return TcpDownstreamConnection(self.listener, self.handler)


class InboundProtocols(ServerFactory):
    """The inbound port's protocol, per connection: TCP when the app port is a TCP port (its
    ServiceEntry protocol is TCP, TLS or HTTPS: ``ProxyConfig.app_protocol``), else HTTP."""

    noisy = False

    def __init__(self, http_factory, tcp_factory, runtime):
        self.http = http_factory
        self.tcp = tcp_factory
        self.runtime = runtime
        self.listener = http_factory.listener

    def carries_tcp(self) -> bool:
        """Whether the app port is a TCP, TLS or HTTPS port now (the latest config says)."""
        return self.runtime.snapshot.config.app_protocol in TCP_PROTOCOLS

    def buildProtocol(self, addr):
        if self.carries_tcp():
            return self.tcp.buildProtocol(addr)
        return self.http.buildProtocol(addr)


class HeldBytes:
    """Where a TCP connection's bytes wait while its route is chosen and its upstream connects.

    It is the connection's receiver (``DownstreamConnection.divert``): ``write`` gets the client's
    bytes, ``loseConnection`` tells that the client half-closed or went away.  ``on_data`` (set
    while the server name is awaited) is called after each of those.  It is also the ``detector``
    of the :class:`~mesh.proxy.passthrough.TcpUpstream`: ``conn`` and ``take_buffer()``.
    """

    __slots__ = ("conn", "buffer", "on_data", "connector")
    client = None  # as a passthrough's detector: in no detection (see Passthrough.forget)

    def __init__(self, conn, data=b""):
        self.conn = conn
        self.buffer = data
        self.on_data = None
        self.connector = None  # the upstream connector while it connects

    def write(self, data):
        self.buffer += data
        if self.on_data is not None:
            self.on_data()
        elif len(self.buffer) > _HOLD_LIMIT:
            self.conn.pause_detection()  # the splice resumes reading

    def loseConnection(self):
        if self.conn.closing:
            self.on_data = None
            if self.connector is not None:
                self.connector.disconnect()
        elif self.on_data is not None:
            self.on_data()

    def take_buffer(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data


class _Tunnel:
    """One routed TCP connection, from the decision to connect until it ends.

    The owner of its :class:`~mesh.proxy.passthrough.TcpUpstream` (``connected``, ``closed``);
    reports the connection with ``cluster`` and its flags.  Subclasses add what a success or a
    failure means to them (``_established``, ``_ended``, ``_connect_failed``, ``_released``).
    """

    def __init__(self, reactor, conn, held, cluster):
        self.reactor = reactor
        self.conn = conn
        self.held = held
        self.cluster = cluster

    def connect(self, host, port, timeout):
        """Connect to ``host:port`` in plaintext (the app behind an inbound TCP port)."""
        self.held.connector = self.reactor.connectTCP(host, port, _UpstreamFactory(self, None), timeout=timeout)

    def connect_endpoint(self, pool):
        """Connect to the endpoint of ``pool`` (its :class:`mesh.proxy.pool.ConnectionPool`) as the pool
        connects: over TLS when it has a TLS wrapper (mesh mTLS, or TLS origination), whose check the
        peer must pass before any client byte is sent; with the cluster's timeout and TCP keepalive."""
        if pool.tls is not None:
            refusal = pool.tls.refusal()
            if refusal is not None:
                self.fail(refusal)
                return
        self.held.connector = pool.connect_tcp(_UpstreamFactory(self, pool.verify))

    def refuse(self, flag, why):
        """Close the client's connection without an upstream (never spliced), reporting ``flag``.

        A plain close (FIN; over TLS a close_notify), as Envoy's ``NoFlush`` close of a refused connection.
        """
        report(self.conn, 1, 1, self.cluster, flag)
        self.conn.close()
        log.info("{direction} TCP connection from {client} closed ({flag}): {why}", direction=self.conn.direction,
                 client=self.conn.source_address, flag=flag, why=why)

    def fail(self, why):
        """Connecting failed (refused, timed out, TLS or identity rejected): ``UF``, or ``DC`` if the client left."""
        self.held.connector = None
        self._released()
        if self.conn.closing:
            report(self.conn, 1, 1, self.cluster, "DC")
            return
        self._connect_failed()
        self.refuse("UF", f"connecting to {self.cluster} failed: {why}")

    # -- TcpUpstream's owner -------------------------------------------------------------
    def connected(self, upstream) -> bool:
        self.held.connector = None
        self._established(upstream)
        report(self.conn, 1, 0, self.cluster, "", upstream=upstream.address)
        return True

    def closed(self, upstream, flags):
        if upstream.local is None and flags == "UC":  # died before the splice: TLS or identity rejected
            self.fail(upstream.failure or "the connection closed during set-up")
            return
        if upstream.local is not None:
            self._ended()
        self._released()
        report(self.conn, 1 if upstream.local is None else 0, 1, self.cluster, flags,
               upstream.sent, upstream.received, upstream.address)

    def _established(self, upstream):
        """The upstream connection is up (and verified)."""

    def _ended(self):
        """A spliced connection ended."""

    def _connect_failed(self):
        """Connecting failed while the client was still there."""

    def _released(self):
        """The tunnel is over, whichever way (failed to connect, refused by TLS, closed): called once."""


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, tunnel, verify_peer):
        self.tunnel = tunnel
        self.verify_peer = verify_peer

    def buildProtocol(self, addr):
        return MeshTcpUpstream(self.tunnel, self.tunnel.held, self.verify_peer)

    def clientConnectionFailed(self, connector, reason):
        self.tunnel.fail(describe_connect_failure(reason))


@implementer(IHandshakeListener, IHalfCloseOverTLS)
class MeshTcpUpstream(TcpUpstream):
    """A :class:`~mesh.proxy.passthrough.TcpUpstream` that, over TLS (mesh mTLS or TLS origination), is
    spliced only once the handshake is done and ``verify_peer(transport)`` found no problem (over mTLS:
    the peer presented the expected identity); otherwise it closes with ``failure`` set.  Over mesh
    mTLS (TLS 1.3) half-closes go both ways (:class:`~mesh.proxy.tls_transport.IHalfCloseOverTLS`).
    Lost before the splice, it leaves closing the client's connection to its owner (a FIN, not the
    passthrough's reset)."""

    def __init__(self, owner, held, verify_peer=None):
        super().__init__(owner, held)
        self.verify_peer = verify_peer
        self.failure = None

    def connectionMade(self):
        if self.verify_peer is None:
            super().connectionMade()

    def handshakeCompleted(self):
        self.failure = self.verify_peer(self.transport)
        if self.failure is not None:
            self.transport.abortConnection()
            return
        super().connectionMade()

    def connectionLost(self, reason=None):
        if self.local is None and not self.conn.closing:  # never spliced: the owner closes the client (FIN)
            if self.failure is None:
                self.failure = setup_failure(reason, self.transport)
            self.passthrough.closed(self, "UC")
            return
        super().connectionLost(reason)


class _OutboundTunnel(_Tunnel):
    """A routed outbound connection: the endpoint's load and outlier state follow it, and the
    cluster's circuit breaker (``breaker``, None without limits) counts it until it ends.
    :meth:`end_after` limits how long it may last."""

    def __init__(self, reactor, conn, held, cluster, endpoint, live_cluster):
        super().__init__(reactor, conn, held, cluster.name)
        self.endpoint = endpoint
        self.live_cluster = live_cluster
        self.breaker = live_cluster.breaker
        self._deadline = None  # the max duration's timer, see end_after
        self._expired = False

    def end_after(self, seconds):
        """Close the client's connection (and so the upstream's) in ``seconds``, as Envoy's ``tcp_proxy``
        does at ``max_downstream_connection_duration``: reported with the flag ``DT``."""
        self._deadline = self.reactor.callLater(max(seconds, 0.0), self._expire)

    def _expire(self):
        self._deadline = None
        self._expired = True
        log.info("{direction} TCP connection from {client} to {cluster} closed (DT): it reached the "
                 "DestinationRule's connectionPool.tcp.maxConnectionDuration", direction=self.conn.direction,
                 client=self.conn.source_address, cluster=self.cluster)
        self.conn.abort()

    def closed(self, upstream, flags):
        super().closed(upstream, flags or ("DT" if self._expired else ""))

    def _established(self, upstream):
        self.endpoint.try_started()
        outlier.connected(self.endpoint)

    def _ended(self):
        self.endpoint.try_ended()

    def _connect_failed(self):
        outlier.record_failure(self.endpoint, self.live_cluster, self.reactor.seconds(), connect_failure=True)

    def _released(self):
        breaker = self.breaker
        if breaker is not None:
            self.breaker = None
            breaker.connection_closed()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class OutboundTcp:
    """Routes the outbound side's TCP connections to TCP service ports (see the module docstring).

    :param runtime: the :class:`mesh.proxy.runtime.ProxyRuntime` (config and live clusters).

    A connection to an endpoint is made as the endpoint's pool makes its own (TLS as the pool says:
    mesh mTLS, TLS origination; the cluster's connect timeout and keepalive; the workload's source
    address).
    """

    def __init__(self, reactor, runtime):
        self.reactor = reactor
        self.runtime = runtime

    def take(self, conn, dst, take_buffer, passthrough) -> bool:
        """Route a captured connection (its bytes so far from ``take_buffer()``) if ``dst`` is a TCP
        service port; False when it is not (the caller passes it through).  If none of the port's
        routes matches it (a TLS server name no ServiceEntry has), it goes to ``passthrough``
        (:meth:`mesh.proxy.passthrough.Passthrough.open_tunnel`), as Istio's passthrough filter chain."""
        listener = self.runtime.snapshot.config.l4.lookup(*dst)
        if listener is None:
            return False
        conn.become_tunnel()
        held = HeldBytes(conn, take_buffer())
        conn.divert(held)
        self._start(conn, held, listener, dst, passthrough)
        return True

    def accept(self, conn):
        """A connection to an explicit TCP listener: its destination is the listener's own address."""
        host = conn.transport.getHost()
        dst = conn.original_dst = (host.host, host.port)
        listener = self.runtime.snapshot.config.l4.lookup(*dst)
        if listener is None:
            _Tunnel(self.reactor, conn, conn.held, None).refuse(
                "NR", f"no ServiceEntry has a TCP, TLS or HTTPS port {dst[1]} (at {dst[0]} or without addresses)")
            return
        self._start(conn, conn.held, listener, dst)

    def accept_gateway(self, conn, port, authorize):
        """A connection to a gateway's TCP server ``port``: ``authorize(conn, port)`` (the denying policy, or
        None) decides it, then the server's ``tcp`` routes (``config.gateway[port].tcp``) route it."""
        host = conn.transport.getHost()
        conn.original_dst = (host.host, host.port)
        policy = authorize(conn, port)
        if policy is not None:
            _Tunnel(self.reactor, conn, conn.held, None).refuse("RBAC", f"denied by AuthorizationPolicy "
                                                                        f"({rbac_details(policy)})")
            return
        entry = self.runtime.snapshot.config.gateway.get(port)
        if entry is None or entry.tcp is None:
            _Tunnel(self.reactor, conn, conn.held, None).refuse("NR", f"gateway port {port} has no TCP server")
            return
        self._route(conn, conn.held, entry.tcp, (host.host, port), None)

    def _start(self, conn, held, listener, dst, passthrough=None):
        if not listener.tls:
            self._route(conn, held, listener, dst, None, passthrough)
            return
        timer = self.reactor.callLater(conn.limits.header_timeout, lambda: decide(None))

        def decide(server_name):
            held.on_data = None
            if timer.active():
                timer.cancel()
            self._route(conn, held, listener, dst, server_name, passthrough)

        def arrived():
            done, server_name = read_server_name(held.buffer)
            if conn.closing:
                timer.cancel()
                held.on_data = None
            elif done or conn.read_closed:
                decide(server_name)

        held.on_data = arrived
        arrived()

    def _route(self, conn, held, listener, dst, server_name, passthrough=None):
        """Steps 2 to 4 of the module docstring for one connection; one no route matches goes to
        ``passthrough`` (a captured one), or is closed (``NR``)."""
        if conn.closing:
            return
        snapshot = self.runtime.snapshot
        chain = listener.chain(_address(dst[0]), server_name)
        if chain is None:
            sni = f"server name {server_name!r}" if server_name else "no server name (SNI)"
            why = f"{listener.name}: no TCP route matches {dst[0]} with {sni}"
            if passthrough is not None:
                passthrough.open_tunnel(held, unrouted=why)
            else:
                _Tunnel(self.reactor, conn, held, None).refuse("NR", why)
            return
        action = chain.action
        name = action.pick_cluster()
        cluster = snapshot.clusters.get(name)
        if cluster is None:
            _Tunnel(self.reactor, conn, held, name).refuse(
                "NC", f"cluster {name} not found: {action.name} routes to a host or subset that no "
                      "ServiceEntry/DestinationRule defines")
            return
        pinned = chain.original_dst
        if pinned is not None and cluster.spec.service == pinned[0]:
            # a headless Service's pod, dialled by its address: that pod, whatever its health (ORIGINAL_DST)
            endpoint = cluster.endpoint_at(pinned[1])
            if endpoint is None:
                _Tunnel(self.reactor, conn, held, name).refuse(
                    "UH", f"cluster {name} has no endpoint at {pinned[1]}, the headless Service's address dialled")
                return
        else:
            endpoints = cluster.healthy_endpoints(self.reactor.seconds())
            if not endpoints:
                _Tunnel(self.reactor, conn, held, name).refuse("UH", f"cluster {name} has no endpoints")
                return
            ctx = TcpContext("outbound", conn.source_address, None, conn.start, dst[1], server_name)
            ctx.route, ctx.cluster = action, name
            endpoint = conn.listener.pick_endpoint(ctx=ctx, cluster=cluster, endpoints=endpoints) or endpoints[0]
        breaker = cluster.breaker  # None for a cluster without limits: one test per connection
        if breaker is not None and not breaker.admit_connection():
            _Tunnel(self.reactor, conn, held, name).refuse(
                "UO", f"upstream overflow: cluster {name} has {breaker.connections} connections (maxConnections "
                      f"{breaker.limits.max_connections}); raise the DestinationRule's connectionPool.tcp."
                      "maxConnections if this load is expected")
            return
        if chain.idle_timeout is not None:
            conn.set_idle_timeout(chain.idle_timeout)
        tunnel = _OutboundTunnel(self.reactor, conn, held, cluster.spec, endpoint, cluster)
        if chain.max_duration:
            tunnel.end_after(conn.start + chain.max_duration - self.reactor.seconds())
        tunnel.connect_endpoint(endpoint.pool)


class InboundTcp:
    """The inbound side of a TCP app port, and the TCP authorization of the inbound listener.

    :param hooks: the plugin manager's ``hook`` relay (``mesh_authorize`` is bound on first use,
        when every plugin is registered).
    :param connect_timeout: seconds to connect to the app.
    """

    def __init__(self, reactor, runtime, hooks, app_address, app_port, connect_timeout=10.0):
        self.reactor = reactor
        self.runtime = runtime
        self._hooks = hooks
        self._authorize = None
        self.app_address = app_address
        self.app_port = app_port
        self.cluster = f"inbound|{app_port}||"
        self.connect_timeout = connect_timeout

    def accept(self, conn):
        """Authorize a connection to the app port, then splice it to the app (or close it: ``RBAC``)."""
        tunnel = _Tunnel(self.reactor, conn, conn.held, self.cluster)
        policy = self.authorize(conn, self.app_port)
        if policy is not None:
            tunnel.refuse("RBAC", f"denied by AuthorizationPolicy ({rbac_details(policy)})")
            return
        tunnel.connect(self.app_address, self.app_port, self.connect_timeout)

    def authorize(self, conn, port) -> str | None:
        """``mesh_authorize`` for a TCP connection to ``port``: the denying policy's name, or None if allowed."""
        authorize = self._authorize
        if authorize is None:
            authorize = self._authorize = fast_caller(self._hooks.mesh_authorize)
        ctx = TcpContext("inbound", conn.source_address, conn.peer, conn.start, port)
        for allowed, policy in authorize(ctx=ctx, peer=ctx.peer, policies=self.runtime.snapshot.config.tcp_authz):
            if not allowed:
                return policy or NO_ALLOW_MATCHED
        return None


def _address(ip: str):
    """``ip`` as an :mod:`ipaddress` address (None if it is none), for subnet matches."""
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        return None
