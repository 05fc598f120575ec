"""Unit tests of the proxy's end of the config stream: HELLO, ACK, NACK (old config kept), LKG.

The control plane is a fake peer speaking the real framing over twisted's in-memory transport pair
(iosim), so every byte goes through both ends' parsers.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.test import iosim

from mesh import __version__
from mesh import protocol as proto
from mesh.config.compile import Workload
from mesh.identity.tls import CredentialStore
from mesh.proxy import lkg
from mesh.proxy.control_client import ControlClient, ControlStream

NET = "networking.istio.io/v1"


def service_entry(name, port=80):
    return {"apiVersion": NET, "kind": "ServiceEntry", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"hosts": [name], "location": "MESH_INTERNAL", "resolution": "STATIC",
                     "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
                     "endpoints": [{"address": "10.0.0.9"}]}}


class FakeRuntime:
    def __init__(self):
        self.snapshot = None
        self.applied = []

    def apply(self, config):
        self.applied.append(config)
        self.snapshot = SimpleNamespace(config=config)


def fake_proxy(clock):
    settings = SimpleNamespace(
        workload=Workload(name="frontend", namespace="shop", labels={"app": "frontend"}),
        identity=SimpleNamespace(trust_domain="cluster.local", service_account="frontend"),
        admin_port=15000, inbound_address="10.0.0.7", inbound_port=15006, app_port=8080,
        telemetry=SimpleNamespace(metrics_port=15090))
    return SimpleNamespace(settings=settings, runtime=FakeRuntime(), credentials=CredentialStore(), reactor=clock,
                           config_applied_at=None, warnings=())


class FakeControl(proto.MessageStream):
    receives = (proto.HELLO, proto.ACK, proto.NACK, proto.DRAIN, proto.PING, proto.PONG)

    def __init__(self, reactor):
        super().__init__(reactor)
        self.got = []
        self.magic = None

    def dataReceived(self, data):
        if self.magic is None:
            self.magic, data = data[:4], data[4:]
        super().dataReceived(data)

    def msg_HELLO(self, msg):
        self.got.append(msg)

    msg_ACK = msg_NACK = msg_DRAIN = msg_HELLO


def pair(client):
    server = FakeControl(client.reactor)
    stream = ControlStream(client)
    _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: stream)
    return server, stream, pump


def test_hello_ack_nack_and_last_known_good(tmp_path):
    clock = Clock()
    proxy = fake_proxy(clock)
    client = ControlClient(clock, proxy, ("127.0.0.1", 15012), "spiffe://cluster.local/ns/mesh-system/sa/mesh-control",
                           state_dir=str(tmp_path), node="frontend-1")
    client.running = True
    server, stream, pump = pair(client)
    pump.flush()
    assert server.magic == proto.MAGIC
    hello = server.got[0]
    assert hello["type"] == "HELLO" and hello["node"] == "frontend-1" and hello["labels"] == {"app": "frontend"}
    assert hello["address"] == "10.0.0.7" and hello["inbound_port"] == 15006 and hello["version"] == ""
    assert hello["proxy_version"] == __version__ and hello["admin_port"] == 15000 and hello["metrics_port"] == 15090
    assert client.stale  # connected, nothing applied yet

    server.send(proto.SNAPSHOT, version="v1", resources=[service_entry("payment")], trust_bundle="")
    pump.flush()
    assert server.got[-1] == {"type": "ACK", "v": 1, "version": "v1"}
    assert proxy.runtime.snapshot.config.version == "v1" and not client.stale
    assert "outbound|80||payment.shop.svc.cluster.local" in proxy.runtime.snapshot.config.clusters

    bad = service_entry("broken")
    bad["spec"]["ports"][0]["number"] = 0
    server.send(proto.SNAPSHOT, version="v2", resources=[service_entry("payment"), bad], trust_bundle="")
    pump.flush()
    nack = server.got[-1]
    assert nack["type"] == "NACK" and nack["version"] == "v2"
    assert "ServiceEntry/shop/broken" in nack["reason"] and "spec.ports[0].number" in nack["reason"]
    assert proxy.runtime.snapshot.config.version == "v1" and len(proxy.runtime.applied) == 1  # old config serves

    saved = json.loads((tmp_path / lkg.FILE_NAME).read_text())
    assert saved["version"] == "v1" and oct((tmp_path / lkg.FILE_NAME).stat().st_mode & 0o777) == "0o644"

    # a new proxy process: the LKG applies before any control plane answers, and HELLO carries its version
    restarted = ControlClient(clock, fake_proxy(clock), ("127.0.0.1", 15012), "x", state_dir=str(tmp_path),
                              node="frontend-1")
    assert restarted.load_last_known_good()
    assert restarted.proxy.runtime.snapshot.config.version == "v1" and restarted.stale
    restarted.running = True
    server2, _, pump2 = pair(restarted)
    pump2.flush()
    assert server2.got[0]["version"] == "v1"


def test_stream_loss_schedules_a_jittered_capped_reconnect():
    clock = Clock()
    client = ControlClient(clock, fake_proxy(clock), ("127.0.0.1", 15012), "x", node="n")
    client.running = True
    delays = []
    for _ in range(12):
        client._retry("down")
        delays.append(client._timer.getTime() - clock.seconds())
        client._timer.cancel()
    assert 0.25 <= delays[0] <= 0.75
    assert all(delay <= 30 * 1.5 for delay in delays) and max(delays) >= 15
