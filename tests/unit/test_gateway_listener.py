"""An HTTPS gateway port's listener: each connection, when its handshake is done, moves to the listener of the
server whose TLS settings it used (Istio's route configuration per HTTPS server), once per connection."""

from types import SimpleNamespace

from twisted.internet.task import Clock

from mesh.config.gateway import GatewayServer, ServerTLS
from mesh.config.tables import RouteTable
from mesh.plugins import MeshPluginManager
from mesh.proxy.gateway import GatewayRouter, _HttpsListener
from mesh.proxy.listener import Limits

MUTUAL = GatewayServer("shop/gw servers[0]", (("*", "mutual.com"),), ServerTLS(mode="MUTUAL", files=("m.pem",)))
OPEN = GatewayServer("shop/gw servers[1]", (("*", "open.com"),), ServerTLS(mode="SIMPLE", files=("o.pem",)))


class _Handle:
    """The SSL.Connection of a handshake done with ``server``'s settings (``peer``: a client certificate)."""

    def __init__(self, server, peer=None):
        self.gateway_server = server
        self.peer = peer

    def get_peer_certificate(self):
        return self.peer


class _Connection:
    def __init__(self, listener):
        self.listener = listener
        self.drained = False

    def drain(self):
        self.drained = True


def _listener(*servers) -> _HttpsListener:
    hooks = MeshPluginManager().hook
    runtime = SimpleNamespace(snapshot=None)
    listener = _HttpsListener(runtime, 443, Clock(), "outbound", GatewayRouter(runtime, hooks, 443), Limits(), hooks)
    listener.update(SimpleNamespace(servers=servers))
    return listener


def test_a_connection_gets_the_listener_of_its_server_once_per_server():
    port = _listener(MUTUAL, OPEN)
    opened = port.server_listener(_Handle(OPEN))
    assert opened.router.runtime.server == OPEN and opened.connections is port.connections
    assert port.server_listener(_Handle(OPEN)) is opened  # a recompiled, equal server: the same listener
    recompiled = GatewayServer(OPEN.name, OPEN.hosts, OPEN.tls, RouteTable())
    assert port.server_listener(_Handle(recompiled)) is opened
    mutual = port.server_listener(_Handle(MUTUAL, peer=object()))
    assert mutual is not opened and mutual.router.runtime.server == MUTUAL


def test_a_mutual_server_connection_without_a_client_certificate_is_refused():
    """A TLS 1.3 session made with another server of the port resumes with the MUTUAL server's settings
    without a certificate (OpenSSL): refused, as a full handshake without one is."""
    assert _listener(MUTUAL, OPEN).server_listener(_Handle(MUTUAL)) is None


def test_connections_of_a_server_that_changed_are_drained_and_new_ones_refused():
    port = _listener(MUTUAL, OPEN)
    kept = _Connection(port.server_listener(_Handle(MUTUAL, peer=object())))
    gone = _Connection(port.server_listener(_Handle(OPEN)))
    port.connections.update((kept, gone))
    now_mutual = GatewayServer(OPEN.name, OPEN.hosts, ServerTLS(mode="MUTUAL", files=("o.pem",)))
    port.update(SimpleNamespace(servers=(MUTUAL, now_mutual)))
    assert gone.drained and not kept.drained
    assert port.server_listener(_Handle(OPEN)) is None  # a handshake begun with the old settings
