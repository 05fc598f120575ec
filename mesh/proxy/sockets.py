"""Small socket helpers shared by the listeners and the upstream pools, and the reactor's event dispatch."""

from __future__ import annotations

import socket
import sys
from select import EPOLLIN as _EPOLLIN
from types import MethodType

from twisted.internet.epollreactor import EPollReactor
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python import log

#: Twisted's longest poll timeout, in seconds (``ReactorBase.timeout``): epoll_wait's int milliseconds.
_LONGEST_TIMEOUT = 2147483


def set_nodelay(transport) -> None:
    """Disable Nagle's algorithm: a proxy must not sit on small writes.

    TLS transports wrap a TCP transport; walk down to the one that has the
    socket option.
    """
    transport = _tcp_transport(transport)
    if transport is not None:
        transport.setTcpNoDelay(True)


def keep_alive(connector, keepalive) -> None:
    """Turn TCP keepalive on for the connection ``connector`` is making, with the settings of
    ``keepalive`` (a :class:`mesh.config.tables.TcpKeepalive`; those it leaves None stay the system's).
    The socket exists as soon as ``connectTCP`` returns; it connects at the reactor's next turn."""
    sock = getattr(connector.transport, "socket", None)
    if sock is None:  # making the socket failed: the connector reports that to its factory
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in ((socket.TCP_KEEPIDLE, keepalive.time), (socket.TCP_KEEPINTVL, keepalive.interval),
                          (socket.TCP_KEEPCNT, keepalive.probes)):
        if value is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def write_through(transport) -> None:
    """Make the TCP transport under ``transport`` send a write at once when nothing is buffered.

    A Twisted TCP transport only buffers a write and asks the reactor to watch
    the socket for writability; the bytes leave on the next reactor iteration
    (one more poll event, its logging-context wrappers, and two ``epoll_ctl``
    calls to switch write interest on and off).  A proxy writes one request
    and one response per exchange into an empty buffer, so sending them
    directly saves one reactor event per write (see docs/performance.md).
    The transport's class is swapped for a subclass of it whose ``write``
    does that; whatever the socket does not take at once, and every write
    while something is still buffered, goes the usual buffered way, so the
    order of bytes, backpressure and error handling stay Twisted's.
    """
    transport = _tcp_transport(transport)
    if transport is None or isinstance(transport, _WriteThrough):
        return
    base = type(transport)
    subclass = _WRITE_THROUGH.get(base)
    if subclass is None:
        subclass = _WRITE_THROUGH[base] = type(f"WriteThrough{base.__name__}", (_WriteThrough, base),
                                               {"__module__": __name__})
    transport.__class__ = subclass


def unbuffer_tls(transport) -> None:
    """Make a TLS ``transport`` encrypt and pass on each write at once.

    Twisted's TLS transport (``BufferingTLSTransport``) gathers the writes of
    one reactor iteration and encrypts them on the next one (a ``callLater(0)``),
    which pays for itself when a protocol makes many small writes.  The
    HTTP/1 codecs write a whole head, or a head with the body bytes at hand,
    at once, and the HTTP/2 codecs write the frames of one event (inbound: of
    one poll) once at its end (:func:`after_event`, :func:`after_poll`), so the
    gathering only costs a timer and a reactor iteration per write, and holds
    back bytes another process could already be working on.  Its ``write`` is
    the gathering one, set on the instance; without it, the class's
    (``TLSMemoryBIOProtocol.write``) writes directly, and so does
    ``writeSequence`` from now on (it would gather, and could then send its
    bytes after later ones).  Call it before the first write; any other
    transport is left alone.
    """
    if isinstance(transport, BufferingTLSTransport):
        vars(transport).pop("write", None)
        transport.writeSequence = MethodType(_write_joined, transport)


def _write_joined(transport, iovec) -> None:
    """``writeSequence`` as one ``write`` of the pieces joined."""
    transport.write(b"".join(iovec))


class _WriteThrough:
    """Mixin for a Twisted TCP transport class (``twisted.internet.tcp.Connection``): see :func:`write_through`."""

    def write(self, data) -> None:
        """Send ``data`` now if nothing is buffered, else (and whatever is left) buffer it as Twisted does."""
        if self.dataBuffer or self._tempDataLen or not data or self.disconnecting or not self.connected \
                or self._writeDisconnected:
            return super().write(data)
        try:
            sent = self.socket.send(data)
        except OSError:  # EAGAIN, or a lost connection, which the buffered write's doWrite reports
            sent = 0
        if sent < len(data):
            super().write(data[sent:])
        return None

    writeSequence = _write_joined


#: Transport class -> its write-through subclass.
_WRITE_THROUGH: dict = {}


def _tcp_transport(transport):
    """The TCP transport under ``transport`` (TLS transports wrap one), or None.

    The test is on the class: a TLS transport (a ``ProtocolWrapper``) answers
    every attribute it lacks from the transport it wraps.
    """
    while transport is not None:
        if hasattr(type(transport), "setTcpNoDelay"):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def lean_dispatch(reactor) -> None:
    """Dispatch the epoll reactor's I/O events without a logging context per event.

    Twisted's epoll reactor runs every read or write event through
    ``log.callWithLogger``: the selectable's ``logPrefix()``, a copy of the
    current logging context with ``system`` set to it, and a context push and
    pop, around ``_doReadOrWrite``.  That ``system`` only reaches log events
    emitted with the legacy ``twisted.python.log.msg`` API while the event is
    handled; txmesh logs with ``twisted.logger``, whose events never read it.
    This makes ``reactor`` call ``_doReadOrWrite`` directly instead (which
    itself logs and disconnects a selectable whose ``doRead``/``doWrite``
    raises), and for the most common event, "readable" alone, do what
    ``_doReadOrWrite`` does for it inline: ``doRead``, then disconnect with
    the reason it returns or raises (logged).  Anything else raised is logged
    with the selectable's prefix as before, and the other events of the poll
    are still dispatched.

    The reactor's two calls around each poll get a fast path too:
    ``runUntilCurrent`` returns at once when no timed call is due and there is
    nothing new (no new timed call, no call from a thread, no stop), and
    ``timeout`` computes the poll's timeout from the next timed call without
    calling ``_insertNewDelayedCalls`` when no timed call is new; otherwise
    each is Twisted's own.  (Twisted's only other work there, dropping
    cancelled calls from the heap, then waits for the next due call: the
    listeners' one-second sweep.)  Any reactor but an unmodified epoll
    reactor is left alone.  Idempotent.
    """
    if getattr(type(reactor), "doIteration", None) is EPollReactor.doPoll and "doIteration" not in vars(reactor):
        reactor.doIteration = MethodType(_do_poll, reactor)
        reactor.runUntilCurrent = MethodType(_run_until_current, reactor)
        reactor.timeout = MethodType(_timeout, reactor)


def _run_until_current(reactor) -> None:
    """``runUntilCurrent``, returning at once when there is nothing to run (see :func:`lean_dispatch`)."""
    pending = reactor._pendingTimedCalls
    if (reactor.threadCallQueue or reactor._newTimedCalls or reactor._justStopped
            or (pending and pending[0].time <= reactor.seconds())):
        EPollReactor.runUntilCurrent(reactor)


def _timeout(reactor) -> float | None:
    """``timeout`` without ``_insertNewDelayedCalls`` when no timed call is new (see :func:`lean_dispatch`)."""
    if reactor._newTimedCalls:
        return EPollReactor.timeout(reactor)
    pending = reactor._pendingTimedCalls
    if not pending:
        return None
    return max(0, min(_LONGEST_TIMEOUT, pending[0].time - reactor.seconds()))


#: The calls :func:`after_event` queued during the I/O event being dispatched; None outside one.
_after_event: list | None = None
#: The calls :func:`after_poll` queued during the I/O events of the poll being dispatched; None outside them.
_after_poll: list | None = None


def after_event(call) -> bool:
    """Queue ``call()`` to run once the reactor's current read or write event has been handled.

    A codec that answers many streams in one event (an upstream read with many
    responses) writes their frames once at the end of it, not once per stream:
    one ``send`` instead of many, and an END_STREAM that rides on the last DATA
    frame.  Returns False, queuing nothing, outside a dispatched event (a timed
    call, or a reactor without :func:`lean_dispatch`): the caller then does it
    at once.
    """
    return _queue(_after_event, call)


def after_poll(call) -> bool:
    """Queue ``call()`` to run once every event of the reactor's current poll has been handled.

    Like :func:`after_event`, for a connection that events on other connections
    write to: an inbound HTTP/2 connection whose streams are answered by
    upstream connections that were readable together sends their frames in one
    TLS record and one ``send`` (Envoy's event loop does the same: a write
    activates the connection's write event, which runs after the events already
    ready).  The calls run after those of :func:`after_event`, in the order
    queued.  Returns False, queuing nothing, outside a dispatched event: the
    caller then does it at once.
    """
    return _queue(_after_poll, call)


def _queue(pending: list | None, call) -> bool:
    if pending is None:
        return False
    pending.append(call)
    return True


def _run_queued(pending: list) -> None:
    """Run (and empty) ``pending``, calls queued meanwhile included; each failure is logged."""
    while pending:
        calls = pending[:]
        pending.clear()
        for call in calls:
            try:
                call()
            except BaseException:
                log.err()


def _do_poll(reactor, timeout) -> None:
    """``EPollReactor.doPoll`` without ``log.callWithLogger`` around each event (see :func:`lean_dispatch`),
    with the calls :func:`after_event` queued run after each event, and those :func:`after_poll` queued
    once all the poll's events are handled."""
    global _after_event, _after_poll
    try:
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))
    except InterruptedError:
        return
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    pending = _after_event = []
    pending_poll = _after_poll = []
    try:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    if event == _EPOLLIN and selectable.fileno() != -1:
                        try:
                            why = selectable.doRead()
                        except BaseException:
                            why = sys.exc_info()[1]
                            log.err()
                        if why:
                            reactor._disconnectSelectable(selectable, why, True)
                    else:
                        dispatch(selectable, fd, event)
                except BaseException:
                    log.err(system=_log_prefix(selectable))
                if pending:
                    _run_queued(pending)
        while pending_poll:  # a queued call may queue more of either kind
            _run_queued(pending_poll)
            _run_queued(pending)
    finally:
        _after_event = _after_poll = None


def _log_prefix(selectable) -> str:
    try:
        return selectable.logPrefix()
    except BaseException:
        return "(buggy logPrefix method)"
