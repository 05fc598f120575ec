"""The circuit-breaking stage: a cluster's DestinationRule ``connectionPool`` limits.

Istio programs these as Envoy's circuit breakers, per cluster and per proxy,
and txmesh enforces them the same way (:class:`mesh.config.tables.CircuitLimits`):

- ``http2MaxRequests`` (``max_requests``): a try beyond that many tries in
  flight to the cluster is not made: 503 ``UO``.
- ``tcp.maxConnections`` (``max_connections``): the cluster's HTTP/1.1 tries
  never open more connections; a try that finds no idle connection waits in
  the cluster's pending queue until one closes (or goes idle on its endpoint).
  A routed TCP connection (:mod:`mesh.proxy.tcp_proxy`) to a cluster at the
  limit is closed at once, ``UO``, as Envoy's TCP proxy does
  (:meth:`CircuitBreaker.admit_connection`).
- ``http1MaxPendingRequests`` (``max_pending``): a try beyond that many tries
  waiting for a connection (queued, or connecting) is answered 503 ``UO``.
- ``maxRetries`` (``max_retries``): a retry beyond that many retries in flight
  is not made; the client gets the failure of its last try.

An overflow answer carries ``x-envoy-overloaded: true``, as Envoy's.  The
counters are Envoy's (``upstream_cx_overflow``, ``upstream_rq_pending_overflow``
(a ``max_requests`` overflow counts there too, as in Envoy),
``upstream_rq_retry_overflow``), exported as ``mesh_upstream_*`` metrics.

A cluster without limits has no :class:`CircuitBreaker` (``Cluster.breaker`` is
None) and its tries are plain :class:`mesh.proxy.exchange.Try` objects: the
exchange pays one test per try for this stage.  HTTP/2 tries (streams on a few
shared connections) are bounded by ``max_requests`` only.
"""

from __future__ import annotations

from collections import deque

from mesh.proxy.exchange import Try

#: The header Envoy adds to a reply refused by a circuit breaker.
OVERLOADED = ((b"x-envoy-overloaded", b"true"),)


class CircuitBreaker:
    """The live counts of one limited cluster; kept across config swaps by cluster name.

    ``connections`` counts the HTTP/1.1 connections its tries opened and the
    routed TCP connections to it (connecting or spliced) that are not closed
    yet; ``waiting`` the tries waiting for a connection (those in ``queue``,
    waiting for ``connections`` to drop, and those connecting);
    ``requests`` and ``retries`` the tries and retries in flight.
    """

    __slots__ = ("name", "limits", "connections", "waiting", "queue", "requests", "retries",
                 "cx_overflow", "pending_overflow", "retry_overflow")

    def __init__(self, name, limits):
        self.name = name
        self.limits = limits
        self.connections = 0
        self.waiting = 0
        self.queue = deque()
        self.requests = 0
        self.retries = 0
        self.cx_overflow = 0  # upstream_cx_overflow
        self.pending_overflow = 0  # upstream_rq_pending_overflow
        self.retry_overflow = 0  # upstream_rq_retry_overflow

    def admit(self, exchange):
        """The try class for the exchange's next try, or None when ``max_requests`` refuses it (answered 503)."""
        limit = self.limits.max_requests
        if limit and self.requests >= limit:
            self._overflow(exchange, f"{self.requests} requests in flight (http2MaxRequests {limit})")
            return None
        return LimitedTry

    def retry_allowed(self, ending_retry: bool = False) -> bool:
        """Whether another retry may start (``max_retries``); counts the refusal.

        Asked while the failed try is still open (so that a refused retry leaves it to stream its
        response): ``ending_retry`` says that try is itself a retry, whose place the next one takes.
        """
        limit = self.limits.max_retries
        if limit and self.retries - ending_retry >= limit:
            self.retry_overflow += 1
            return False
        return True

    def connect(self, attempt, pool) -> None:
        """Get ``attempt`` an HTTP/1.1 connection of ``pool`` within the limits: open one, queue, or refuse."""
        limit = self.limits.max_pending
        if limit and self.waiting >= limit:
            self._overflow(attempt.exchange, f"{self.waiting} requests waiting for a connection "
                           f"(http1MaxPendingRequests {limit})")
            return
        self.waiting += 1
        attempt.waiting = True
        limit = self.limits.max_connections
        if limit and self.connections >= limit:
            self.cx_overflow += 1
            self.queue.append((attempt, pool))
        else:
            self._open(attempt, pool)

    def admit_connection(self) -> bool:
        """Count one more TCP-proxied connection if ``max_connections`` allows it; else count the
        overflow and return False.  An admitted connection is released with :meth:`connection_closed`."""
        limit = self.limits.max_connections
        if limit and self.connections >= limit:
            self.cx_overflow += 1
            return False
        self.connections += 1
        return True

    def stop_waiting(self, attempt) -> None:
        """``attempt`` no longer waits for a connection (it got one, failed, or ended)."""
        attempt.waiting = False
        self.waiting -= 1
        for index, (queued, _pool) in enumerate(self.queue):
            if queued is attempt:
                del self.queue[index]
                break

    def connection_closed(self) -> None:
        """A connection this breaker counted has closed: its place goes to the next queued try."""
        self.connections -= 1
        self.serve()

    def serve(self) -> None:
        """Give queued tries an idle connection of their endpoint, or a new one while ``max_connections`` allows."""
        limit = self.limits.max_connections
        queue = self.queue
        while queue:
            attempt, pool = queue[0]
            connection = pool.acquire()
            if connection is None and limit and self.connections >= limit:
                return
            queue.popleft()
            if connection is None:
                self._open(attempt, pool)
            else:
                self.stop_waiting(attempt)
                attempt.reused = True
                attempt.connected(connection)

    def describe(self) -> dict:
        """A JSON-ready view of the limits and counts (admin ``/clusters``)."""
        limits = self.limits
        return {"max_connections": limits.max_connections, "max_pending_requests": limits.max_pending,
                "max_requests": limits.max_requests, "max_retries": limits.max_retries,
                "connections": self.connections, "pending": self.waiting, "requests": self.requests,
                "retries": self.retries, "upstream_cx_overflow": self.cx_overflow,
                "upstream_rq_pending_overflow": self.pending_overflow,
                "upstream_rq_retry_overflow": self.retry_overflow}

    def _open(self, attempt, pool) -> None:
        self.connections += 1
        pool.connect().addCallbacks(self._connected, self._connect_failed,
                                    callbackArgs=(attempt, pool), errbackArgs=(attempt,))

    def _connected(self, connection, attempt, pool) -> None:
        pool.counted_by[connection] = self
        if attempt.waiting:
            self.stop_waiting(attempt)
        attempt.connected(connection)
        if self.queue:  # the try had ended: its connection went idle, for a queued try
            self.serve()

    def _connect_failed(self, failure, attempt) -> None:
        if attempt.waiting:
            self.stop_waiting(attempt)
        self.connection_closed()
        attempt.connect_failed(failure)

    def _overflow(self, exchange, why) -> None:
        self.pending_overflow += 1
        exchange.local_reply(503, "UO", f"upstream overflow: cluster {self.name} has {why}; raise the "
                             "DestinationRule's connectionPool limits if this load is expected", "overflow",
                             OVERLOADED)


class LimitedTry(Try):
    """A :class:`~mesh.proxy.exchange.Try` to a cluster with a :class:`CircuitBreaker`, counted by it."""

    __slots__ = ("breaker", "retry", "waiting")

    def __init__(self, exchange, endpoint, started):
        super().__init__(exchange, endpoint, started)
        self.breaker = breaker = exchange.cluster.breaker
        self.retry = exchange.ctx.attempts > 1
        self.waiting = False
        breaker.requests += 1
        if self.retry:
            breaker.retries += 1

    def connect(self, pool) -> None:
        """HTTP/1.1 connections go through the breaker; HTTP/2 streams (``pool.h2``) do not."""
        if pool is self.endpoint.pool:
            self.breaker.connect(self, pool)
        else:
            super().connect(pool)

    def finish(self, reusable: bool) -> None:
        """End the try and give its place to the next one waiting."""
        if self.done:
            return
        super().finish(reusable)
        breaker = self.breaker
        breaker.requests -= 1
        if self.retry:
            breaker.retries -= 1
        if self.waiting:
            breaker.stop_waiting(self)
        if breaker.queue:
            breaker.serve()
