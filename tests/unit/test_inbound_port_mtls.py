"""PeerAuthentication ``portLevelMtls`` on the inbound listener: the mode is that of the port the connection was
sent to (its SO_ORIGINAL_DST port when iptables captured it, as Istio applies port-level modes to passthrough
ports since 1.9), else that of the app port."""

import socket
from types import MethodType, SimpleNamespace

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from mesh.config.compile import Workload, compile_proxy_config
from mesh.identity.tls import CredentialStore
from mesh.proxy.mtls import InboundFactory
from mesh.proxy.service import ProxyService
from tests.harness.config_yaml import validate_yaml
from tests.unit.original_dst_support import RedirectedSocket

API = Workload("api", "shop", {"app": "api"}, app_port=8080)
PLAINTEXT = b"\x00\x01binary protocol"  # not TLS (0x16), not HTTP: what an inbound passthrough carries


def _config(tmp_path, spec):
    objects, errors, _ = validate_yaml(tmp_path, f"""
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: api, namespace: shop}}
        spec: {spec}
        """, name="peer.yaml")
    assert errors == []
    return compile_proxy_config(objects, API)


class _App(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class _Plain:
    """The inbound listener's plaintext protocols (InboundProtocols): records what it built."""

    def __init__(self):
        self.built = []
        self.listener = SimpleNamespace(admit=lambda: True, connection_opened=lambda conn: None,
                                        connection_closed=lambda conn: None,
                                        reactor=SimpleNamespace(seconds=lambda: 0.0))

    def buildProtocol(self, addr):
        self.built.append(_App())
        return self.built[-1]


@pytest.fixture
def inbound(tmp_path):
    """``connect(spec, dialled_port or None) -> (accepted, socket)``: plaintext through the real InboundFactory and
    ProxyService.inbound_mode of a sidecar whose app port is 8080 and whose PeerAuthentication has ``spec``."""
    sockets = []

    def connect(spec, port):
        sidecar = SimpleNamespace(runtime=SimpleNamespace(snapshot=SimpleNamespace(config=_config(tmp_path, spec))),
                                  settings=SimpleNamespace(app_port=8080))
        plain = _Plain()
        # wired as ProxyService wires it: the sidecar's bound inbound_mode, an HTTP app port
        mode_of = MethodType(ProxyService.inbound_mode, sidecar)
        factory = InboundFactory(plain, CredentialStore(), mode_of, lambda: False)
        sock = RedirectedSocket(socket.AF_INET, socket.SOCK_STREAM)
        sock.local = ("10.0.0.5", 15006)
        sockets.append(sock)
        sock.answer = None if port is None else ("10.0.0.5", port)
        transport = StringTransport()
        transport.socket = sock
        sniffer = factory.buildProtocol(("10.0.0.7", 40000))
        sniffer.makeConnection(transport)
        sniffer.dataReceived(PLAINTEXT)
        accepted = bool(plain.built) and plain.built[0].received == PLAINTEXT
        assert accepted != (factory.refused == 1 and transport.disconnecting)
        return accepted, sock

    yield connect
    for sock in sockets:
        sock.close()


PERMISSIVE_STRICT_9002 = "{selector: {matchLabels: {app: api}}, mtls: {mode: PERMISSIVE}, " \
                         "portLevelMtls: {9002: {mode: STRICT}}}"
STRICT_DISABLE_9002 = "{selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, " \
                      "portLevelMtls: {9002: {mode: DISABLE}}}"


def test_a_strict_port_refuses_captured_plaintext_and_the_others_keep_the_workload_mode(inbound):
    assert inbound(PERMISSIVE_STRICT_9002, 9002)[0] is False  # captured, dialled 9002: STRICT
    assert inbound(PERMISSIVE_STRICT_9002, 8080)[0] is True  # the app port: the workload's PERMISSIVE
    assert inbound(PERMISSIVE_STRICT_9002, 9003)[0] is True  # another passthrough port: PERMISSIVE
    assert inbound(PERMISSIVE_STRICT_9002, None)[0] is True  # sent to the inbound port itself: the app port's


def test_a_disabled_port_accepts_captured_plaintext_under_strict(inbound):
    assert inbound(STRICT_DISABLE_9002, 9002)[0] is True  # captured, dialled 9002: DISABLE
    assert inbound(STRICT_DISABLE_9002, 8080)[0] is False
    assert inbound(STRICT_DISABLE_9002, 9003)[0] is False
    assert inbound(STRICT_DISABLE_9002, None)[0] is False


def test_a_mode_of_the_app_port_applies_to_connections_sent_straight_to_the_inbound_port(inbound):
    spec = "{selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"
    assert inbound(spec, None)[0] is True
    assert inbound(spec, 8080)[0] is True
    assert inbound(spec, 9002)[0] is False  # a captured port without a mode of its own: the workload's STRICT


def test_without_port_level_modes_the_original_destination_is_not_read(inbound):
    accepted, sock = inbound("{mtls: {mode: PERMISSIVE}}", 9002)
    assert accepted and sock.reads == 0
    accepted, sock = inbound(PERMISSIVE_STRICT_9002, 8080)
    assert accepted and sock.reads == 1  # once per connection


def test_a_port_level_mode_for_a_port_of_the_sidecar_is_warned_about(tmp_path):
    config = _config(tmp_path, "{selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}, "
                               "portLevelMtls: {15021: {mode: DISABLE}, 9002: {mode: DISABLE}}}")
    assert [str(warning).split(": ", 1)[1] for warning in config.warnings] == [
        'PeerAuthentication/shop/api: spec.portLevelMtls["15021"]: port 15021 is one of the sidecar\'s own ports, '
        "which iptables never redirects to its inbound listener, so this mode applies to no connection (one sent "
        "straight to the inbound port 15006 gets the app port's mode); use the workload port the clients dial"]
