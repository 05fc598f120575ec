"""Unit tests of the config stream's defences: node binding, HELLO claims, frame and buffer limits.

The control plane's streams are real :class:`~mesh.control.distribution.ProxyStream` objects from a real
:class:`~mesh.control.distribution.Distributor`, on in-memory transports that present a client certificate
(what the TLS layer would have verified), fed real frames.
"""

from __future__ import annotations

import datetime
import json
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mesh import protocol as proto
from mesh.control.distribution import Distributor
from mesh.control.registry import Registration
from mesh.proxy.control_client import ControlStream
from tests.unit.test_protocol import frames

_KEY = ec.generate_private_key(ec.SECP256R1())


def client_certificate(uri: str) -> crypto.X509:
    """A certificate naming ``uri`` (as a URI SAN), standing in for one the TLS layer verified."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(_KEY.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(_KEY, hashes.SHA256()))
    return crypto.X509.from_cryptography(cert)


class TLSTransport(StringTransport):
    """An in-memory transport whose peer presented a certificate for ``uri``."""

    def __init__(self, uri: str, host: str = "10.0.0.9"):
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self._certificate = client_certificate(uri)

    def getPeerCertificate(self):
        return self._certificate


def distributor(clock, **kwargs) -> Distributor:
    return Distributor(clock, lambda: b"-----BUNDLE-----\n", debounce=0.1, grace=5, **kwargs)


def connect(dist, service_account="web", namespace="shop", trust_domain="cluster.local"):
    """``(stream, transport)``: a new config stream of ``spiffe://TD/ns/NS/sa/SA``."""
    stream = dist.factory.buildProtocol(None)
    transport = TLSTransport(f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
    stream.makeConnection(transport)
    return stream, transport


def hello(node, namespace="shop", **fields) -> bytes:
    """A HELLO frame of an endpoint proxy (app_port set: it registers)."""
    message = {"node": node, "workload": "web", "namespace": namespace, "labels": {"app": "web"},
               "address": "10.0.0.9", "inbound_port": 15006, "app_port": 8080, "version": "", **fields}
    return proto.encode(proto.message(proto.HELLO, **message))


def refusal(transport) -> str:
    """The ERROR reason the stream was closed with (the transport must be closing)."""
    assert transport.disconnecting
    errors = [frame["reason"] for frame in frames(transport.value()) if frame["type"] == "ERROR"]
    assert len(errors) == 1, frames(transport.value())
    return errors[0]


def lose(stream):
    stream.connectionLost(None)


# -- node binding ------------------------------------------------------------------------------------

def test_a_node_is_bound_to_the_identity_that_holds_it_until_its_registry_entry_expires():
    clock = Clock()
    dist = distributor(clock)
    owner, owner_transport = connect(dist, "web")
    owner.dataReceived(hello("n1"))
    assert dist.registry.entries["n1"].service_account == "web"

    for namespace in ("shop", "other"):  # another account of the same namespace, and of another namespace
        intruder, transport = connect(dist, "intruder", namespace)
        intruder.dataReceived(hello("n1", namespace) + proto.encode(proto.message(proto.DRAIN)))
        reason = refusal(transport)
        assert "refused HELLO for node 'n1'" in reason and "spiffe://cluster.local/ns/shop/sa/web" in reason
        assert f"spiffe://cluster.local/ns/{namespace}/sa/intruder" in reason and "node name" in reason
        assert not owner_transport.disconnecting and "n1" in dist.registry.entries  # DRAIN never applied
        assert dist.statuses["n1"].identity == "spiffe://cluster.local/ns/shop/sa/web"
        lose(intruder)

    # the owner reconnects: its new stream replaces its old one, as before
    again, _ = connect(dist, "web")
    again.dataReceived(hello("n1"))
    assert owner_transport.disconnecting and "same node n1 and identity" in owner.closed_reason
    lose(owner)
    assert dist.nodes["n1"] is again
    # gone, but registered for the grace period: still bound
    lose(again)
    intruder, transport = connect(dist, "intruder")
    intruder.dataReceived(hello("n1"))
    assert "belongs to spiffe://cluster.local/ns/shop/sa/web" in refusal(transport)
    lose(intruder)
    clock.advance(5)  # the entry expires: the name is free
    newcomer, transport = connect(dist, "intruder")
    newcomer.dataReceived(hello("n1"))
    assert not transport.disconnecting and dist.registry.entries["n1"].service_account == "intruder"


def test_a_client_only_proxy_holds_its_node_while_connected():
    dist = distributor(Clock())
    owner, _ = connect(dist, "web")
    owner.dataReceived(hello("n1", app_port=None))
    intruder, transport = connect(dist, "intruder")
    intruder.dataReceived(hello("n1", app_port=None))
    assert "belongs to" in refusal(transport)
    lose(owner)
    newcomer, transport = connect(dist, "intruder")
    newcomer.dataReceived(hello("n1", app_port=None))
    assert not transport.disconnecting


def test_a_registry_entry_restored_after_a_restart_binds_its_node(tmp_path):
    row = Registration(node="n1", workload="web", namespace="shop", service_account="web", address="10.0.0.9",
                       inbound_port=15006, labels={"app": "web"})
    (tmp_path / "registry.json").write_text(json.dumps([row.__dict__]))
    dist = distributor(Clock(), state_dir=str(tmp_path))
    intruder, transport = connect(dist, "intruder")
    intruder.dataReceived(hello("n1"))
    assert "belongs to spiffe://cluster.local/ns/shop/sa/web" in refusal(transport)
    owner, transport = connect(dist, "web")
    owner.dataReceived(hello("n1"))
    assert not transport.disconnecting


# -- what HELLO claims -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, reason", [
    ({"namespace": "other"}, "HELLO names namespace 'other' but the certificate is spiffe://cluster.local/ns/shop"),
    ({"service_account": "payments"}, "HELLO names service account 'payments'"),
    ({"node": "n1\nforged log line"}, "HELLO node must be 1 to 253 printable ASCII"),
    ({"node": ""}, "HELLO node must be"),
    ({"node": "n" * 254}, "HELLO node must be"),
    ({"version": "v1 forged"}, "HELLO version must be"),
    ({"address": "not an address"}, "is not an IP address: set the proxy's --inbound-address"),
    ({"labels": {"app": 1}}, "labels must map strings to strings"),
    ({"labels": {"bad key!": "x"}}, "clients could not use (spec.labels[\"bad key!\"]: invalid label name"),
    ({"labels": {"app": "v" * 64}}, "invalid label value"),
])
def test_hello_claims_inconsistent_with_the_certificate_or_unusable_are_refused(fields, reason):
    dist = distributor(Clock())
    stream, transport = connect(dist, "web")
    stream.dataReceived(hello(fields.pop("node", "n1"), **fields))
    assert reason in refusal(transport)
    assert dist.statuses == {} and dist.registry.entries == {} and dist.nodes == {}


def test_the_service_account_claim_may_match_or_be_left_out():
    dist = distributor(Clock())
    stream, transport = connect(dist, "web")
    stream.dataReceived(hello("n1", service_account="web"))
    assert not transport.disconnecting and dist.registry.entries["n1"].service_account == "web"


def test_a_certificate_of_another_trust_domain_is_refused():
    dist = distributor(Clock(), trust_domain="cluster.local")
    _, transport = connect(dist, "web", trust_domain="other.mesh")
    reason = refusal(transport)
    assert "trust domain 'other.mesh'" in reason and "serves 'cluster.local'" in reason


# -- limits ------------------------------------------------------------------------------------------------

def test_each_message_type_has_its_own_frame_limit():
    dist = distributor(Clock())
    stream, transport = connect(dist, "web")
    stream.dataReceived(hello("n1"))
    body = json.dumps({"type": "ACK", "v": 1, "version": "v", "padding": "x" * 2000}).encode()
    stream.dataReceived(len(body).to_bytes(4, "big") + body)
    assert f"ACK frame of {len(body)} bytes exceeds the 1024 byte limit of ACK" in refusal(transport)
    # and the encoder refuses to write what the peer would refuse
    with pytest.raises(proto.ProtocolError, match="ACK message of .* exceeds the 1024 byte limit"):
        proto.encode(proto.message(proto.ACK, version="x" * 2000))


def test_the_control_plane_refuses_a_length_prefix_over_its_largest_message_before_buffering():
    dist = distributor(Clock())
    stream, transport = connect(dist, "web")
    assert stream.decoder.max_frame == proto.FRAME_LIMITS[proto.HELLO] == 64 * 1024
    stream.dataReceived((64 * 1024 + 1).to_bytes(4, "big") + b"{" * 1000)
    assert "frame of 65537 bytes exceeds the 65536 byte limit" in refusal(transport)
    assert stream.decoder.pending == 0 and dist.pending_bytes.total == 0


def test_unfinished_frames_of_all_streams_share_one_budget():
    dist = distributor(Clock(), max_pending_bytes=100_000)
    frame = hello("n1", padding="x" * 59_000)  # a valid HELLO of about 60 KB
    streams = [connect(dist, f"web-{index}") for index in range(3)]
    for stream, _ in streams[:2]:
        stream.dataReceived(frame[:40_000])
    assert dist.pending_bytes.total == 80_000 and not any(transport.disconnecting for _, transport in streams)
    streams[2][0].dataReceived(frame[:40_000])
    reason = refusal(streams[2][1])
    assert "unfinished frames of all config streams exceed 100000 bytes" in reason and "holds 40000" in reason
    assert dist.pending_bytes.total == 80_000
    lose(streams[0][0])
    assert dist.pending_bytes.total == 40_000
    streams[1][0].dataReceived(frame[40_000:])  # the HELLO completes
    assert dist.pending_bytes.total == 0 and "n1" in dist.nodes


def test_nack_reasons_are_stored_and_logged_truncated():
    dist = distributor(Clock())
    stream, transport = connect(dist, "web")
    stream.dataReceived(hello("n1"))
    version = frames(transport.value())[0]["version"]
    stream.dataReceived(proto.encode(proto.message(proto.NACK, version=version, reason="é" * 10_000)))
    stored = dist.statuses["n1"].last_nack
    assert stored.startswith("é" * 512) and stored.endswith("... [truncated: 20000 bytes in all]")
    assert len(stored.encode()) <= proto.REASON_LIMIT + 40 and not transport.disconnecting


def test_truncate_cuts_on_a_character_boundary_and_says_so():
    assert proto.truncate("short") == "short"
    assert proto.truncate("a" * 1024) == "a" * 1024
    assert proto.truncate("ab€" * 1000, 9) == "ab€ab... [truncated: 5000 bytes in all]"


@pytest.mark.parametrize("depth, refused", [(63, False), (64, True), (100_000, True)])  # + 1 for the envelope
def test_json_nesting_is_limited_before_parsing(depth, refused):
    body = b'{"type":"PING","v":1,"x":' + b"[" * depth + b"]" * depth + b"}"
    if refused:
        with pytest.raises(proto.ProtocolError, match="nested deeper than 64 levels"):
            proto.decode(body)
    else:
        assert proto.decode(body)["type"] == "PING"


@pytest.mark.parametrize("body, deeper", [
    (b'["' + b"[" * 100 + b'"]', False),  # brackets inside a string do not nest
    (b'["\\"' + b"[" * 100 + b'"]', False),  # nor after an escaped quote
    (b'["\\\\"' + b"," + b"[" * 65 + b"]" * 65 + b"]", True),  # an escaped backslash ends no string
    (b"[" * 70, True),  # unclosed: a parser would descend before it fails
    (b"[" * 10 + b"}" * 70, False),
])
def test_nesting_counts_structure_not_strings(body, deeper):
    assert proto.nesting_exceeds(body) is deeper


# -- the proxy's end ---------------------------------------------------------------------------------------

def test_the_proxy_accepts_large_snapshots_and_sends_short_nack_reasons():
    client = SimpleNamespace(reactor=Clock(), heartbeat=proto.HEARTBEAT, hello_fields=lambda transport: {},
                             stream_opened=lambda stream: None, stream_closed=lambda stream, why: None,
                             apply=lambda snapshot: "ServiceEntry/shop/x: bad; " * 1000)
    stream = ControlStream(client)
    transport = StringTransport()
    stream.makeConnection(transport)
    assert stream.decoder.max_frame == proto.FRAME_LIMITS[proto.SNAPSHOT] == 16 * 1024 * 1024
    snapshot = proto.encode(proto.message(proto.SNAPSHOT, version="v1", trust_bundle="",
                                          resources=[{"padding": "x" * 1024}] * 4096))  # 4 MiB
    stream.dataReceived(snapshot)
    nack = frames(transport.value()[len(proto.MAGIC):])[-1]
    assert nack["type"] == "NACK" and nack["reason"].endswith("[truncated: 26000 bytes in all]")
    assert not transport.disconnecting
    stream.dataReceived(proto.encode(proto.message(proto.ERROR, reason="refused HELLO for node 'n1': ...")))
    assert transport.disconnecting
    assert stream.closed_reason == "control plane refused the stream: \"refused HELLO for node 'n1': ...\""
