"""Unit tests of the config stream: framing, the port multiplexer, the registry, snapshots and pushes."""

from __future__ import annotations

import json

import pytest
from twisted.internet import protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mesh import protocol as proto
from mesh.config.compile import Workload
from mesh.control.distribution import Distributor
from mesh.control.portmux import PortMux
from mesh.control.registry import Registration, Registry

NET = "networking.istio.io/v1"


def frames(data: bytes) -> list:
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        out.append(json.loads(data[4:4 + size]))
        data = data[4 + size:]
    return out


# -- framing ----------------------------------------------------------------------------------

def test_encode_decode_round_trip():
    frame = proto.encode(proto.message(proto.ACK, version="abc"))
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert proto.decode(frame[4:]) == {"type": "ACK", "v": 1, "version": "abc"}


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"[1]", "not a JSON object"),
    (b'{"type": "ACK", "v": 2, "version": "x"}', "unsupported protocol version 2"),
    (b'{"type": "BOGUS", "v": 1}', "unexpected message type 'BOGUS'"),
    (b'{"type": "NACK", "v": 1, "version": "x"}', "field 'reason' is missing"),
])
def test_decode_rejects(body, reason):
    with pytest.raises(proto.ProtocolError, match=reason):
        proto.decode(body)


class Recorder(proto.MessageStream):
    receives = (proto.ACK, proto.PING, proto.PONG)

    def __init__(self, reactor):
        super().__init__(reactor)
        self.got = []

    def msg_ACK(self, msg):
        self.got.append(msg)


def connected(stream):
    transport = StringTransport()
    stream.makeConnection(transport)
    return transport


def test_stream_dispatches_answers_ping_and_closes_on_bad_frames():
    clock = Clock()
    stream = Recorder(clock)
    transport = connected(stream)
    stream.dataReceived(proto.encode(proto.message(proto.ACK, version="v1")) + proto.encode(proto.message(proto.PING)))
    assert stream.got == [{"type": "ACK", "v": 1, "version": "v1"}]
    assert frames(transport.value()) == [{"type": "PONG", "v": 1}]
    stream.dataReceived(proto.encode(proto.message(proto.DRAIN)))  # not a type this side receives
    assert transport.disconnecting and "unexpected message type 'DRAIN'" in stream.closed_reason


def test_stream_refuses_oversized_frames():
    stream = Recorder(Clock())
    transport = connected(stream)
    stream.dataReceived((proto.MAX_FRAME + 1).to_bytes(4, "big") + b"{")
    assert transport.disconnecting and "exceeds" in stream.closed_reason


def test_heartbeat_pings_then_drops_a_silent_peer():
    clock = Clock()
    stream = Recorder(clock)
    transport = connected(stream)
    clock.advance(proto.HEARTBEAT)
    assert frames(transport.value()) == [{"type": "PING", "v": 1}]
    for _ in range(proto.MISSED_PINGS):
        clock.advance(proto.HEARTBEAT)
    assert transport.disconnecting and "heartbeats missed" in stream.closed_reason


# -- port multiplexer ---------------------------------------------------------------------------

class Capture(protocol.Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


class CaptureFactory(protocol.Factory):
    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        self.built.append(Capture())
        return self.built[-1]


@pytest.mark.parametrize("chunks, stream_bytes, http_bytes", [
    ([b"TXM1", b"abc"], b"abc", None),
    ([b"TX", b"M1abc"], b"abc", None),
    ([b"GET / HTTP/1.1\r\n"], None, b"GET / HTTP/1.1\r\n"),
    ([b"TX", b"GET"], None, b"TXGET"),
    ([b"POST /v1/csr"], None, b"POST /v1/csr"),
])
def test_portmux_picks_the_protocol_from_the_first_bytes(chunks, stream_bytes, http_bytes):
    streams, sites = CaptureFactory(), CaptureFactory()
    mux = PortMux(streams, sites, Clock()).buildProtocol(None)
    mux.makeConnection(StringTransport())
    for chunk in chunks:
        mux.dataReceived(chunk)
    assert [p.data for p in streams.built] == ([stream_bytes] if stream_bytes is not None else [])
    assert [p.data for p in sites.built] == ([http_bytes] if http_bytes is not None else [])


def test_portmux_closes_a_silent_connection():
    clock = Clock()
    mux = PortMux(CaptureFactory(), CaptureFactory(), clock, first_bytes_timeout=5).buildProtocol(None)
    transport = StringTransport()
    mux.makeConnection(transport)
    clock.advance(5)
    assert transport.disconnecting


# -- registry -------------------------------------------------------------------------------------

def registration(node="n1", **overrides):
    fields = dict(node=node, workload="user-service", namespace="shop", service_account="user-service",
                  address="10.0.0.5", inbound_port=15006, labels={"app": "user-service"})
    fields.update(overrides)
    return Registration(**fields)


def test_registry_grace_period_and_drain():
    clock, changes = Clock(), []
    registry = Registry(clock, lambda: changes.append(1), grace=5)
    first = registration()
    registry.register(first)
    registry.disconnected("n1", first)
    clock.advance(4)
    assert "n1" in registry.entries
    again = registration()
    registry.register(again)  # reconnected within the grace period: kept, no change
    clock.advance(10)
    assert "n1" in registry.entries and len(changes) == 1
    registry.disconnected("n1", first)  # the old stream's close does not remove the new one
    clock.advance(10)
    assert "n1" in registry.entries
    registry.disconnected("n1", again)
    clock.advance(5)
    assert "n1" not in registry.entries and len(changes) == 2
    registry.register(registration("n2"))
    registry.drain("n2")
    assert registry.entries == {} and len(changes) == 4


def test_registration_document_is_a_workload_entry_with_identity_from_the_certificate():
    document = registration(node="User-Service.shop~host~15000").document({"http", "grpc"})
    assert document["kind"] == "WorkloadEntry"
    assert document["metadata"]["name"] == "registry-user-service-shop-host-15000"
    assert document["metadata"]["namespace"] == "shop"
    assert document["spec"] == {"address": "10.0.0.5", "serviceAccount": "user-service",
                                "labels": {"app": "user-service", "security.istio.io/tlsMode": "istio"},
                                "ports": {"grpc": 15006, "http": 15006}}


# -- distribution ----------------------------------------------------------------------------------

def service_entry(name, namespace="shop", selector=None, export_to=None):
    spec = {"hosts": [name], "location": "MESH_INTERNAL", "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}
    if selector:
        spec["workloadSelector"] = {"labels": selector}
    if export_to:
        spec["exportTo"] = export_to
    return {"apiVersion": NET, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


class FakeStream:
    """Stands in for a ProxyStream: what the distributor reads and calls.

    Without ``clock`` it is a proxy that has answered each SNAPSHOT by the time the next push comes
    (it never awaits an answer); with it, one that answers only when the test calls ``dist.acked`` or
    ``dist.nacked`` (each push awaits that, as :meth:`ProxyStream.push` does).
    """

    def __init__(self, node, namespace, labels=None, reg=None, clock=None):
        self.hello = {"node": node}
        self.workload = Workload(name=node, namespace=namespace, labels=labels or {})
        self.registration = reg
        self.identity = type("Id", (), {"uri": f"spiffe://cluster.local/ns/{namespace}/sa/{node}"})()
        self.status = None
        self._sent = None
        self.clock = clock
        self.awaiting = self.awaiting_since = None
        self.pushed = []
        self.warnings = []

    def push(self, snapshot):
        self._sent = snapshot.version
        if self.clock is not None:
            self.awaiting, self.awaiting_since = snapshot.version, self.clock.seconds()
        self.pushed.append((snapshot.version, snapshot.documents))
        self.warnings = list(snapshot.warnings)
        return True


def distributor(clock):
    return Distributor(clock, lambda: b"-----BUNDLE-----\n", debounce=0.1, grace=5)


def test_snapshots_are_scoped_and_only_changed_ones_are_pushed():
    clock = Clock()
    dist = distributor(clock)
    dist.set_resources([service_entry("user-service", selector={"app": "user-service"}),
                        service_entry("private", export_to=["."])])
    shop, other = FakeStream("a", "shop"), FakeStream("b", "other")
    dist.hello(shop, "10.0.0.1")
    dist.hello(other, "10.0.0.2")

    def names(stream):
        return sorted(d["metadata"]["name"] for d in stream.pushed[-1][1])

    assert names(shop) == ["private", "user-service"] and names(other) == ["user-service"]
    # a change only the shop namespace sees: one push, after the debounce
    dist.set_resources([service_entry("user-service", selector={"app": "user-service"}),
                        service_entry("private", export_to=["."], selector={"x": "y"})])
    assert len(shop.pushed) == 1
    clock.advance(0.1)
    assert len(shop.pushed) == 2 and len(other.pushed) == 1
    # a registered proxy becomes a WorkloadEntry in both snapshots (the service is exported everywhere)
    server = FakeStream("srv", "shop", {"app": "user-service"},
                        registration("srv", labels={"app": "user-service"}))
    dist.hello(server, "10.0.0.5")
    clock.advance(0.1)
    entries = [d for d in other.pushed[-1][1] if d["kind"] == "WorkloadEntry"]
    assert [e["spec"]["ports"] for e in entries] == [{"http": 15006}]
    rows = {row["node"]: row for row in dist.proxy_status()}
    assert rows["b"]["version_sent"] == other.pushed[-1][0] and rows["b"]["stale"] is True
    dist.acked(other, other.pushed[-1][0])
    assert {row["node"]: row for row in dist.proxy_status()}["b"]["stale"] is False


def test_invalid_resources_are_left_out_and_nacks_recorded():
    clock = Clock()
    dist = distributor(clock)
    bad = service_entry("broken")
    bad["spec"]["ports"][0]["number"] = "eighty"
    errors = dist.set_resources([service_entry("ok"), bad])
    assert len(errors) == 1 and "broken" in str(errors[0])
    stream = FakeStream("a", "shop")
    dist.hello(stream, "10.0.0.1")
    assert [d["metadata"]["name"] for d in stream.pushed[0][1]] == ["ok"]
    dist.nacked(stream, stream.pushed[0][0], "no good")
    row = dist.proxy_status()[0]
    assert row["last_nack"] == "no good" and row["stale"] is True


def test_registry_survives_a_control_plane_restart(tmp_path):
    path = str(tmp_path / "registry.json")
    clock = Clock()
    registry = Registry(clock, grace=5, path=path)
    registry.register(registration("n1"))
    registry.register(registration("n2", address="10.0.0.6"))
    registry.save()
    restarted, changes = Clock(), []
    again = Registry(restarted, lambda: changes.append(1), grace=5, path=path, restore_grace=60)
    assert sorted(again.entries) == ["n1", "n2"] and again.entries["n2"].address == "10.0.0.6"
    again.register(registration("n1"))  # n1 reconnects; n2 never does
    restarted.advance(60)
    assert sorted(again.entries) == ["n1"] and changes == [1]
