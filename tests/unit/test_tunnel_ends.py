"""A spliced TCP tunnel passes a FIN or a close on even when the bytes just before it filled a buffer.

Twisted closes or half-closes a TCP transport once its write buffer drains, but not while a producer
it paused is registered: it resumes the producer instead, and the FIN waits for a write that never
comes.  Over mesh mTLS the peer's close_notify is read in the same event as the bytes before it
(``LeanTLSTransport`` decrypts every record it holds), so "bytes that fill the other side's buffer,
then the FIN" happens in one event.  These tests make that order happen on real sockets and a real
epoll reactor, with the codec's connection and the passthrough's upstream protocol, and read the far
end until its EOF (or fail at the deadline).
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor

from mesh.proxy.codec.http1_server import DownstreamConnection
from mesh.proxy.listener import Limits
from mesh.proxy.passthrough import TcpUpstream
from mesh.proxy.tcp_proxy import HeldBytes

#: More than a Twisted transport buffers before it pauses its producer (64 KiB) and than loopback's
#: socket buffers take while nobody reads.
BIG = 8 * 1024 * 1024


def _tcp_pair():
    """(ours, theirs): the two ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.setblocking(False)
    theirs.setblocking(False)
    return ours, theirs


class _Owner:
    """The tunnel's owner as :class:`TcpUpstream` sees it (``connected``, ``closed``)."""

    def __init__(self):
        self.closed_with = None

    def connected(self, upstream):
        return True

    def closed(self, upstream, flags):
        self.closed_with = flags


@contextmanager
def _spliced_tunnel():
    """A client connection spliced to an upstream connection, in a fresh epoll reactor.

    Yields ``(reactor, conn, upstream, client_app, upstream_app)``: the codec's connection and the
    passthrough's upstream protocol (on real Twisted TCP transports), and the far ends the test
    plays the client and the upstream app on.
    """
    reactor = EPollReactor()
    (client_side, client_app), (upstream_side, upstream_app) = _tcp_pair(), _tcp_pair()
    try:
        # What the connection asks of its listener here; connectionMade (which needs a whole
        # listener) is skipped: the transport is set by hand, and the detect stage's part played.
        listener = SimpleNamespace(limits=Limits(), reactor=reactor, direction="inbound",
                                   connection_closed=lambda conn: None)
        conn = DownstreamConnection(listener)
        conn.transport = tcp.Server(client_side, conn, client_app.getsockname(), None, 1, reactor)
        conn.connected = True
        conn.become_tunnel()
        conn.divert(HeldBytes(conn))
        upstream = TcpUpstream(_Owner(), conn.tunnel)
        upstream.makeConnection(tcp.Server(upstream_side, upstream, upstream_app.getsockname(), None, 2, reactor))
        assert conn.tunnel is upstream  # spliced
        yield reactor, conn, upstream, client_app, upstream_app
    finally:
        reactor.removeAll()
        for sock in (client_side, client_app, upstream_side, upstream_app):
            sock.close()
        reactor._poller.close()


def _read_until_eof(reactor, sock, deadline=10.0) -> int:
    """Run ``reactor`` while reading ``sock`` to its EOF; return the byte count.  Fails at the deadline."""
    received = 0
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        reactor.runUntilCurrent()  # timed calls: an aborted transport's connectionLost
        reactor.doIteration(0.01)
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                return received
            received += len(data)
    pytest.fail(f"no EOF within {deadline}s after {received} bytes")


def test_the_clients_fin_right_behind_bytes_that_filled_the_upstreams_buffer_reaches_the_upstream():
    with _spliced_tunnel() as (reactor, conn, upstream, client_app, upstream_app):
        conn.dataReceived(b"x" * BIG)  # the upstream's transport buffers most of it, and pauses the client
        assert upstream.transport.producerPaused
        conn.readConnectionLost()  # the FIN (a close_notify) read in the same event
        assert _read_until_eof(reactor, upstream_app) == BIG
        assert not conn.closing  # a half-close: the answer can still come back


def test_the_upstreams_fin_right_behind_bytes_that_filled_the_clients_buffer_reaches_the_client():
    with _spliced_tunnel() as (reactor, conn, upstream, client_app, upstream_app):
        upstream.dataReceived(b"y" * BIG)
        assert conn.transport.producerPaused
        upstream.readConnectionLost()
        assert _read_until_eof(reactor, client_app) == BIG


def test_the_upstream_gone_right_behind_bytes_that_filled_the_clients_buffer_still_closes_the_client():
    with _spliced_tunnel() as (reactor, conn, upstream, client_app, upstream_app):
        upstream.dataReceived(b"z" * BIG)
        assert conn.transport.producerPaused
        upstream.transport.abortConnection()
        assert _read_until_eof(reactor, client_app) == BIG
        assert upstream.passthrough.closed_with == ""


def test_the_upstreams_fin_after_the_client_went_leaves_the_closed_client_alone():
    """The destination's FIN read once the client's connection is gone (an e2e egress test hit this
    order): the gone connection is not half-closed (its socket is closed: epoll refuses it), and the
    upstream connection still closes."""
    with _spliced_tunnel() as (reactor, conn, upstream, client_app, upstream_app):
        conn.transport.abortConnection()
        end = time.monotonic() + 10
        while not conn.closing and time.monotonic() < end:
            reactor.runUntilCurrent()  # the aborted transport's connectionLost is a timed call
            reactor.doIteration(0.01)
        assert conn.closing and conn.transport.fileno() == -1
        upstream.readConnectionLost()
        assert _read_until_eof(reactor, upstream_app) == 0
