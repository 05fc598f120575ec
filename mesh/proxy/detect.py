"""The detect stage: protocol detection on a captured connection, before any codec.

Istio's outbound listener sniffs the first bytes of a connection it captured
to tell HTTP from other TCP traffic (a TLS ClientHello, a database protocol).
txmesh does the same, once per connection and only for connections that
iptables redirected (the app did not call the sidecar itself):

- :func:`classify` looks at the bytes received so far.  A complete first
  line ``TOKEN SP TARGET SP HTTP/1.d`` is HTTP, and so is the whole HTTP/2
  connection preface (:data:`H2_PREFACE`: h2c with prior knowledge, which the
  HTTP codec hands to :mod:`mesh.proxy.codec.h2_server`); bytes that cannot
  start either (``0x16`` of a TLS handshake, ``*3\\r\\n`` of Redis, a binary
  packet) are TCP at once; a prefix that still could be one needs more bytes.
- :func:`classify_at_timeout` decides when the detection timeout passes first:
  a client that sent nothing speaks a server-first protocol (MySQL, SMTP:
  the server talks first), which is TCP; a client that has sent a method and
  a space is a slow HTTP client.

:func:`detect` starts the stage on a connection the server codec accepted
(only when it was captured: an app that calls the sidecar itself goes
straight to the codec and pays nothing).  A :class:`Detector` then gets the
connection's bytes (:meth:`DownstreamConnection.divert`) until it has decided:
HTTP goes back to the codec (``resume_http``), anything else becomes a TCP
tunnel of :mod:`mesh.proxy.passthrough`.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import ISSLTransport

HTTP, TCP = "http", "tcp"

#: What a client that knows the server speaks HTTP/2 sends first (RFC 9113 section 3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: A request line this long without its end is left to the HTTP codec (and its head limits).
MAX_SNIFF_BYTES = 16 * 1024

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]"
_TARGET = rb"[^\x00-\x20\x7f]"
_REQUEST_LINE = re.compile(rb"%s+ %s+ HTTP/1\.[0-9]\r?\n" % (_TOKEN, _TARGET))
#: Every prefix of a request line: the method (as long as any method llhttp knows, with room), then
#: optionally a space, the target, a space and the start of ``HTTP/1.d``.
_LINE_PREFIX = re.compile(rb"%s{1,24}(?: (?:%s+(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[0-9]\r?)?)?)?)?)?)?)?)?)?)?)?"
                          % (_TOKEN, _TARGET))
_METHOD_SPACE = re.compile(rb"%s{1,24} " % _TOKEN)


def classify(data: bytes):
    """:data:`HTTP`, :data:`TCP`, or None when ``data`` (the first bytes of a connection) cannot tell yet."""
    if not data:
        return None
    if H2_PREFACE.startswith(data[:24]):
        return HTTP if len(data) >= 24 else None
    end = data.find(b"\n")
    if end >= 0:
        return HTTP if _REQUEST_LINE.fullmatch(data, 0, end + 1) else TCP
    if not _LINE_PREFIX.fullmatch(data):
        return TCP
    if len(data) >= MAX_SNIFF_BYTES:
        return HTTP  # a huge request target: the codec answers 414/431 as for any client
    return None


def classify_at_timeout(data: bytes) -> str:
    """The decision when the detection timeout passed before :func:`classify` could make one."""
    return HTTP if _METHOD_SPACE.match(data) else TCP


#: Client bytes held while the tunnel connects; beyond, reading from the client pauses.
_CONNECT_BUFFER = 64 * 1024


def detect(conn, passthrough) -> bool:
    """Start the detect stage on the captured connection ``conn`` (a server codec).

    ``passthrough`` is the listener's :class:`mesh.proxy.passthrough.Passthrough`.
    False when detection does not apply: over mesh mTLS the protocol is HTTP.
    """
    transport = conn.transport
    if ISSLTransport.providedBy(transport):
        return False
    peer = transport.getPeer()
    detector = Detector(passthrough, conn, (peer.host, peer.port))
    if passthrough.detecting(detector):
        detector.begin()
    return True


class Detector:
    """Gets every byte of one captured connection until its protocol is known.

    Then it hands the bytes back to the HTTP codec, or asks ``passthrough``
    for a tunnel and holds them until the tunnel is up (``take_buffer``).
    ``loseConnection`` is the codec telling it that the client half-closed
    (``conn.read_closed``) or went away (``conn.closing``).
    """

    __slots__ = ("passthrough", "conn", "client", "start", "buffer", "decided", "timer", "connector")

    def __init__(self, passthrough, conn, client):
        self.passthrough = passthrough
        self.conn = conn
        self.client = client
        self.start = passthrough.reactor.seconds()
        self.buffer = b""
        self.decided = False
        self.connector = None  # the tunnel's connector while it connects (see Passthrough.open_tunnel)
        self.timer = None

    def begin(self):
        """Divert the connection's bytes here and start the detection timeout."""
        passthrough = self.passthrough
        self.timer = passthrough.reactor.callLater(passthrough.settings.detection_timeout, self._timed_out)
        self.conn.divert(self)

    def take_buffer(self) -> bytes:
        """The client bytes held so far (for the tunnel, which sends them first)."""
        data, self.buffer = self.buffer, b""
        return data

    def write(self, data):
        self.buffer += data
        if not self.decided:
            kind = classify(self.buffer)
            if kind is not None:
                self._decide(kind)
        elif len(self.buffer) > _CONNECT_BUFFER:
            self.conn.pause_detection()  # the splice resumes it

    def loseConnection(self):
        conn = self.conn
        if conn.closing:
            self._cancel_timer()
            self.passthrough.forget(self)
            if self.connector is not None:
                self.connector.disconnect()
        elif not self.decided:
            self._decide(classify(self.buffer) or classify_at_timeout(self.buffer))

    def _timed_out(self):
        self.timer = None
        if not self.decided:
            self._decide(classify_at_timeout(self.buffer))

    def _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _decide(self, kind):
        self.decided = True
        self._cancel_timer()
        if kind != HTTP:
            self.passthrough.open_tunnel(self)
            return
        self.passthrough.forget(self)
        self.conn.resume_http(self.take_buffer())
