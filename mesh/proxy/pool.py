"""Per-endpoint pools of idle keep-alive upstream connections."""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory

from mesh.proxy.codec.http1_client import UpstreamConnection


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
        connection = UpstreamConnection(self.pool, self.pool.identity if self.pool.tls else None)
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


class ConnectionPool:
    """Idle connections to one endpoint, most recently used first.

    ``identity`` is the SPIFFE id the endpoint must present; when it is set
    connections are mTLS through ``tls`` (a
    :class:`mesh.proxy.mtls.UpstreamTLS`), which may refuse with a reason.
    ``bind`` is the local source address of new connections (None: any).
    ``max_requests_per_connection`` (DestinationRule
    ``connectionPool.http.maxRequestsPerConnection``; 0: unlimited) closes a
    connection instead of pooling it once it has carried that many requests.
    ``idle_timeout`` (``connectionPool.http.idleTimeout``) closes pooled
    connections idle for longer; they are found when the pool is next used.
    Over mTLS, the TLS session of each new connection is kept after its first
    response, so that the next new connection resumes it (``tls.keep_session``).
    """

    def __init__(self, reactor, address, port, connect_timeout=10.0, max_idle=64,
                 tls=None, identity=None, bind=None, max_requests_per_connection=0, idle_timeout=3600.0):
        self.reactor = reactor
        self.address = address
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.identity = identity
        self.tls = tls if identity is not None else None
        self.peer = (address, port, identity)  # whom the TLS sessions are kept for
        self.bind = (bind, 0) if bind else None
        self.max_requests_per_connection = max_requests_per_connection
        self.idle_timeout = idle_timeout
        self._idle = []
        self._open = set()
        self.opened_total = 0  # connections made, ever (mesh_upstream_cx_opened_total)

    def idle_count(self) -> int:
        return len(self._idle)

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
            factory = self.tls.wrap(factory, self.peer)
        self.reactor.connectTCP(self.address, self.port, factory, timeout=self.connect_timeout,
                                bindAddress=self.bind)
        return deferred

    def release(self, connection) -> None:
        """Return a connection whose response is complete and reusable."""
        if connection.requests_sent == 1 and self.tls is not None:
            self.tls.keep_session(self.peer, connection.transport)
        limit = self.max_requests_per_connection
        if connection.connected_ok and len(self._idle) < self.max_idle and not (
                limit and connection.requests_sent >= limit):
            now = connection.last_used = self.reactor.seconds()
            idle = self._idle
            if idle and idle[0].last_used < now - self.idle_timeout:
                self.close_idle(older_than=now - self.idle_timeout)
            self._idle.append(connection)
        else:
            connection.transport.loseConnection()

    def close_idle(self, older_than=None) -> None:
        """Close idle connections (all, or those idle since before ``older_than``)."""
        keep = []
        for connection in self._idle:
            if older_than is not None and connection.last_used >= older_than:
                keep.append(connection)
            elif connection.connected_ok:
                connection.transport.loseConnection()
        self._idle = keep

    # -- called by UpstreamConnection ---------------------------------------
    def connection_made(self, connection) -> None:
        self.opened_total += 1
        self._open.add(connection)
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
        if connection in self._idle:
            self._idle.remove(connection)
