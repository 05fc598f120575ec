"""The listener stage: what every connection of one listening port shares.

A :class:`Listener` admits connections and bundles the direction (inbound or outbound), the router,
the limits, the bound hook callers and the set of open connections, and runs
the once-a-second timer sweep over those connections.  Near its connection
limit it closes the connections idle the longest to admit new ones
(:mod:`mesh.proxy.overload`).

A connection in the set provides ``last_activity`` (reactor seconds),
``check_timers(now)``, ``is_idle()``, ``drain()`` and ``abort()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.task import LoopingCall

from mesh.plugins import PluginError, fast_caller
from mesh.proxy.codec.http1_server import normalise_host
from mesh.proxy.mtls import inbound_peer
from mesh.proxy.overload import ConnectionOverload
from mesh.proxy.paths import normalize_base
from mesh.proxy.sockets import lean_dispatch


@dataclass(frozen=True)
class Limits:
    """Per-listener limits and timers (seconds, bytes).

    ``max_request_body`` 0 means no limit (bodies stream; only the retry
    buffer is held in memory, up to ``retry_buffer`` bytes).  The ``http2_``
    fields are the SETTINGS of an HTTP/2 connection (:mod:`mesh.proxy.codec.h2_server`):
    streams in flight at once, and the flow-control windows of a stream and of the
    whole connection (Envoy's recommendations for untrusted clients).
    ``retry_budget_percent`` and ``retry_budget_min_concurrency`` are every
    cluster's retry budget (:class:`mesh.proxy.retry.RetryBudget`, Envoy's defaults).
    """

    max_header_bytes: int = 60 * 1024
    max_headers: int = 100
    max_request_body: int = 0
    max_connections: int = 4096
    max_pipeline: int = 16
    header_timeout: float = 10.0
    idle_timeout: float = 300.0
    retry_buffer: int = 1024 * 1024
    retry_budget_percent: float = 20.0
    retry_budget_min_concurrency: int = 3
    http2_max_concurrent_streams: int = 100
    http2_initial_stream_window: int = 64 * 1024
    http2_initial_connection_window: int = 1024 * 1024


class Listener:
    """Shared state of one port.

    :param direction: ``"outbound"`` or ``"inbound"``.
    :param router: an object with ``route(ctx) -> (RouteAction, Cluster)`` that
        raises :class:`mesh.proxy.outcome.LocalReply` to refuse.
    :param hooks: the plugin manager's ``hook`` relay.
    :param own_identity: ``() -> SPIFFE id or None`` of this workload, for
        the ``By=`` part of x-forwarded-client-cert.
    :param passthrough: a :class:`mesh.proxy.passthrough.Passthrough` that
        sniffs captured connections, or None (HTTP only).
    :param normalize_path: the path normalization of ``--path-normalization``
        (a function of :mod:`mesh.proxy.paths`), applied to every request.
    """

    #: The ``x-forwarded-proto`` every forwarded request gets, replacing the client's, on a gateway's
    #: listener (``b"https"`` where it terminates TLS), which also appends the client's address to
    #: x-forwarded-for: Envoy's rule with ``use_remote_address`` and no trusted hops, Istio's gateways.
    #: None on a sidecar, which forwards x-forwarded-for as received and adds an x-forwarded-proto only
    #: to a request without one (:func:`mesh.proxy.exchange._forwarded_headers`).
    forwarded_proto = None

    def __init__(self, reactor, direction, router, limits, hooks, own_identity=None, passthrough=None,
                 normalize_path=normalize_base):
        self.reactor = reactor
        self.normalize_path = normalize_path
        self.passthrough = passthrough
        self.direction = direction
        self.router = router
        self.limits = limits
        self._hooks = hooks
        self.pick_endpoint = hooks.mesh_pick_endpoint
        self.retry_decision = hooks.mesh_retry_decision
        self.request_headers = hooks.mesh_request_headers
        #: mesh_response_headers, or None while no plugin implements it (the exchange tests that first)
        self.response_headers = None
        self._complete_hook = hooks.mesh_request_complete
        self._open_hook = None  # mesh_connection_open / _complete, or None when no plugin implements them
        self._closed_hook = None
        self._own_identity = own_identity
        self.connections = set()
        self.overload = ConnectionOverload(direction, limits.max_connections)
        self._hosts = {}
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor

    def start(self):
        """Bind the hooks (every plugin is registered by now), make the reactor's event dispatch lean
        (:func:`mesh.proxy.sockets.lean_dispatch`) and start the timer sweep."""
        self.bind_hooks()
        lean_dispatch(self.reactor)
        self._sweeper.start(1.0, now=False)

    def bind_hooks(self):
        """Call the hooks' implementations directly from now on (see :func:`fast_caller`)."""
        hooks = self._hooks
        self.pick_endpoint = fast_caller(hooks.mesh_pick_endpoint)
        self.retry_decision = fast_caller(hooks.mesh_retry_decision)
        self.request_headers = fast_caller(hooks.mesh_request_headers)
        self.response_headers = _implemented(hooks.mesh_response_headers)
        self._complete_hook = fast_caller(hooks.mesh_request_complete)
        self._open_hook = _implemented(hooks.mesh_connection_open)
        self._closed_hook = _implemented(hooks.mesh_connection_complete)
        self.router.bind_hooks(hooks)

    def stop(self):
        if self._sweeper.running:
            self._sweeper.stop()

    def host_of(self, authority: bytes) -> str:
        """Normalised host for an authority, cached (bounded)."""
        host = self._hosts.get(authority)
        if host is None:
            if len(self._hosts) > 4096:
                self._hosts.clear()
            host = self._hosts[authority] = normalise_host(authority)
        return host

    def tls_peer(self, transport):
        """``(peer SPIFFE id, headers to forward)`` for a verified mTLS connection."""
        own = self._own_identity() if self._own_identity is not None else None
        peer, xfcc = inbound_peer(own, transport)
        return peer, (((b"x-forwarded-client-cert", xfcc),) if xfcc else ())

    def request_complete(self, ctx, outcome) -> None:
        """Run ``mesh_request_complete``; a failing plugin never breaks the data path."""
        try:
            self._complete_hook(ctx=ctx, outcome=outcome)
        except PluginError:
            pass  # mesh.plugins.failures has logged it; the response has gone already

    def report_open(self, connection) -> None:
        """Run ``mesh_connection_open`` for a connection whose protocol is known (once per connection).

        ``connection`` provides :class:`mesh.api.ConnectionView`.  An HTTP
        connection is reported when it is accepted (a captured one when the
        detect stage has decided), a TCP tunnel when it is spliced, or refused
        or failed (then :meth:`report_complete` follows at once).
        """
        connection.reported = True
        hook = self._open_hook
        if hook is not None:
            try:
                hook(connection=connection)
            except PluginError:
                pass  # mesh.plugins.failures has logged it; the connection goes on

    def report_complete(self, connection) -> None:
        """Run ``mesh_connection_complete`` once for a connection :meth:`report_open` reported."""
        if not connection.reported:
            return
        connection.reported = False
        connection.duration = self.reactor.seconds() - connection.start
        hook = self._closed_hook
        if hook is not None:
            try:
                hook(connection=connection)
            except PluginError:
                pass

    def admit(self) -> bool:
        """Whether a new connection may be accepted; near the limit, idle ones make room first."""
        connections = self.connections
        return len(connections) < self.overload.high_water or self.overload.make_room(connections)

    def connection_opened(self, connection):
        self.connections.add(connection)

    def connection_closed(self, connection):
        self.connections.discard(connection)

    def _sweep(self):
        now = self.reactor.seconds()
        for connection in list(self.connections):
            connection.check_timers(now)
        self.overload.tick(len(self.connections))


def _implemented(caller):
    """A :func:`fast_caller` of ``caller``, or None when no plugin implements the hook: the hot path
    then pays one ``is not None`` test instead of a call."""
    return fast_caller(caller) if caller.get_hookimpls() else None
