"""The lean TLS transport (:mod:`mesh.proxy.tls_transport`) behaves as Twisted's, over a real TLS session in memory."""

from __future__ import annotations

import datetime
import gc
import weakref

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer, implementer_only

from mesh.proxy import tls_transport
from mesh.proxy.tls_transport import IHalfCloseOverTLS, LeanTLSTransport, lean_tls


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
    """Records of one scenario: small writes both ways, several records in one read, a large answer (and writes
    that are not ``bytes``), a close."""
    client, server, pump = _session(server_options, lean, early=b"early ")
    assert (type(server) is LeanTLSTransport) == lean and (type(client) is LeanTLSTransport) == lean
    server_app, client_app = server.wrappedProtocol, client.wrappedProtocol
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    client._aggregator.flush()  # two TLS records that reach the server in one read
    client.write(b"GET /second HTTP/1.1\r\n\r\n")
    pump.flush()
    big = bytes(range(256)) * 400  # 100 KiB: several records, more than one read of the loop
    server.write(big)
    server._write(memoryview(b"a view"))  # not bytes (as an unbuffered transport's write passes them on)
    server._write(bytearray(b", an array"))
    pump.flush()
    client.loseConnection()  # close_notify: the server sees a clean end
    pump.flush()
    return server_app.data, client_app.data, type(server_app.lost.value), type(client_app.lost.value)


def test_the_lean_transport_delivers_and_ends_as_twisted_does(server_options):
    lean = _exchange(server_options, lean=True)
    assert lean == _exchange(server_options, lean=False)
    assert lean[0] == b"early GET / HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n"
    assert lean[1] == bytes(range(256)) * 400 + b"a view, an array"


@pytest.mark.parametrize("lean", [True, False])
def test_a_closed_connection_frees_its_tls_state_without_the_cyclic_collector(server_options, lean):
    """Twisted drops the pyOpenSSL Connection when the connection is lost: it points back at the transport
    (its app data), so keeping it would leave every closed TLS connection to the cyclic collector."""
    gc.collect()
    gc.disable()
    try:
        client, server, pump = _session(server_options, lean)
        server.write(b"data")
        pump.flush()
        connections = weakref.ref(server._tlsConnection), weakref.ref(client._tlsConnection)
        client.loseConnection()
        pump.flush()
        assert [connection() for connection in connections] == [None, None]
    finally:
        gc.enable()


def test_a_broken_record_fails_the_connection_as_twisted_does(server_options):
    outcomes = []
    for lean in (True, False):
        client, server, pump = _session(server_options, lean)
        server_app = server.wrappedProtocol
        server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data no key decrypts
        pump.flush()
        outcomes.append((type(server_app.lost.value), server_app.data))
    assert outcomes[0] == outcomes[1] and outcomes[0][1] == b""


# -- half-close over TLS 1.3 (IHalfCloseOverTLS) --------------------------------------------------------------

@implementer(IHalfCloseOverTLS)
class HalfCloser(Recorder):
    """A :class:`Recorder` that takes half-closes (as the mesh's TCP tunnels)."""

    read_closed = False

    def readConnectionLost(self):
        self.read_closed = True

    def writeConnectionLost(self):
        raise AssertionError("the TLS transport never reports its own half-close")


def _half_close_session(server_options, protocol=HalfCloser, lean=True, tls12=False):
    clock = Clock()
    wrap = lean_tls if lean else (lambda factory: factory)
    options = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2, lowerMaximumSecurityTo=TLSVersion.TLSv1_2) \
        if tls12 else CertificateOptions()
    server_factory = wrap(TLSMemoryBIOFactory(server_options, False, ServerFactory.forProtocol(protocol), clock=clock))
    client_factory = wrap(TLSMemoryBIOFactory(options, True, ClientFactory.forProtocol(protocol), clock=clock))
    client, server, pump = connectedServerAndClient(lambda: server_factory.buildProtocol(None),
                                                    lambda: client_factory.buildProtocol(None), clock=clock)
    pump.flush()
    client.app, server.app = client.wrappedProtocol, server.wrappedProtocol  # Twisted drops it when the connection ends
    return client, server, pump


@pytest.mark.parametrize("first", ["client", "server"])
def test_a_half_close_goes_over_tls_13_and_the_other_side_still_sends(server_options, first):
    client, server, pump = _half_close_session(server_options)
    closer, other = (client, server) if first == "client" else (server, client)
    closer.write(b"request")
    closer.loseWriteConnection()
    pump.flush()
    assert other.app.data == b"request" and other.app.read_closed
    assert closer.app.lost is None and other.app.lost is None
    other.write(b"the whole answer")
    other.write(b" after the half-close")
    pump.flush()
    assert closer.app.data == b"the whole answer after the half-close"
    assert closer.app.lost is None  # both still up until the other side closes its write side too
    other.loseWriteConnection()
    pump.flush()
    for side in (client, server):
        assert side.app.lost is not None and side.app.lost.check(ConnectionDone)
        assert side.transport.disconnected  # the TCP connection under TLS is closed on both sides
    assert not closer.app.read_closed  # its read side ended with the connection


def test_writes_after_a_half_close_are_dropped_not_fatal(server_options):
    client, server, pump = _half_close_session(server_options)
    client.loseWriteConnection()
    client.write(b"too late")
    client.loseWriteConnection()  # twice: once
    pump.flush()
    assert server.app.data == b"" and server.app.read_closed
    server.write(b"answer")
    pump.flush()
    assert client.app.data == b"answer" and client.app.lost is None


def test_bytes_after_the_peers_close_notify_are_dropped_not_kept(server_options):
    """A peer that half-closed and keeps sending cannot make the receiving side buffer without limit."""
    client, server, pump = _half_close_session(server_options)
    client.loseWriteConnection()
    pump.flush()
    assert server.app.read_closed
    for _ in range(64):
        server.dataReceived(b"\x17\x03\x03\x40\x00" + b"\x00" * 0x4000)  # 1 MiB of records after close_notify
    assert _lib.BIO_get_mem_data(server._tlsConnection._into_ssl, _ffi.new("char **")) == 0  # nothing kept
    assert server.app.data == b"" and server.app.lost is None
    server.write(b"answer")  # the server's write side is still open
    pump.flush()
    assert client.app.data == b"answer"


def test_a_full_close_after_a_half_close_still_closes_everything(server_options):
    client, server, pump = _half_close_session(server_options)
    client.loseWriteConnection()
    pump.flush()
    client.loseConnection()
    pump.flush()
    assert client.app.lost is not None and server.app.lost is not None
    assert client.transport.disconnected and server.transport.disconnected


def test_a_full_close_closes_everything(server_options):
    client, server, pump = _half_close_session(server_options)
    client.write(b"bye")
    client.loseConnection()
    pump.flush()
    assert server.app.data == b"bye"
    assert client.app.lost is not None and server.app.lost is not None
    assert client.transport.disconnected and server.transport.disconnected


@pytest.mark.parametrize("case", ["not IHalfCloseOverTLS", "TLS 1.2", "Twisted's transport"])
def test_without_a_half_close_a_close_notify_ends_the_connection_as_before(server_options, case):
    """HTTP over mTLS (its protocols are not IHalfCloseOverTLS), TLS 1.2 and Twisted's own transport: the
    peer's close_notify ends the connection, as Twisted does; loseWriteConnection is the TCP one's."""
    protocol = _PlainHalfCloser if case == "not IHalfCloseOverTLS" else HalfCloser
    lean, tls12 = case != "Twisted's transport", case == "TLS 1.2"
    client, server, pump = _half_close_session(server_options, protocol, lean, tls12)
    server.write(b"data")
    pump.flush()
    assert client.app.data == b"data"
    client.loseConnection()
    pump.flush()
    assert server.app.lost is not None and not server.app.read_closed
    assert client.app.lost is not None and server.transport.disconnected
    client, server, pump = _half_close_session(server_options, protocol, lean, tls12)
    shut = []
    client.transport.loseWriteConnection = lambda: shut.append("TCP")
    client.loseWriteConnection()
    assert shut == ["TCP"]


@implementer_only(IHalfCloseableProtocol)
class _PlainHalfCloser(HalfCloser):
    """Half-closeable over TCP only (as the HTTP/1.1 codec)."""


def test_the_fallback_to_twisteds_transport_is_told_once(monkeypatch):
    events = []
    globalLogPublisher.addObserver(events.append)
    monkeypatch.setattr(tls_transport, "_AVAILABLE", False)
    monkeypatch.setattr(tls_transport, "_fallback_told", False)
    factories = [lean_tls(TLSMemoryBIOFactory(CertificateOptions(), True, ClientFactory.forProtocol(Recorder)))
                 for _ in range(2)]
    globalLogPublisher.removeObserver(events.append)
    assert all(factory.protocol is not LeanTLSTransport for factory in factories)
    told = [event for event in events if "Twisted's own transport" in event.get("log_format", "")]
    assert len(told) == 1 and told[0]["log_level"].name == "warn"
