"""Per-endpoint pools of upstream connections.

An endpoint's :class:`ConnectionPool` keeps its idle keep-alive HTTP/1.1
connections; its :class:`H2Pool` (``pool.h2``) hands out streams on a few
HTTP/2 connections.  A try takes its connection or stream from the one its
cluster and request call for (``Exchange._new_try``; :attr:`mesh.proxy.clusters.Cluster.h2_always`)
and gives it back with ``connection.pool.release(connection)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory

from mesh.config.tables import TcpKeepalive
from mesh.proxy.codec.http1_client import UpstreamConnection
from mesh.proxy.sockets import keep_alive

#: Seconds an endpoint that declined ALPN ``h2`` (an HTTP/1.1-only peer) is spoken to in
#: HTTP/1.1 before HTTP/2 is offered again.
ALPN_RECHECK = 60.0


class ConnectError(Exception):
    """Connecting to an upstream failed (refused, timed out, TLS rejected)."""


class _PoolFactory(ClientFactory):
    """Makes one :class:`UpstreamConnection` and fires a Deferred when it is up."""

    protocol = UpstreamConnection
    noisy = False

    def __init__(self, pool, deferred):
        self.pool = pool
        self.deferred = deferred

    def buildProtocol(self, addr):
        connection = UpstreamConnection(self.pool, self.pool.verify)
        connection.factory = self
        return connection

    def clientConnectionFailed(self, connector, reason):
        if not self.deferred.called:
            self.deferred.errback(ConnectError(describe_connect_failure(reason)))


def describe_connect_failure(reason) -> str:
    """Why a connection attempt failed, in words a user can act on."""
    if reason.check(error.ConnectionRefusedError):
        return "connection refused: the endpoint is down or not listening"
    if reason.check(error.TimeoutError, error.UserError):
        return "connect timeout: the endpoint did not answer"
    return reason.getErrorMessage()


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """What a cluster's DestinationRule ``connectionPool`` sets for the connections to each of its
    endpoints (see :class:`ConnectionPool`); :meth:`of` takes them from a
    :class:`mesh.config.tables.ClusterSpec`.  Clusters share an endpoint's pool only when their
    settings are equal (:class:`mesh.proxy.clusters.ClusterManager`)."""

    connect_timeout: float = 10.0
    max_requests_per_connection: int = 0
    idle_timeout: float = 3600.0
    max_concurrent_streams: int = 0
    keepalive: TcpKeepalive | None = None
    max_connection_duration: float = 0.0

    @classmethod
    def of(cls, cluster_spec) -> PoolSettings:
        return cls(cluster_spec.connect_timeout, cluster_spec.max_requests_per_connection,
                   cluster_spec.idle_timeout or math.inf,
                   cluster_spec.max_concurrent_streams, cluster_spec.tcp_keepalive,
                   cluster_spec.max_connection_duration)


class ConnectionPool:
    """Idle connections to one endpoint, most recently used first.

    ``tls`` wraps connections in TLS, or is None for plaintext: a
    :class:`mesh.proxy.mtls.UpstreamTLS` (mesh mTLS: ``identity`` is the SPIFFE
    id the endpoint must present) or a
    :class:`mesh.proxy.tls_origination.OriginationTLS` (TLS to a server outside
    the mesh); either may refuse with a reason, and gives the check
    (``verify``) a connection passes after its handshake before it is used.
    ``bind`` is the local source address of new connections (None: any).
    ``settings`` (:class:`PoolSettings`, from the cluster; :meth:`configure` when a config push
    changes them) give the attributes below.  ``connect_timeout``
    (``connectionPool.tcp.connectTimeout``) bounds each connect.
    ``max_requests_per_connection`` (DestinationRule
    ``connectionPool.http.maxRequestsPerConnection``; 0: unlimited) closes a
    connection instead of pooling it once it has carried that many requests.
    ``idle_timeout`` (``connectionPool.http.idleTimeout``) closes pooled
    connections idle for longer; they are found when the pool is next used.
    Over mTLS, the TLS session of each new connection is kept after its first
    response, so that the next new connection resumes it (``tls.keep_session``).
    ``max_concurrent_streams`` (``connectionPool.http.maxConcurrentStreams``; 0:
    as the peer allows) caps the streams of each HTTP/2 connection of ``h2``.
    ``counted_by`` maps the connections a cluster's circuit breaker counts to it
    (:mod:`mesh.proxy.circuit`), told when they close.  ``keepalive``
    (``connectionPool.tcp.tcpKeepalive``, a :class:`mesh.config.tables.TcpKeepalive`; None: off)
    turns TCP keepalive on for every connection to the endpoint (:func:`mesh.proxy.sockets.keep_alive`), the TCP
    proxy's too.  ``max_connection_duration`` (``connectionPool.tcp.maxConnectionDuration``;
    seconds, 0: none) ends each HTTP connection that long after it was established, as Envoy's
    ``max_connection_duration``: an idle one is closed then, a busy one takes no new request and
    is closed once its requests are done (HTTP/2: GOAWAY).
    """

    def __init__(self, reactor, address, port, settings=PoolSettings(), max_idle=64, tls=None, identity=None,
                 bind=None):
        self.reactor = reactor
        self.address = address
        self.port = port
        self.max_idle = max_idle
        self.identity = identity
        self.tls = tls
        self.verify = tls.verifier(identity) if tls is not None else None
        self.peer = (address, port, identity)  # whom the TLS sessions are kept for
        self.bind = (bind, 0) if bind else None
        self._idle = []
        self._open = set()  # HTTP/1.1 and HTTP/2 connections
        self.counted_by = {}  # connection -> the CircuitBreaker that counts it until it closes
        self.opened_total = 0  # connections made, ever (mesh_upstream_cx_opened_total)
        self.h2 = H2Pool(self)
        self._lifetimes = {}  # connection -> the DelayedCall of its max_connection_duration
        self.settings = None
        self.configure(settings)

    def configure(self, settings: PoolSettings) -> None:
        """Follow ``settings`` (at the start, and when a config push changes the cluster's): new connections
        and the next uses of pooled ones follow them; idle connections made under other settings are closed."""
        if settings == self.settings:
            return
        if self.settings is not None:
            self.close_idle()
        self.settings = settings
        self.connect_timeout = settings.connect_timeout
        self.max_requests_per_connection = settings.max_requests_per_connection
        self.idle_timeout = settings.idle_timeout
        self.max_concurrent_streams = settings.max_concurrent_streams
        self.keepalive = settings.keepalive
        self.max_connection_duration = settings.max_connection_duration

    def idle_count(self) -> int:
        return len(self._idle) + self.h2.idle_count()

    def open_count(self) -> int:
        return len(self._open)

    def acquire(self):
        """An idle connected connection, or None.

        The most recently used comes first; if it has been idle too long, so
        have all the others, and they are all closed.
        """
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.connected_ok:
                continue
            if connection.last_used >= self.reactor.seconds() - self.idle_timeout:
                return connection
            connection.transport.loseConnection()
            self.close_idle()
            return None
        return None

    def connect(self) -> defer.Deferred:
        """Open a new connection; fires with it, or fails with :class:`ConnectError`."""
        deferred = defer.Deferred()
        factory = _PoolFactory(self, deferred)
        if self.tls is not None:
            refusal = self.tls.refusal()
            if refusal is not None:
                return defer.fail(ConnectError(refusal))
        self.connect_tcp(factory)
        return deferred

    def connect_tcp(self, factory, offer_h2=False):
        """Start a TCP connection to the endpoint for ``factory``, as every connection to it is made (the
        HTTP/1.1 and HTTP/2 pools', the TCP proxy's): behind the pool's TLS if it has one (the caller
        checked its ``refusal()``; ``offer_h2`` offers ALPN ``h2``), with the cluster's connect timeout
        and TCP keepalive, from the workload's address.  Returns the connector."""
        if self.tls is not None:
            factory = self.tls.wrap(factory, self.peer, offer_h2=offer_h2)
        connector = self.reactor.connectTCP(self.address, self.port, factory, timeout=self.connect_timeout,
                                            bindAddress=self.bind)
        if self.keepalive is not None:
            keep_alive(connector, self.keepalive)
        return connector

    def release(self, connection) -> None:
        """Return a connection whose response is complete and reusable."""
        if connection.requests_sent == 1 and self.tls is not None:
            self.tls.keep_session(self.peer, connection.transport)
        limit = self.max_requests_per_connection
        if connection.connected_ok and len(self._idle) < self.max_idle and not (
                limit and connection.requests_sent >= limit) and not connection.expired:
            now = connection.last_used = self.reactor.seconds()
            idle = self._idle
            if idle and idle[0].last_used < now - self.idle_timeout:
                self.close_idle(older_than=now - self.idle_timeout)
            self._idle.append(connection)
        else:
            connection.transport.loseConnection()

    def take_over(self, transport) -> UpstreamConnection:
        """An HTTP/1.1 connection on ``transport``, a TLS connection whose peer is verified
        and declined ALPN ``h2`` (see :meth:`H2Pool.alpn_declined`)."""
        connection = UpstreamConnection(self, self.verify)
        transport.wrappedProtocol = connection
        connection.makeConnection(transport)
        connection.connected_ok = True
        self.counted(connection)
        return connection

    def counted(self, connection) -> None:
        """A new connection (either protocol) is up: count it as open (and start its maximum duration)."""
        self.opened_total += 1
        self._open.add(connection)
        if self.max_connection_duration:
            self._lifetimes[connection] = self.reactor.callLater(self.max_connection_duration, self._expire,
                                                                 connection)

    def _expire(self, connection) -> None:
        """``connection`` reached ``max_connection_duration``: closed now if idle, else once its requests
        are done (an HTTP/1.1 one when it is released, an HTTP/2 one after its last stream)."""
        del self._lifetimes[connection]
        if isinstance(connection, UpstreamConnection):
            connection.expired = True
            if connection in self._idle:
                self._idle.remove(connection)
                connection.transport.loseConnection()
        else:
            connection.retire()

    def close_idle(self, older_than=None) -> None:
        """Close idle connections (all, or those idle since before ``older_than``)."""
        if older_than is None:
            self.h2.close_idle()
        keep = []
        for connection in self._idle:
            if older_than is not None and connection.last_used >= older_than:
                keep.append(connection)
            elif connection.connected_ok:
                connection.transport.loseConnection()
        self._idle = keep

    # -- called by UpstreamConnection ---------------------------------------
    def connection_made(self, connection) -> None:
        self.counted(connection)
        deferred = connection.factory.deferred
        if not deferred.called:
            deferred.callback(connection)

    def connection_failed(self, connection, reason: str) -> None:
        """The connection died or was refused before it became usable."""
        deferred = connection.factory.deferred
        if not deferred.called:
            deferred.errback(ConnectError(reason))

    def connection_lost(self, connection) -> None:
        self._open.discard(connection)
        if self._lifetimes:
            lifetime = self._lifetimes.pop(connection, None)
            if lifetime is not None:
                lifetime.cancel()
        if connection in self._idle:
            self._idle.remove(connection)
        if self.counted_by:
            breaker = self.counted_by.pop(connection, None)
            if breaker is not None:
                breaker.connection_closed()


class _H2Factory(ClientFactory):
    """Connects one :class:`H2UpstreamConnection`, made beforehand with the tries waiting for it."""

    noisy = False

    def __init__(self, connection):
        self.connection = connection

    def buildProtocol(self, addr):
        return self.connection

    def clientConnectionFailed(self, connector, reason):
        self.connection.pool.connection_failed(self.connection, describe_connect_failure(reason))


class H2Pool:
    """The HTTP/2 connections to one endpoint: streams for many tries on few connections.

    ``pool`` is the endpoint's :class:`ConnectionPool`, whose address, TLS,
    limits and connection counters it shares.  A try gets a stream on the
    oldest connection with room (:meth:`acquire`); when none has room, it
    waits for a connection being set up that will have room, or a new one is
    opened (:meth:`connect`).  A connection has room for the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS (capped by ``maxConcurrentStreams``).
    Over mTLS the connections offer ALPN ``h2`` and ``http/1.1``: a peer that
    chooses HTTP/1.1 gets HTTP/1.1 connections from ``pool`` for
    :data:`ALPN_RECHECK` seconds.  Connections without streams for longer than
    ``pool.idle_timeout`` are closed when the pool is next used.
    """

    def __init__(self, pool):
        self.pool = pool
        self.reactor = pool.reactor
        self._ready = []  # connections up and taking streams, oldest first
        self._connecting = []  # connections being set up, each with its ``waiters``
        self.http1_until = 0.0  # the peer declined h2: HTTP/1.1 until then

    def idle_count(self) -> int:
        return sum(1 for connection in self._ready if connection.active == 0)

    def acquire(self):
        """A stream on a connection with room, or None (an HTTP/1.1 connection while the peer declines h2)."""
        if self.http1_until:
            if self.reactor.seconds() < self.http1_until:
                return self.pool.acquire()
            self.http1_until = 0.0
        for connection in self._ready:
            if connection.active < connection.capacity:
                if connection.active == 0 and connection.last_used < self.reactor.seconds() - self.pool.idle_timeout:
                    connection.retire()  # idle too long: closed (and off this list)
                    return self.acquire()
                return connection.open_stream()
        return None

    def connect(self) -> defer.Deferred:
        """A stream on a connection being set up; fires with it, or fails with :class:`ConnectError`."""
        if self.http1_until:
            return self.pool.connect()
        deferred = defer.Deferred()
        for connection in self._connecting:
            if len(connection.waiters) < connection.capacity:
                connection.waiters.append(deferred)
                return deferred
        pool = self.pool
        if pool.tls is not None:
            refusal = pool.tls.refusal()
            if refusal is not None:
                return defer.fail(ConnectError(refusal))
        # Imported at the first HTTP/2 connection: h2, hpack and hyperframe are about 1.3 MiB of RSS that a
        # sidecar speaking only HTTP/1.1 never needs (mesh.proxy.web_http1 keeps Twisted Web from loading them).
        from mesh.proxy.codec.h2_client import H2UpstreamConnection

        connection = H2UpstreamConnection(self, pool.verify, pool.max_concurrent_streams,
                                          pool.max_requests_per_connection)
        connection.waiters.append(deferred)
        self._connecting.append(connection)
        pool.connect_tcp(_H2Factory(connection), offer_h2=True)
        return deferred

    def release(self, stream) -> None:
        """A stream whose response is complete (or that was never used): its place is free."""
        connection = stream.connection
        if connection is None:
            return
        pool = self.pool
        if not connection.session_kept and pool.tls is not None and stream.stream_id is not None:
            connection.session_kept = True
            pool.tls.keep_session(pool.peer, connection.transport)
        connection.stream_done(stream)

    def close_idle(self) -> None:
        """Close the connections that carry no stream."""
        for connection in list(self._ready):
            if connection.active == 0:
                connection.retire()

    # -- called by H2UpstreamConnection ---------------------------------------
    def connection_made(self, connection) -> None:
        """``connection`` is up: it serves the tries waiting for it."""
        self._connecting.remove(connection)
        self._ready.append(connection)
        self.pool.counted(connection)
        connection.last_used = self.reactor.seconds()
        self._serve(connection.waiters, connection)

    def connection_failed(self, connection, reason: str) -> None:
        """``connection`` died or was refused before it became usable."""
        if connection in self._connecting:
            self._connecting.remove(connection)
        waiters, connection.waiters = connection.waiters, []
        for deferred in waiters:
            deferred.errback(ConnectError(reason))

    def connection_retired(self, connection) -> None:
        """``connection`` takes no new streams."""
        if connection in self._ready:
            self._ready.remove(connection)

    def connection_lost(self, connection) -> None:
        self.connection_retired(connection)
        self.pool.connection_lost(connection)

    def alpn_declined(self, connection) -> None:
        """The peer of ``connection`` chose HTTP/1.1: the connection becomes an HTTP/1.1 one, and so do the
        connections to this endpoint for :data:`ALPN_RECHECK` seconds."""
        self.http1_until = self.reactor.seconds() + ALPN_RECHECK
        self._connecting.remove(connection)
        waiters, connection.waiters = connection.waiters, []
        http1 = self.pool.take_over(connection.transport)
        for deferred in waiters[1:]:
            self.pool.connect().chainDeferred(deferred)
        if waiters:
            waiters[0].callback(http1)
        else:
            self.pool.release(http1)

    def _serve(self, waiters, connection) -> None:
        """Give each of ``waiters`` a stream on ``connection``, or on another connection when it is full."""
        connection.waiters = []
        if connection.capacity == 0:  # the peer takes no stream at all: another connection would not either
            connection.retire()
            for deferred in waiters:
                deferred.errback(ConnectError("the endpoint takes no HTTP/2 stream (SETTINGS_MAX_CONCURRENT_STREAMS "
                                              "0); it may be shutting down"))
            return
        for deferred in waiters:
            if connection.has_room():
                deferred.callback(connection.open_stream())
            else:
                self.connect().chainDeferred(deferred)
