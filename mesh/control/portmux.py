"""One TLS port, two protocols: the config stream and the CSR HTTP API (:15012).

After the TLS handshake the first four bytes decide: the magic ``TXM1`` starts
the config stream (:mod:`mesh.protocol`), anything else is handed,
bytes included, to the HTTP site.  A connection that sends nothing for
``first_bytes_timeout`` seconds is closed.
"""

from __future__ import annotations

from twisted.internet import protocol
from twisted.logger import Logger

from mesh.protocol import MAGIC

log = Logger()


class _Mux(protocol.Protocol):
    def __init__(self, factory, addr):
        self.factory = factory
        self.addr = addr
        self.buffer = b""
        self.inner = None
        self._timer = None

    def connectionMade(self):
        self._timer = self.factory.reactor.callLater(self.factory.first_bytes_timeout, self._silent)

    def _silent(self):
        self._timer = None
        self.transport.loseConnection()

    def dataReceived(self, data):
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        if len(self.buffer) < len(MAGIC) and MAGIC.startswith(self.buffer):
            return  # maybe the magic, not yet complete
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.buffer.startswith(MAGIC):
            inner, rest = self.factory.stream_factory.buildProtocol(self.addr), self.buffer[len(MAGIC):]
        else:
            inner, rest = self.factory.http_factory.buildProtocol(self.addr), self.buffer
        self.buffer = b""
        if inner is None:
            self.transport.loseConnection()
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        if rest:
            inner.dataReceived(rest)

    def connectionLost(self, reason=protocol.connectionDone):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class PortMux(protocol.Factory):
    """Factory for :15012 (wrap it in TLS): config stream on ``TXM1``, else HTTP."""

    noisy = False

    def __init__(self, stream_factory, http_factory, reactor=None, first_bytes_timeout: float = 30.0):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.stream_factory = stream_factory
        self.http_factory = http_factory
        self.first_bytes_timeout = first_bytes_timeout

    def buildProtocol(self, addr):
        return _Mux(self, addr)

    def doStart(self):
        self.http_factory.doStart()
        super().doStart()

    def doStop(self):
        self.http_factory.doStop()
        super().doStop()
