"""Traffic the mesh does not know: Istio's PassthroughCluster and BlackHoleCluster.

With transparent capture every outbound TCP connection of a pod reaches the
sidecar, not only HTTP to mesh services.  As Istio's ``outboundTrafficPolicy``
(docs/operations.md, "Transparent capture"):

- ``ALLOW_ANY`` (the default): a captured connection that is not HTTP (a TLS
  ClientHello to an external API, a database protocol) is spliced as a raw TCP
  tunnel to its original destination; plain HTTP whose Host and original
  destination match nothing in the registry goes to the original destination
  through a plaintext cluster named ``PassthroughCluster``.
- ``REGISTRY_ONLY``: such HTTP gets 502 (cluster ``BlackHoleCluster``, flag
  ``UH``) and such TCP connections are closed, with a log line.

A captured connection to a TCP, TLS or HTTPS port of a mesh service is not passed
through: :mod:`mesh.proxy.tcp_proxy` routes it (VirtualService ``tcp``/``tls``
routes, mTLS to the peer sidecar).  One that none of the port's routes matches (a TLS
server name that no ServiceEntry has) comes back here, as to Istio's passthrough filter
chain: tunnelled to its destination under ``ALLOW_ANY``, closed (``BlackHoleCluster``)
under ``REGISTRY_ONLY`` whatever its address.

Only connections that iptables redirected meet the detect stage (:mod:`mesh.proxy.detect`);
an app that calls the sidecar itself never pays for any of this.  The inbound
listener passes captured plaintext that is not HTTP to the app's port that was
dialled (Istio's inbound passthrough), when PeerAuthentication allows
plaintext and the AuthorizationPolicies, evaluated for TCP, allow the
connection (a denied one is closed, flag ``RBAC``).

The tunnel takes the client connection over through the server codec's
public splice (:meth:`mesh.proxy.codec.http1_server.DownstreamConnection.splice`,
which the WebSocket tunnel uses too: producers registered both ways, idle
timeout) and adds TCP half-close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mesh.config.tables import (
    BLACKHOLE_CLUSTER,
    INBOUND_PASSTHROUGH_CLUSTER,
    PASSTHROUGH_CLUSTER,
    UPSTREAM_CLIENT,
    ClusterSpec,
    EndpointSpec,
    RouteAction,
)
from mesh.proxy.clusters import Cluster, Endpoint
from mesh.proxy.outcome import LocalReply
from mesh.proxy.pool import describe_connect_failure
from mesh.proxy.runtime import rbac_details
from mesh.proxy.sockets import set_nodelay

log = Logger()

ALLOW_ANY, REGISTRY_ONLY = "ALLOW_ANY", "REGISTRY_ONLY"
OUTBOUND_TRAFFIC_POLICIES = (ALLOW_ANY, REGISTRY_ONLY)


@dataclass(frozen=True)
class PassthroughSettings:
    """``--outbound-traffic-policy``, ``--protocol-detection-timeout``,
    ``--passthrough-connect-timeout`` and ``--max-passthrough-connections``
    (open TCP tunnels per listener); seconds."""

    outbound_traffic_policy: str = ALLOW_ANY
    detection_timeout: float = 0.5
    connect_timeout: float = 10.0
    max_connections: int = 1024


class Refusal(NamedTuple):
    """Why a passthrough tunnel is not opened: the ``cluster`` and response ``flag`` reported, and the log's words."""

    cluster: str
    why: str
    flag: str


class PassthroughClusters:
    """HTTP to an original destination the registry does not know: a plaintext cluster per ``ip:port``.

    Clusters are made on first use and kept (up to ``size``; the oldest goes,
    its idle connections closed), so keep-alive connections are reused.
    ``pool_factory(endpoint_spec, cluster_spec)`` is the proxy's own.
    """

    ALLOW = RouteAction(name="allow_any", clusters=(PASSTHROUGH_CLUSTER,), cumulative_weights=(1,))
    BLOCK = RouteAction(name="block_all", clusters=(BLACKHOLE_CLUSTER,), cumulative_weights=(1,))

    def __init__(self, policy, pool_factory, connect_timeout=10.0, size=256):
        self.policy = policy
        self._pool_factory = pool_factory
        self._connect_timeout = connect_timeout
        self._size = size
        self._clusters = {}

    def route(self, ctx, dst, policy):
        """``(RouteAction, Cluster)`` for a request to ``dst``; :class:`LocalReply` 502 when ``policy`` (the
        outbound traffic policy in force, :meth:`mesh.proxy.runtime.OutboundRouter.outbound_traffic_policy`)
        is REGISTRY_ONLY."""
        if policy == REGISTRY_ONLY:
            ctx.route, ctx.cluster = self.BLOCK, BLACKHOLE_CLUSTER
            raise LocalReply(502, "UH", f"{dst[0]}:{dst[1]} (Host '{ctx.host}') is not in the mesh registry and "
                             "this sidecar's outbound traffic policy is REGISTRY_ONLY; add a ServiceEntry for it, "
                             "or run the sidecar with --outbound-traffic-policy ALLOW_ANY")
        cluster = self._clusters.get(dst)
        if cluster is None:
            cluster = self._clusters[dst] = self._new(dst)
        return self.ALLOW, cluster

    def _new(self, dst):
        if len(self._clusters) >= self._size:
            oldest = next(iter(self._clusters))
            for endpoint in self._clusters.pop(oldest).endpoints:
                endpoint.pool.close_idle()
        endpoint_spec = EndpointSpec(dst[0], dst[1])
        # the downstream request's protocol upstream, as Istio's PassthroughCluster: h2c stays HTTP/2
        spec = ClusterSpec(name=PASSTHROUGH_CLUSTER, service=PASSTHROUGH_CLUSTER, port=dst[1],
                           endpoints=(endpoint_spec,), connect_timeout=self._connect_timeout,
                           upstream_protocol=UPSTREAM_CLIENT)
        return Cluster(spec, [Endpoint(endpoint_spec, self._pool_factory(endpoint_spec, spec))])


class Passthrough:
    """TCP tunnels for the captured connections of one listener that the detect stage found not HTTP.

    :param cluster: the cluster name the tunnels report (``PassthroughCluster``
        or ``InboundPassthroughClusterIpv4``).
    :param target: ``(original ip, port) -> (ip, port)`` to connect to.
    :param refusal: ``(original ip, port), connection, unrouted -> Refusal`` when the tunnel
        must not be opened (REGISTRY_ONLY, authorization), else None; ``unrouted`` is why
        ``routes`` passed the connection on (see :meth:`open_tunnel`), or None.
    :param bind: source address of the tunnels' connections (None: any).
    :param routes: a :class:`mesh.proxy.tcp_proxy.OutboundTcp` that takes the
        connections to a TCP service port (routed, not detected nor passed through), or None.

    Each tunnel is reported to ``mesh_connection_open`` and
    ``mesh_connection_complete`` (protocol ``"tcp"``, with its ``cluster`` and
    ``response_flags``) when it is spliced and when it ends, or both at once
    when it is refused or fails to connect: Istio's TCP metrics
    (:mod:`mesh.telemetry.istio`) and the access log (:mod:`mesh.telemetry.accesslog`)
    are such hook implementations.
    """

    def __init__(self, reactor, settings, direction, cluster, target, refusal, bind=None, routes=None):
        self.reactor = reactor
        self.settings = settings
        self.direction = direction
        self.cluster = cluster
        self._target = target
        self._refusal = refusal
        self._bind = (bind, 0) if bind else None
        self._routes = routes
        self.open = 0
        self.opened_total = 0
        self.refused_total = 0
        self.failed_total = 0
        self._detecting = {}  # client (host, port) -> _Detector, until its tunnel is up
        self._local_ends = {}  # local (host, port) of each open tunnel's upstream socket -> TcpUpstream

    def detecting(self, detector) -> bool:
        """The detect stage starts on a captured connection from ``detector.client``.

        False when there is nothing to detect: the client is this sidecar's
        own tunnel, captured and come back (a capture loop: both connections
        are closed), or the destination is a TCP, TLS or HTTPS service port,
        which is routed at once (a declared protocol is never sniffed, as in
        Istio: a server-first protocol does not wait for the detection timeout).
        """
        looped = self._local_ends.get(detector.client)
        if looped is not None:
            self._loop(looped, detector.conn)
            return False
        conn = detector.conn
        if self._routes is not None and self._routes.take(conn, conn.original_dst, detector.take_buffer, self):
            return False
        self._detecting[detector.client] = detector
        return True

    def describe(self) -> dict:
        """Counters for the admin's /config_dump."""
        return {"cluster": self.cluster, "open": self.open, "opened_total": self.opened_total,
                "refused_total": self.refused_total, "failed_total": self.failed_total}

    # -- tunnels ---------------------------------------------------------------------------
    def open_tunnel(self, detector, unrouted=None):
        """The client does not speak HTTP: connect to its destination (or refuse).

        ``unrouted`` says why a connection to a TCP, TLS or HTTPS service port matched none of its
        routes (a TLS server name that no ServiceEntry has): it is passed through as well, unless
        the policy refuses it (see :func:`outbound_passthrough`).
        """
        conn = detector.conn
        conn.become_tunnel()
        dst = conn.original_dst
        refusal = self._refusal(dst, conn, unrouted)
        if refusal is None and self.open >= self.settings.max_connections:
            refusal = Refusal(self.cluster, f"{self.open} passthrough connections are open (the limit); raise "
                                            "--max-passthrough-connections if this is expected", flag="UO")
        if refusal is not None:
            cluster, why, flag = refusal
            self.refused_total += 1
            log.warn("{direction} TCP connection from {client} to {dst} closed: {why}", direction=self.direction,
                     client=conn.source_address, dst=_host_port(dst), why=why)
            self._forget(detector)
            self._report(detector, 1, 1, cluster, flag)
            conn.abort()
            return
        host, port = self._target(dst)
        self.open += 1
        detector.connector = self.reactor.connectTCP(host, port, _TunnelFactory(self, detector),
                                                     timeout=self.settings.connect_timeout, bindAddress=self._bind)

    def connect_failed(self, detector, reason):
        self.open -= 1
        self._forget(detector)
        conn = detector.conn
        if conn.closing:  # the client left while connecting (Detector.loseConnection cancelled it)
            self._report(detector, 1, 1, self.cluster, "DC")
            return
        self.failed_total += 1
        log.warn("{direction} TCP passthrough from {client} to {dst} failed: {why}; the client's connection "
                 "is closed", direction=self.direction, client=conn.source_address,
                 dst=_host_port(self._target(conn.original_dst)), why=describe_connect_failure(reason))
        conn.abort()
        self._report(detector, 1, 1, self.cluster, "UF")

    def connected(self, upstream):
        """The tunnel's connection is up: splice it to the client, or stop a capture loop."""
        local = upstream.transport.getHost()
        looped = self._detecting.get((local.host, local.port))
        if looped is not None:
            self._loop(upstream, looped.conn)
            return False
        self._local_ends[(local.host, local.port)] = upstream
        self.opened_total += 1
        self._forget(upstream.detector)
        self._report(upstream.detector, 1, 0, self.cluster, "", upstream=upstream.address)
        return True

    def closed(self, upstream, flags):
        local = upstream.local
        if local is not None and self._local_ends.get(local) is upstream:
            del self._local_ends[local]
        self.open -= 1
        self._report(upstream.detector, 1 if upstream.local is None else 0, 1, self.cluster, flags,
                     upstream.sent, upstream.received, upstream.address)

    def _loop(self, upstream, conn):
        log.error("the sidecar's own passthrough connection to {dst} was captured and came back to it; the proxy "
                  "must run as the UID that `meshctl iptables --proxy-uid` exempts (connection closed)",
                  dst=_host_port(conn.original_dst))
        conn.abort()
        upstream.transport.abortConnection()

    def forget(self, detector):
        """``detector`` has decided (or its client left): it is no longer detecting."""
        self._forget(detector)

    def _forget(self, detector):
        if self._detecting.get(detector.client) is detector:
            del self._detecting[detector.client]

    def _report(self, detector, opened, closed, cluster, flags, sent=0, received=0, upstream=None):
        report(detector.conn, opened, closed, cluster, flags, sent, received, upstream)


def report(conn, opened, closed, cluster, flags, sent=0, received=0, upstream=None):
    """Tell the connection hooks about a TCP tunnel (``mesh_connection_open``/``_complete``, through the listener).

    ``opened``/``closed`` are 1 or 0: (1, 0) the tunnel is spliced, (0, 1)
    it ended, (1, 1) it ended without ever being spliced (refused, failed
    to connect, or the client left while it connected).  ``sent`` is
    destination -> client bytes, ``received`` client -> destination.
    """
    conn.tunnel_state(cluster, flags, upstream)
    if opened:
        conn.listener.report_open(conn)
    if closed:
        conn.tunnel_state(cluster, flags, upstream, sent, received)
        conn.listener.report_complete(conn)


class _TunnelFactory(ClientFactory):
    noisy = False

    def __init__(self, passthrough, detector):
        self.passthrough = passthrough
        self.detector = detector

    def buildProtocol(self, addr):
        return TcpUpstream(self.passthrough, self.detector)

    def clientConnectionFailed(self, connector, reason):
        self.passthrough.connect_failed(self.detector, reason)


@implementer(IHalfCloseableProtocol)
class TcpUpstream(Protocol):
    """The tunnel's connection to the destination, spliced to the client's connection.

    Once spliced it is the codec's ``tunnel``: ``write`` carries the client's
    bytes, ``loseConnection`` means the client half-closed (a FIN, passed on)
    or went away (the tunnel closes).  The destination's FIN is passed on to
    the client the same way.  Over mesh mTLS (TLS 1.3) a FIN is a close_notify,
    which closes only that direction (:mod:`mesh.proxy.tls_transport`); over
    other TLS it ends the TLS connection (after the pending bytes).

    :param owner: told ``connected(upstream) -> bool`` (False: do not splice)
        and ``closed(upstream, flags)``: a :class:`Passthrough`, or a routed
        tunnel of :mod:`mesh.proxy.tcp_proxy`.
    :param detector: holds the client connection (``conn``) and the bytes it
        sent so far (``take_buffer()``).
    """

    def __init__(self, owner, detector):
        self.passthrough = owner
        self.detector = detector
        self.conn = detector.conn
        self.local = None
        self.address = None  # (host, port) connected to
        self.tunnel = None  # set by splice: writes to the client
        self.sent = 0  # destination -> client
        self.received = 0  # client -> destination
        self._read_closed = False
        self._write_closed = False
        self._half_closed = False
        self._spliced = False

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.address = (peer.host, peer.port)
        conn = self.conn
        if conn.closing:
            self.transport.loseConnection()
            return
        if not self.passthrough.connected(self):
            return
        local = self.transport.getHost()
        self.local = (local.host, local.port)
        self._spliced = True
        set_nodelay(self.transport)
        pending = self.detector.take_buffer()
        self.received = len(pending)
        conn.splice(self, self, b"", (pending,))
        if conn.read_closed:
            self.loseConnection()

    # -- the client side (the codec calls these) ----------------------------------------------
    def write(self, data):
        self.received += len(data)
        self.transport.write(data)

    def loseConnection(self):
        if self.conn.closing:
            self.transport.loseConnection()
        elif not self._half_closed:  # the codec may report the client's FIN twice (splice reads again)
            self._half_closed = True
            half_close = getattr(self.transport, "loseWriteConnection", None)
            (half_close or self.transport.loseConnection)()

    # -- the destination side ---------------------------------------------------------------------
    def dataReceived(self, data):
        self.sent += len(data)
        self.tunnel.write(data)

    def readConnectionLost(self):
        self._read_closed = True
        if not self.conn.closing:  # a client connection already closing (or gone) has no write side left
            self.conn.close_write()
        if self._write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        self._write_closed = True
        if self._read_closed:
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        if not self._spliced:
            gone = self.conn.closing
            if not gone:
                self.conn.abort()
            self.passthrough.closed(self, "DC" if gone else "UC")
            return
        if not self.conn.closing:
            self.conn.close()
        self.passthrough.closed(self, "")


def _host_port(dst) -> str:
    return f"{dst[0]}:{dst[1]}" if dst else "?"


def outbound_passthrough(reactor, settings, router, bind=None, routes=None) -> Passthrough:
    """The outbound listener's :class:`Passthrough`: tunnels to the original destination, by the
    outbound traffic policy (``router`` is the :class:`mesh.proxy.runtime.OutboundRouter`), after
    ``routes`` (a :class:`mesh.proxy.tcp_proxy.OutboundTcp`) took those to TCP service ports."""

    def refusal(dst, conn, unrouted):
        """REGISTRY_ONLY refuses a destination outside the registry, and a connection none of its
        port's routes took (an unknown TLS server name), whatever its address, as Istio does."""
        if router.outbound_traffic_policy() == REGISTRY_ONLY and (unrouted or not router.knows(dst)):
            why = unrouted or "the destination is not in the mesh registry"
            return Refusal(BLACKHOLE_CLUSTER, f"{why} and the outbound traffic policy is REGISTRY_ONLY; add a "
                           "ServiceEntry for it, or run the sidecar with --outbound-traffic-policy ALLOW_ANY",
                           flag="UH")
        return None

    return Passthrough(reactor, settings, "outbound", PASSTHROUGH_CLUSTER, _same, refusal, bind, routes)


def _same(dst):
    return dst


def inbound_passthrough(reactor, settings, app_address, authorize) -> Passthrough:
    """The inbound listener's :class:`Passthrough`: tunnels to the app at the port the client dialled.

    ``authorize(conn, port)`` (:meth:`mesh.proxy.tcp_proxy.InboundTcp.authorize`) decides each
    tunnel with the workload's AuthorizationPolicies for TCP, as Istio's RBAC filter of its
    inbound passthrough chain does: the name of the denying policy, or None.
    """

    def refusal(dst, conn, unrouted):  # the inbound side routes nothing: ``unrouted`` is always None
        policy = authorize(conn, dst[1])
        if policy is not None:
            return Refusal(INBOUND_PASSTHROUGH_CLUSTER, f"denied by AuthorizationPolicy ({rbac_details(policy)})",
                           flag="RBAC")
        return None

    return Passthrough(reactor, settings, "inbound", INBOUND_PASSTHROUGH_CLUSTER,
                       lambda dst: (app_address, dst[1]), refusal)
