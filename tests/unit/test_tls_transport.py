"""The lean TLS transport (:mod:`mesh.proxy.tls_transport`) behaves as Twisted's, over a real TLS session in memory."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from mesh.proxy.tls_transport import LeanTLSTransport, lean_tls


class Recorder(Protocol):
    """Records what arrives and how the connection ends."""

    def __init__(self):
        self.data = b""
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


@pytest.fixture(scope="module")
def server_options():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lean-tls-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, hashes.SHA256()))
    return CertificateOptions(privateKey=key, certificate=cert)  # pyOpenSSL takes cryptography's objects


def _session(server_options, lean, early=b""):
    """A connected client and server over TLS in memory; ``lean`` picks the transports; the client
    writes ``early`` before the handshake (held until it is done)."""
    clock = Clock()
    wrap = lean_tls if lean else (lambda factory: factory)
    server_factory = wrap(TLSMemoryBIOFactory(server_options, False, ServerFactory.forProtocol(Recorder),
                                              clock=clock))
    client_factory = wrap(TLSMemoryBIOFactory(CertificateOptions(), True, ClientFactory.forProtocol(Recorder),
                                              clock=clock))
    client, server, pump = connectedServerAndClient(lambda: server_factory.buildProtocol(None),
                                                    lambda: client_factory.buildProtocol(None), clock=clock)
    if early:
        client.write(early)
        client._aggregator.flush()
    pump.flush()
    return client, server, pump


def _exchange(server_options, lean):
    """Records of one scenario: small writes both ways, several records in one read, a large answer, a close."""
    client, server, pump = _session(server_options, lean, early=b"early ")
    assert (type(server) is LeanTLSTransport) == lean and (type(client) is LeanTLSTransport) == lean
    server_app, client_app = server.wrappedProtocol, client.wrappedProtocol
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    client._aggregator.flush()  # two TLS records that reach the server in one read
    client.write(b"GET /second HTTP/1.1\r\n\r\n")
    pump.flush()
    big = bytes(range(256)) * 400  # 100 KiB: several records, more than one read of the loop
    server.write(big)
    pump.flush()
    client.loseConnection()  # close_notify: the server sees a clean end
    pump.flush()
    return server_app.data, client_app.data, type(server_app.lost.value), type(client_app.lost.value)


def test_the_lean_transport_delivers_and_ends_as_twisted_does(server_options):
    lean = _exchange(server_options, lean=True)
    assert lean == _exchange(server_options, lean=False)
    assert lean[0] == b"early GET / HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n"
    assert lean[1] == bytes(range(256)) * 400


def test_a_broken_record_fails_the_connection_as_twisted_does(server_options):
    outcomes = []
    for lean in (True, False):
        client, server, pump = _session(server_options, lean)
        server_app = server.wrappedProtocol
        server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data no key decrypts
        pump.flush()
        outcomes.append((type(server_app.lost.value), server_app.data))
    assert outcomes[0] == outcomes[1] and outcomes[0][1] == b""
