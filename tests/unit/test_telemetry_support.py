"""Shared helpers of the telemetry unit tests (tests/unit/test_telemetry_*.py); no tests here.

A real :class:`ProxyRuntime` with the bookinfo config compiled for productpage (no sockets: pools
connect only when asked), a credential store whose certificate names productpage, and finished
requests built the way the exchange leaves them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from twisted.internet.task import Clock

from mesh.config.compile import Workload, load_and_compile
from mesh.config.errors import ConfigError
from mesh.identity.tls import CredentialStore
from mesh.proxy.context import RequestContext
from mesh.proxy.mirror import MirrorStats
from mesh.proxy.outcome import RequestOutcome
from mesh.proxy.overload import ConnectionOverload
from mesh.proxy.pool import ConnectionPool
from mesh.proxy.runtime import ProxyRuntime, inbound_cluster
from mesh.telemetry.peers import PeerDirectory

BOOKINFO = Path(__file__).parent.parent / "data" / "config" / "bookinfo"
PRODUCTPAGE = Workload("productpage", "bookinfo", {"app": "productpage", "version": "v1"}, "bookinfo-productpage",
                       app_port=9080)
OWN_ID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
REVIEWS = "reviews.bookinfo.svc.cluster.local"
REVIEWS_CLUSTER = f"outbound|9080||{REVIEWS}"
REVIEWS_V1 = "10.0.0.1:9080"  # labels app=reviews version=v1, mTLS as sa bookinfo-reviews
REVIEWS_V2 = "10.0.0.2:9080"  # labels app=reviews version=v2, plaintext
REVIEWS_ID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"
INBOUND_CLUSTER = "inbound|9080||"
CALLER_ID = "spiffe://cluster.local/ns/shop/sa/frontend"


class Certificate:
    """What telemetry reads of the workload certificate: its identity and its remaining life."""

    def __init__(self, identity=OWN_ID, expires_in=3600.0):
        self.identity = identity
        self._expires_in = expires_in

    def expires_in(self):
        return self._expires_in


def bookinfo_runtime(clock=None) -> ProxyRuntime:
    """productpage's runtime: the bookinfo clusters plus its inbound cluster, config applied."""
    clock = clock or Clock()
    runtime = ProxyRuntime(lambda endpoint, cluster: ConnectionPool(clock, endpoint.address, endpoint.port),
                           (inbound_cluster("127.0.0.1", 9080),))
    runtime.apply(load_and_compile(BOOKINFO, PRODUCTPAGE)[0])
    return runtime


def proxy_like():
    """What telemetry reads of a ProxyService: productpage's runtime at t=1000 s, config applied at
    t=990 s, two client connections on the outbound listener, a certificate valid for two hours, no
    mirror copy yet."""
    clock = Clock()
    clock.advance(1000.0)
    listeners = [SimpleNamespace(direction=direction, connections=connections,
                                 overload=ConnectionOverload(direction, 4096))
                 for direction, connections in (("outbound", {1, 2}), ("inbound", set()))]
    return SimpleNamespace(reactor=clock, runtime=bookinfo_runtime(clock), listeners=listeners,
                           config_applied_at=990.0, credentials=CredentialStore(Certificate(expires_in=7200.0)),
                           mirror_stats=MirrorStats())


def control_like():
    """What telemetry reads of a ControlService: 5 CSRs signed, 3 rejected, 3 config errors, a CA for a day."""
    return SimpleNamespace(
        stats=SimpleNamespace(signed_total=5, rejected_total={"credential rejected": 2, "CSR rejected": 1}),
        config_errors=[ConfigError("a.yaml", 3, "bad", kind="VirtualService"),
                       ConfigError("a.yaml", 9, "bad", kind="VirtualService"), ConfigError("b.yaml", 1, "syntax")],
        ca=SimpleNamespace(expires_in=lambda: 86400.0))


def peers(runtime=None, certificate=None) -> PeerDirectory:
    return PeerDirectory(runtime or bookinfo_runtime(), CredentialStore(certificate or Certificate()))


def outbound(code=200, upstream_host=REVIEWS_V1, cluster=REVIEWS_CLUSTER, flags="", **fields) -> RequestContext:
    """A finished outbound request (productpage's app -> reviews)."""
    fields = {"host": "reviews", "attempts": 1, **fields}
    ctx = RequestContext.for_test(cluster=cluster, upstream_host=upstream_host, response_code=code,
                                  response_flags=flags, **fields)
    ctx.start = 1795637387.25
    return ctx


def inbound(code=200, peer=CALLER_ID, host="productpage", **fields) -> RequestContext:
    """A finished inbound request (a caller -> productpage's app)."""
    ctx = outbound(code, upstream_host="127.0.0.1:9080", cluster=INBOUND_CLUSTER, host=host, peer=peer, **fields)
    ctx.direction = "inbound"
    return ctx


def done(ctx, duration=0.0042, detail="") -> RequestOutcome:
    return RequestOutcome(ctx.response_code, ctx.response_flags, False, duration, detail)


def tcp_connection(direction="outbound", cluster="PassthroughCluster", flags="", sent=0, received=0,
                   destination=("93.184.216.34", 5432), upstream=None, duration=1.5) -> SimpleNamespace:
    """A TCP passthrough connection as the connection hooks see it: productpage's app (10.0.0.9) -> ``destination``
    (a :class:`mesh.api.ConnectionView` with the tunnel's ``cluster`` and ``response_flags``)."""
    return SimpleNamespace(direction=direction, protocol="tcp", source_address="10.0.0.9", destination=destination,
                           upstream=upstream, peer=None, start=1795637387.25, duration=duration,
                           bytes_received=received, bytes_sent=sent, requests=0, cluster=cluster, response_flags=flags)


def report_tcp(plugin, opened, closed, *args, **fields) -> None:
    """Call ``plugin``'s connection hooks as a tunnel does: ``(opened, closed)`` is (1, 0) when it is spliced,
    (0, 1) when it ends, (1, 1) when it is refused or fails to connect."""
    connection = tcp_connection(*args, **fields)
    if opened and hasattr(plugin, "mesh_connection_open"):
        plugin.mesh_connection_open(connection)
    if closed:
        plugin.mesh_connection_complete(connection)
