"""The HTTP/1.1 client codec: one keep-alive connection to an upstream.

An :class:`UpstreamConnection` is the :class:`mesh.proxy.streams.IUpstreamStream`
of the try that owns it: it serializes the request (head, chunk framing),
parses responses with httptools and hands every event to its current
*listener* (that try, see :mod:`mesh.proxy.exchange`).  Between tries the
connection sits idle in its :class:`mesh.proxy.pool.ConnectionPool`.
"""

from __future__ import annotations

import httptools
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from mesh.proxy.codec.heads import request_head
from mesh.proxy.mtls import setup_failure
from mesh.proxy.sockets import set_nodelay, unbuffer_tls, write_through
from mesh.proxy.streams import Backpressure, IUpstreamStream

_CHUNK_END = b"0\r\n\r\n"


def _ends_at_close(headers) -> bool:
    """Whether a response with these head ``headers`` has a body that ends when the server closes the
    connection (RFC 9112 section 6.3: neither a Content-Length nor a chunked Transfer-Encoding), as an
    HTTP/1.0 server or one that says ``Connection: close`` may send it.  Looked at only when the
    connection closes cleanly during a body, so the usual response costs nothing here; a reset still
    fails the try (``UC``), since the body may be cut short."""
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
            return False
    return True


@implementer(IHandshakeListener, IUpstreamStream)
class UpstreamConnection(Protocol):
    """A pooled HTTP/1.1 connection to one endpoint.

    Over TLS (``verify_peer`` set: the pool's check, see :class:`mesh.proxy.pool.ConnectionPool`)
    the connection becomes usable only after the handshake, once ``verify_peer(transport)``
    found no problem (over mTLS: the peer's SPIFFE id equals the expected one).

    The listener must implement ``upstream_head(status, reason, headers,
    keep_alive)``, ``upstream_body(data)``, ``upstream_end()``,
    ``upstream_upgraded(rest)``, ``upstream_lost(reason_text)`` and
    ``upstream_flush()``.  The last is called after each piece of data from
    the upstream has been parsed, while the listener still owns the
    connection: a listener that holds back output (a response head, so as to
    send it with the first body bytes) writes it then.
    """

    def __init__(self, pool, verify_peer=None):
        self.pool = pool
        self.verify_peer = verify_peer
        self.listener = None
        self.connected_ok = False
        self.requests_sent = 0
        self.last_used = 0.0
        self.expired = False  # past the pool's max_connection_duration: closed, not pooled, when released
        self.peer_identity = None
        self.head_only = False
        self.chunked = False  # the request body being sent is chunk-framed
        self.tunnel = None
        self._body_link = None
        self._head_headers = None  # the headers of the response being read, once its head was delivered
        self._headers = []
        self._reason = b""
        self._parser = httptools.HttpResponseParser(self)

    # -- Twisted Protocol -------------------------------------------------
    def connectionMade(self):
        set_nodelay(self.transport)
        write_through(self.transport)
        unbuffer_tls(self.transport)
        if self.verify_peer is None:
            self.connected_ok = True
            self.pool.connection_made(self)

    def handshakeCompleted(self):
        """TLS is up and the chain verified; now check who the peer is."""
        problem = self.verify_peer(self.transport)
        if problem is not None:
            self.pool.connection_failed(self, problem)
            self.transport.abortConnection()
            return
        self.connected_ok = True
        self.pool.connection_made(self)

    def dataReceived(self, data):
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            listener = self.listener
            if listener is not None:
                listener.upstream_upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as error:
            self._fail(f"upstream sent malformed HTTP: {error}")
        else:
            listener = self.listener
            if listener is not None:
                listener.upstream_flush()

    def connectionLost(self, reason=None):
        if not self.connected_ok:
            self.pool.connection_failed(self, setup_failure(reason, self.transport))
        self.connected_ok = False
        self.pool.connection_lost(self)
        if self.tunnel is not None:
            self.tunnel.loseConnection()
            self.tunnel = None
        listener = self.listener
        if listener is not None:
            self.listener = None
            if (self._head_headers is not None and reason is not None and reason.check(ConnectionDone)
                    and _ends_at_close(self._head_headers)):
                listener.upstream_end()  # a body without length or chunks ends when the server closes
            else:
                listener.upstream_lost("upstream connection closed")

    # -- the upstream stream of the try that owns the connection (IUpstreamStream) ------------
    def send_request(self, listener, exchange) -> None:
        """Take ownership for one request and write its head.

        The head is built once per exchange (``exchange.prepared``), so that
        every try sends the same bytes.
        """
        self.listener = listener
        self._head_headers = None
        self.head_only = exchange.head_only
        self.chunked = exchange.framing == "chunked"
        self.requests_sent += 1
        head = exchange.prepared
        if head is None:
            head = exchange.prepared = request_head(exchange.ctx, exchange.action, exchange.framing,
                                                    exchange.content_length, exchange.upgrade,
                                                    exchange.extra_headers)
        self.transport.write(head)

    def send_body(self, data: bytes) -> None:
        """Request body bytes (chunk-framed when the request is)."""
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.transport.write(data)

    def send_end(self) -> None:
        """The request body is complete (the last chunk, if chunked)."""
        if self.chunked:
            self.transport.write(_CHUNK_END)

    def send_trailers(self, headers) -> None:
        """Request trailers: in the last chunk of a chunked body; HTTP/1.1 has no place for them otherwise."""
        if self.chunked:
            self.chunked = False  # the last chunk is written here: send_end, which follows, adds nothing
            self.transport.write(b"0\r\n%s\r\n" % b"".join(b"%s: %s\r\n" % pair for pair in headers))

    def link_body(self, downstream) -> None:
        """From now on a full upstream buffer pauses reading the request body from ``downstream``."""
        self._body_link = link = Backpressure(downstream.pause_reading, downstream.resume_reading)
        self.transport.registerProducer(link, True)

    def unlink_body(self) -> None:
        """Undo :meth:`link_body`; the downstream is never left paused."""
        link = self._body_link
        if link is not None:
            self._body_link = None
            self.transport.unregisterProducer()
            link.release()

    def pause_reading(self) -> None:
        """Stop reading the response (the client's buffer is full)."""
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self.transport.resumeProducing()

    def hand_over(self) -> None:
        """The connection becomes one side of a tunnel (a WebSocket): no try owns it any more."""
        self.listener = None

    def detach(self) -> None:
        """The owning try is gone (failed, timed out): never reuse this connection."""
        self.listener = None
        self.transport.abortConnection()

    def _fail(self, message: str) -> None:
        listener = self.listener
        self.listener = None
        self.transport.abortConnection()
        if listener is not None:
            listener.upstream_lost(message)

    # -- httptools callbacks ----------------------------------------------
    def on_status(self, reason):
        self._reason = reason

    def on_header(self, name, value):
        self._headers.append((name, value))

    def on_headers_complete(self):
        headers = self._headers
        self._headers = []
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # interim response (100 Continue, 103): swallowed
        listener = self.listener
        if listener is not None:
            self._head_headers = headers if status not in (204, 304) and not self.head_only else None
            listener.upstream_head(status, self._reason, headers, self._parser.should_keep_alive())
            if self.head_only and self.listener is listener:
                # A response to HEAD has no body whatever its headers say;
                # httptools cannot be told, so start a fresh parser.
                self._parser = httptools.HttpResponseParser(self)
                self._message_done()

    def on_body(self, body):
        listener = self.listener
        if listener is not None:
            listener.upstream_body(body)

    def on_message_complete(self):
        if self._parser.get_status_code() < 200 or self.head_only:
            return
        self._message_done()

    def _message_done(self):
        if self._headers:  # a chunked body's trailer fields, which llhttp reports as headers after the head:
            self._headers = []  # dropped, as Envoy's HTTP/1 codec drops them (never the next response's)
        listener = self.listener
        if listener is None:
            return
        self.listener = None
        listener.upstream_end()

