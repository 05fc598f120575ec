"""The mirror stage: Istio's ``mirror``/``mirrors`` (Envoy's ``request_mirror_policies``).

A route with mirrors (``RouteExtras.mirrors``: ``(cluster name, fraction)`` pairs) goes through the
route-actions stage, which calls :func:`start` once the request is forwarded.  For each mirror chosen
(a fraction of the requests, decided per request and per mirror) a copy of the forwarded request goes
to an endpoint of the mirror's cluster, through the same pools as any try, fire and forget:

- its Host (``:authority``) gets Envoy's ``-shadow`` suffix (``reviews:9080`` -> ``reviews-shadow:9080``);
- its response is read and discarded; it never changes the primary's response, status or latency;
- it is never retried, and its failures are counted (:data:`STATS`), never logged per request;
- its body is the primary's, sent once complete, and only up to :data:`MIRROR_BODY_LIMIT` bytes:
  a bigger body abandons the copy (counted), so a mirror never holds more than that in memory and
  never back-pressures the client (the exchange keeps the body for replay anyway, up to the
  retry buffer);
- at most :data:`MAX_IN_FLIGHT` copies are outstanding in a process; beyond that, and for a mirror
  cluster with no endpoint, the copy is abandoned; a copy lasts at most the route's timeout, or
  :data:`MIRROR_TIMEOUT` without one, so a slow mirror cannot pile up connections.
"""

from __future__ import annotations

import dataclasses
import random

from mesh.plugins import PluginError

#: Largest request body a mirror copies (the body is held until complete; bigger: abandoned).
MIRROR_BODY_LIMIT = 64 * 1024
#: Most mirror copies outstanding at once, per process.
MAX_IN_FLIGHT = 256
#: How long a copy may last when the route has no timeout (seconds; Envoy's default route timeout).
MIRROR_TIMEOUT = 15.0


@dataclasses.dataclass
class MirrorStats:
    """Counters of the mirror stage: copies ``sent`` (connected and written), ``completed`` (a whole
    response came back), ``failed`` (connect failure, reset or timeout) and ``abandoned`` (not sent:
    body too big, no endpoint, too many in flight, or the request ended first).  The metrics port
    exports them (``mesh_mirror_requests_*``, :mod:`mesh.telemetry.health`)."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    abandoned: int = 0
    in_flight: int = 0


#: The process's mirror counters.
STATS = MirrorStats()


def start(exchange, action, mirrors) -> None:
    """Mirror the request of ``exchange``, just forwarded with ``action``, to the chosen ``mirrors``."""
    copies = []
    for name, fraction in mirrors:
        if fraction >= 1.0 or random.random() < fraction:
            copies.append(name)
    if not copies:
        return
    ctx = exchange.ctx
    if exchange.framing == "length" and exchange.content_length > MIRROR_BODY_LIMIT:
        abandon(copies)
        return
    clusters = exchange.listener.router.runtime.snapshot.clusters
    shadow = dataclasses.replace(action, rewrite_authority=shadow_host(action.rewrite_authority or ctx.authority))
    pending = [_MirrorRequest(exchange, shadow, clusters.get(name)) for name in copies]
    if exchange.body_done:
        send(exchange, pending)
    else:
        exchange.mirror = pending  # Exchange.request_end calls send


def send(exchange, pending) -> None:
    """The request body of ``exchange`` is complete: send the ``pending`` copies, or abandon them."""
    body_size = exchange.ctx.bytes_received
    if body_size > MIRROR_BODY_LIMIT or (body_size and exchange.body_size != body_size):
        abandon(pending)  # too big, or the exchange no longer holds all of it
        return
    body = b"".join(exchange.body_chunks)
    for request in pending:
        request.send(body)


def abandon(pending) -> None:
    """Count the ``pending`` copies as abandoned: they will never be sent (their body is too big or not
    held whole, or the client went before it was complete)."""
    STATS.abandoned += len(pending)


def shadow_host(authority: bytes) -> bytes:
    """Envoy's shadow Host: ``-shadow`` after the host name, before any port."""
    colon = authority.rfind(b":")
    if colon < 0 or authority.endswith(b"]"):
        return authority + b"-shadow"
    return authority[:colon] + b"-shadow" + authority[colon:]


class _MirrorRequest:
    """One copy of a request: what the upstream codecs read to write its head (the attributes of an
    exchange they use), and the owner of its connection (the events of a try)."""

    __slots__ = ("ctx", "action", "framing", "content_length", "upgrade", "extra_headers", "prepared",
                 "head_only", "cluster", "listener", "connection", "timer", "keep_alive", "done", "body")

    def __init__(self, exchange, action, cluster):
        self.ctx = exchange.ctx
        self.action = action
        self.framing = None if exchange.framing is None else "length"
        self.content_length = 0
        self.upgrade = False
        self.extra_headers = exchange.extra_headers
        self.prepared = None
        self.head_only = exchange.head_only
        self.cluster = cluster
        self.listener = exchange.listener
        self.connection = None
        self.timer = None
        self.keep_alive = False
        self.done = False
        self.body = b""

    def send(self, body: bytes) -> None:
        """Connect to an endpoint of the mirror cluster and send the copy with ``body``."""
        cluster = self.cluster
        endpoints = cluster.healthy_endpoints(self.listener.reactor.seconds()) if cluster is not None else ()
        if not endpoints or STATS.in_flight >= MAX_IN_FLIGHT:
            STATS.abandoned += 1
            return
        try:
            endpoint = self.listener.pick_endpoint(ctx=self.ctx, cluster=cluster, endpoints=endpoints) or endpoints[0]
        except PluginError:  # mesh.plugins logged it once; the primary request goes on
            STATS.abandoned += 1
            return
        self.content_length = len(body)
        self.body = body
        STATS.in_flight += 1
        self.timer = self.listener.reactor.callLater(self.action.timeout or MIRROR_TIMEOUT, self._timed_out)
        pool = endpoint.pool.h2 if cluster.h2_always else endpoint.pool
        connection = pool.acquire()
        if connection is not None:
            self._connected(connection)
        else:
            pool.connect().addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection) -> None:
        if self.done:
            connection.pool.release(connection)
            return
        self.connection = connection
        connection.send_request(self, self)
        if self.body:
            connection.send_body(self.body)
        if self.framing is not None:
            connection.send_end()
        self.body = b""
        STATS.sent += 1

    def _connect_failed(self, failure) -> None:
        if not self.done:
            self._finish(False, failed=True)

    def _timed_out(self) -> None:
        self.timer = None
        self._finish(False, failed=True)

    def _finish(self, reusable: bool, failed: bool = False) -> None:
        if self.done:
            return
        self.done = True
        STATS.in_flight -= 1
        if failed:
            STATS.failed += 1
        else:
            STATS.completed += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        connection = self.connection
        if connection is None:
            return
        if reusable:
            connection.pool.release(connection)
        elif connection.listener is self or connection.listener is None:
            connection.detach()

    # -- what the upstream stream reports: the response is discarded -----------------
    def upstream_head(self, status, reason, headers, keep_alive):
        """The mirror's response head: ignored."""
        self.keep_alive = keep_alive

    def upstream_body(self, data):
        """Response body: discarded."""

    def upstream_trailers(self, headers):
        """Response trailers: discarded."""

    def upstream_end(self):
        """The response is complete: the connection goes back to its pool."""
        self._finish(self.keep_alive)

    def upstream_upgraded(self, rest):
        """A mirror never asks to switch protocols: close the connection."""
        self._finish(False, failed=True)

    def upstream_flush(self):
        """Nothing downstream to flush."""

    def upstream_lost(self, reason_text, refused=None):
        """The connection broke before the response ended: counted, never retried."""
        self._finish(False, failed=True)
