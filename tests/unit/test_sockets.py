"""Write-through TCP transports (:func:`mesh.proxy.sockets.write_through`) on real socket pairs."""

from __future__ import annotations

import socket
from contextlib import contextmanager

import pytest
from twisted.internet import main, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol

from mesh.proxy.sockets import write_through


class Reactor:
    """The part of a reactor a TCP transport's write uses: the set of descriptors watched for writing."""

    def __init__(self):
        self.writers = set()

    def addWriter(self, selectable):
        self.writers.add(selectable)

    def removeWriter(self, selectable):
        self.writers.discard(selectable)


class Wrapper:
    """A transport wrapping another, which answers what it lacks from the one it wraps (as Twisted's
    TLS transport, a ``ProtocolWrapper``, wraps the TCP transport)."""

    def __init__(self, transport):
        self.transport = transport

    def __getattr__(self, name):
        return getattr(self.transport, name)


@pytest.fixture
def pair():
    """``(write-through transport, its peer socket, reactor)`` over a connected socket pair."""
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    reactor = Reactor()
    transport = tcp.Connection(ours, Protocol(), reactor)
    transport.connected = True
    wrapper = Wrapper(transport)
    write_through(wrapper)
    assert type(wrapper) is Wrapper  # the TCP transport under it writes through, not the wrapper
    yield transport, peer, reactor
    ours.close()
    peer.close()


def _read(peer, size):
    data = b""
    while len(data) < size:
        data += peer.recv(size - len(data))
    return data


def test_a_write_into_an_empty_buffer_is_sent_at_once(pair):
    transport, peer, reactor = pair
    transport.write(b"GET / HTTP/1.1\r\n\r\n")
    transport.writeSequence([b"one ", b"two"])
    assert _read(peer, 25) == b"GET / HTTP/1.1\r\n\r\none two"
    assert not reactor.writers and not transport.dataBuffer and not transport._tempDataLen


def test_what_the_socket_does_not_take_is_buffered_in_order(pair):
    transport, peer, reactor = pair
    big = bytes(range(256)) * 8192  # 2 MiB: more than the socket pair's buffers hold
    transport.write(big)
    transport.write(b"after")  # something is buffered: this one must wait its turn
    assert reactor.writers == {transport}
    received = b""
    while len(received) < len(big) + 5:
        if transport in reactor.writers:
            transport.doWrite()  # what the reactor does when the socket is writable
        received += peer.recv(65536)
    assert received == big + b"after"
    assert not reactor.writers


def test_writes_after_a_close_or_half_close_are_left_to_twisted(pair):
    transport, peer, reactor = pair
    transport._writeDisconnected = True
    transport.write(b"late")
    assert not transport._tempDataLen and not reactor.writers
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(10)


def test_a_transport_is_converted_once():
    ours, peer = socket.socketpair()
    try:
        transport = tcp.Connection(ours, Protocol(), Reactor())
        write_through(transport)
        converted = type(transport)
        write_through(transport)
        assert type(transport) is converted and converted.__mro__[2] is tcp.Connection
        other = tcp.Connection(peer, Protocol(), Reactor())
        write_through(other)
        assert type(other) is converted  # one subclass per transport class
    finally:
        ours.close()
        peer.close()


class Reader:
    """A readable selectable on a socket: records its reads; ``fail`` makes ``doRead`` raise."""

    def __init__(self, sock, fail=False):
        self.sock = sock
        self.fail = fail
        self.reads = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "Reader"

    def doRead(self):
        if self.fail:
            raise RuntimeError("broken doRead")
        data = self.sock.recv(100)
        self.reads.append(data)
        return None if data else main.CONNECTION_DONE  # as a TCP transport's doRead

    def connectionLost(self, reason):
        self.lost.append(reason)


@contextmanager
def _epoll_reactor_with_socket_pairs(count):
    """A fresh epoll reactor made lean (:func:`lean_dispatch`) and ``count`` socket pairs; all closed after."""
    from twisted.internet.epollreactor import EPollReactor

    from mesh.proxy.sockets import lean_dispatch

    reactor = EPollReactor()
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        lean_dispatch(reactor)
        yield reactor, pairs
    finally:
        reactor.removeAll()
        for ours, peer in pairs:
            ours.close()
            peer.close()
        reactor._poller.close()


def test_lean_dispatch_reads_and_disconnects_as_the_epoll_reactor_does():
    from twisted.internet.task import Clock

    from mesh.proxy.sockets import lean_dispatch

    with _epoll_reactor_with_socket_pairs(2) as (reactor, pairs):
        lean_dispatch(reactor)  # idempotent
        assert "doIteration" in vars(reactor)
        good, bad = Reader(pairs[0][0]), Reader(pairs[1][0], fail=True)
        reactor.addReader(bad)
        reactor.addReader(good)
        pairs[0][1].send(b"hello")
        pairs[1][1].send(b"boom")
        reactor.doIteration(1)
        assert good.reads == [b"hello"] and not good.lost
        assert bad.lost and bad.lost[0].check(RuntimeError)  # logged and disconnected by _doReadOrWrite
        assert bad not in reactor.getReaders() and good in reactor.getReaders()
        pairs[0][1].close()  # the peer goes: doRead reads nothing and says so
        reactor.doIteration(1)
        assert good.reads[-1] == b"" and good.lost and good.lost[0].check(ConnectionDone)
        assert good not in reactor.getReaders()
    clock = Clock()
    lean_dispatch(clock)  # not an epoll reactor: left alone
    assert "doIteration" not in vars(clock)


def _read_first_and_second_in_one_poll(queue):
    """Dispatch one read on each of two readers, "first" and "second", in one poll of an epoll reactor
    with lean dispatch; each read calls ``queue(name)``, then "first"'s raises.  Returns "first"."""

    class Queuer(Reader):
        def doRead(self):
            why = super().doRead()
            name = self.reads[-1].decode()
            queue(name)
            if name == "first":
                raise RuntimeError("a broken doRead still gets its queued calls run")
            return why

    with _epoll_reactor_with_socket_pairs(2) as (reactor, pairs):
        first, second = Queuer(pairs[0][0]), Queuer(pairs[1][0])
        reactor.addReader(first)
        reactor.addReader(second)
        pairs[0][1].send(b"first")
        pairs[1][1].send(b"second")
        reactor.doIteration(1)
    return first


def test_calls_queued_during_an_event_run_when_it_is_handled_and_only_then():
    from mesh.proxy.sockets import after_event

    order = []

    def queue(name):  # a call per read, and one more from that call
        assert after_event(lambda: order.append(f"{name} after") or after_event(lambda: order.append(
            f"{name} after, queued by the call")))
        order.append(f"{name} read")

    assert not after_event(order.append)  # outside an event: nothing queued, the caller acts now
    first = _read_first_and_second_in_one_poll(queue)
    by_reader = [[step for step in order if step.startswith(name)] for name in ("first", "second")]
    assert by_reader == [[f"{name} read", f"{name} after", f"{name} after, queued by the call"]
                         for name in ("first", "second")]
    assert order.index("first after, queued by the call") < order.index("second read") or \
        order.index("second after, queued by the call") < order.index("first read")  # each event's own
    assert first.lost and first.lost[0].check(RuntimeError)
    assert not after_event(order.append)  # the poll is over


def test_calls_queued_for_the_poll_run_once_all_its_events_are_handled():
    from mesh.proxy.sockets import after_event, after_poll

    order = []

    def queue(name):  # a call for the poll and one for the event; the poll's call queues one of each more
        def at_poll_end():
            order.append(f"{name} poll")
            assert after_event(lambda: order.append(f"{name} event, queued at the poll's end"))
            assert after_poll(lambda: order.append(f"{name} poll, queued at the poll's end"))

        assert after_poll(at_poll_end)
        assert after_event(lambda: order.append(f"{name} event"))
        order.append(f"{name} read")

    assert not after_poll(order.append)  # outside a poll: nothing queued, the caller acts now
    first = _read_first_and_second_in_one_poll(queue)
    names = [step.split()[0] for step in order[:4:2]]  # the order the events were dispatched in
    assert order[:4] == [f"{name} {step}" for name in names for step in ("read", "event")]
    assert order[4:6] == [f"{name} poll" for name in names]  # after both events, in the order queued
    assert sorted(order[6:]) == sorted(f"{name} {kind}, queued at the poll's end"
                                       for name in names for kind in ("event", "poll"))
    assert first.lost and first.lost[0].check(RuntimeError)
    assert not after_poll(order.append) and not after_event(order.append)  # the poll is over


def test_a_tls_transport_encrypts_each_write_at_once_once_unbuffered():
    from twisted.internet.ssl import CertificateOptions
    from twisted.internet.task import Clock
    from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

    from mesh.proxy.sockets import unbuffer_tls

    factory = TLSMemoryBIOFactory(CertificateOptions(), True, None, clock=Clock())
    tls = BufferingTLSTransport(factory, Protocol())
    assert "write" in vars(tls)  # gathers writes until the next reactor iteration
    unbuffer_tls(tls)
    assert tls.write.__func__ is BufferingTLSTransport.write  # TLSMemoryBIOProtocol.write: at once
    written = []
    tls.write = written.append  # stands for the direct write, to see what writeSequence does
    tls.writeSequence([b"a", b"b"])
    assert written == [b"ab"] and not tls._aggregator._buffer  # not gathered for later
    plain = Wrapper(None)
    unbuffer_tls(plain)  # not a TLS transport: left alone


def test_an_upstream_http2_connection_over_tls_encrypts_at_once():
    """Its frames are written once per event already (after_event): gathering them again until the next
    reactor iteration would only hold them back from the peer sidecar."""
    from twisted.internet.ssl import CertificateOptions
    from twisted.internet.task import Clock
    from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

    from mesh.proxy.codec.h2_client import H2UpstreamConnection

    factory = TLSMemoryBIOFactory(CertificateOptions(), True, None, clock=Clock())
    connection = H2UpstreamConnection(pool=None, verify_peer=lambda transport: None)
    tls = BufferingTLSTransport(factory, connection)
    assert "write" in vars(tls)
    connection.transport = tls
    connection.connectionMade()
    assert "write" not in vars(tls)


def _timed_calls(reactor) -> list:
    """What ``runUntilCurrent`` runs and ``timeout`` answers: timed calls, a reset, a cancel, a thread call."""
    now = [1000.0]
    reactor.seconds = lambda: now[0]
    seen = [reactor.timeout()]

    def step(advance):
        now[0] += advance
        reactor.runUntilCurrent()
        seen.append(reactor.timeout())

    later = reactor.callLater(5, seen.append, "later")
    seen.append(reactor.timeout())
    step(0)
    step(2)
    reactor.callFromThread(seen.append, "thread")
    step(0)
    reactor.callLater(1, seen.append, "soon")
    later.reset(10)  # later than planned: Twisted wakes at the old time and moves it on
    step(1)
    step(1)
    step(8)
    reactor.callLater(1, seen.append, "cancelled").cancel()
    step(1)
    return seen


def test_lean_dispatch_runs_timed_and_thread_calls_as_the_reactor_does():
    from twisted.internet.epollreactor import EPollReactor

    from mesh.proxy.sockets import lean_dispatch

    plain, lean = EPollReactor(), EPollReactor()
    try:
        lean_dispatch(lean)
        assert "runUntilCurrent" in vars(lean) and "timeout" in vars(lean)
        expected = _timed_calls(plain)
        assert expected == [None, 5, 5, 3, "thread", 3, "soon", 2, 1, "later", None, None]
        assert _timed_calls(lean) == expected
    finally:
        for reactor in (plain, lean):
            reactor.removeAll()
            reactor._poller.close()
