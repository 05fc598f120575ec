"""The HTTP/1.1 server codec: parse requests, hand them to exchanges, frame their responses.

A :class:`DownstreamConnection` is a Twisted protocol around an httptools
(llhttp) request parser, and the :class:`mesh.proxy.streams.IDownstreamStream`
of each of its exchanges: every HTTP/1 byte sent to the client (response
heads, chunk framing, ``100 Continue``, keep-alive) is written here.

llhttp is strict: it rejects Content-Length together with Transfer-Encoding,
duplicate Content-Length, obs-fold and bad tokens, and each of those ends the
connection with a 400.  This module adds the limits on
head size and header count (431), the HTTP version check (505), and the
timers for slow and idle clients.

What a request is framed and matched by is exactly what is forwarded (see
docs/security.md): header values lose their trailing whitespace, a
``Connection`` header cannot take Content-Length, Transfer-Encoding or Host
out of framing, a Transfer-Encoding other than ``chunked`` is refused (501),
the Host must be a valid authority and the target carry no fragment (400),
and only a WebSocket upgrade is forwarded as one: any other (``h2c``) goes to
the app as a plain request.

Requests are answered in order.  A pipelined request waits, body buffered, for
the one before it; reading pauses when too many are queued.

A transparently captured connection first meets the detect stage
(:mod:`mesh.proxy.detect`): until it has decided, the connection's bytes are
diverted to it (:meth:`DownstreamConnection.divert`); then it gives them back
(:meth:`DownstreamConnection.resume_http`) or a TCP tunnel takes the
connection over (:meth:`DownstreamConnection.splice`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import deque

import httptools
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from mesh.proxy.codec.heads import (
    CHUNKED,
    CLOSE,
    FRAMING,
    HOP_BY_HOP,
    connection_tokens,
    local_response,
    response_head,
    simple_response,
)
from mesh.proxy.context import RequestContext
from mesh.proxy.deadline import Deadlines
from mesh.proxy.detect import H2_PREFACE, detect
from mesh.proxy.exchange import Exchange
from mesh.proxy.original_dst import original_dst
from mesh.proxy.outcome import LocalReply
from mesh.proxy.sockets import set_nodelay, unbuffer_tls, write_through
from mesh.proxy.streams import Backpressure, IDownstreamStream

log = Logger()

_CHUNK_END = b"0\r\n\r\n"
#: llhttp's error once it has read the whole HTTP/2 preface (h2c with prior knowledge).
_H2_PREFACE_READ = "Pause on PRI/Upgrade"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: Request headers the codec handles itself and never forwards as they are
#: (HTTP2-Settings belongs to an h2c upgrade, which is never forwarded).
_CONSUMED = HOP_BY_HOP | {b"host", b"expect", b"x-forwarded-for", b"x-forwarded-client-cert", b"http2-settings"}

#: A valid Host value (RFC 9110 section 7.2, RFC 3986 section 3.2.2): an IP
#: literal or a reg-name (which covers IPv4), then an optional port.  Stricter
#: than RFC 3986 in one point: no comma, which only a list of hosts has.
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9._~!$&'()*+;=-]|%[0-9A-Fa-f]{2})+)(?::([0-9]{1,5}))?")

#: Heads fed to a fresh parser so that it reads the body of a request whose
#: upgrade was declined (see ``DownstreamConnection._continue_http``).
_LENGTH_PRIMER = b"PUT / HTTP/1.1\r\ncontent-length: %d\r\n\r\n"
_CHUNKED_PRIMER = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"

#: Lower-case ``Connection`` values that name no header beyond :data:`_CONSUMED`.
_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "upgrade"})

#: Header name as received -> ``(lower-case bytes, lower-case str)``: see :func:`_header_name`.
_HEADER_NAMES = {}
_HEADER_NAMES_MAX = 4096


class _Reject(Exception):
    """Raised inside a parser callback to answer with an error and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


#: The variant digit of :func:`new_request_id` for each random hex digit (its two low bits).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_request_id(_urandom=os.urandom) -> str:
    """A random RFC 4122 version 4 UUID string, as ``str(uuid.uuid4())`` gives.

    Built from the same 16 random bytes as :func:`uuid.uuid4`, without the
    :class:`uuid.UUID` object (a third of the cost): the version nibble (13th
    hex digit) is set to 4, and the variant (17th digit) to 8, 9, a or b
    using two of the random bits it replaces.
    """
    h = _urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def _header_name(name: bytes) -> tuple:
    """``(lower-case bytes, lower-case str)`` of a request header name, remembered.

    The same few names come with every request, and a dict lookup costs less
    than lowering and decoding them each time.  The hot loop inlines the
    lookup as ``_HEADER_NAMES.get(name) or _header_name(name)``.  Names
    beyond the first 4096 distinct ones are not remembered.
    """
    entry = _HEADER_NAMES.get(name)
    if entry is None:
        lname = name.lower()
        entry = (lname, lname.decode("latin-1"))
        if len(_HEADER_NAMES) < _HEADER_NAMES_MAX:
            _HEADER_NAMES[name] = entry
    return entry


def normalise_host(authority: bytes) -> str:
    """``"Foo.Example:8080"`` -> ``"foo.example"``; ``"[::1]:80"`` -> ``"::1"``.

    An empty authority gives ``""``.  Raises ``_Reject`` (400) for a value
    that is no valid authority (``a, b``, ``a b``, ``a@b``, port 99999), which
    the caller answers, and :class:`_RootDot` for ``a.local.`` (``a.local.:80``).
    """
    if authority:
        valid = _AUTHORITY.fullmatch(authority)
        if valid is None or (valid.group(1) is not None and int(valid.group(1)) > 65535):
            raise _Reject(400, f"invalid Host {authority.decode('latin-1')!r}: expected a host name or "
                               "IP address and an optional port, such as example.com:8080")
    host = authority.decode("latin-1").lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    if host.endswith("."):  # a name, not an IP literal: one ":" at most
        name, colon, port = authority.partition(b":")
        raise _RootDot(name[:-1] + colon + port, host[:-1])
    return host


@implementer(IHalfCloseableProtocol, IHandshakeListener, IDownstreamStream)
class DownstreamConnection(Protocol):
    """One client connection to a listener (inbound or outbound), and the downstream stream of its exchanges.

    Over mTLS, ``peer`` is the caller's verified SPIFFE id and
    ``forward_headers`` carries the x-forwarded-client-cert sent to the app.

    It is also the :class:`mesh.api.ConnectionView` the connection hooks
    get (``direction``, ``protocol``, ``source_address``, ``destination``,
    ``upstream``, ``peer``, ``start``, ``duration``, ``bytes_received``,
    ``bytes_sent``, ``requests``), with ``cluster`` and ``response_flags``
    for a TCP tunnel.  ``closing`` (the connection is ending) and
    ``read_closed`` (the client half-closed) are read-only outside.
    """

    def __init__(self, listener):
        self.listener = listener
        self.limits = listener.limits
        self.parser = httptools.HttpRequestParser(self)
        self.queue = deque()
        self.reading = None
        self.closing = False
        self.read_closed = False
        self.draining = False  # see drain()
        self._final_words = None  # an error response owed after the queued requests (see reject)
        self._close_after = None  # the exchange after whose response the connection closes (see finished)
        self.tunnel = None  # where client bytes go instead of the parser: see divert() and splice()
        self._tunnel_consumer = None  # the spliced upstream's transport while the client feeds it (see splice)
        self.upgrade_buffer = None
        self.source_address = ""
        self.original_dst = None  # (ip, port) before an iptables REDIRECT (mesh.proxy.original_dst)
        self.peer = None
        self.forward_headers = ()
        self.last_activity = 0.0
        self.head_started = None
        self.deadlines = Deadlines(listener.reactor)
        self._progress_seen = None
        self._pauses = set()
        self._pending_head = None  # a response head held back until the first body bytes (see send_head)
        self._chunked = False  # the current response is sent chunked
        self._response_close = False  # the current response ends the connection
        self._response_link = None  # see link_response
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        # -- the mesh.api.ConnectionView the connection hooks see
        self.direction = listener.direction
        self.protocol = "http/1.1"
        self.upstream = None
        self.cluster = None
        self.response_flags = ""
        self.start = 0.0
        self.duration = 0.0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.requests = 0
        self.reported = False  # mesh_connection_open was called (see Listener.report_open)

    @property
    def destination(self):
        """The original destination ``(ip, port)`` of a captured connection, else None."""
        return self.original_dst

    # -- Twisted Protocol ---------------------------------------------------
    def connectionMade(self):
        set_nodelay(self.transport)
        write_through(self.transport)
        self.source_address = self.transport.getPeer().host
        self.original_dst = original_dst(self.transport)  # transparent capture: once per connection
        listener = self.listener
        self.start = self.last_activity = listener.reactor.seconds()
        listener.connection_opened(self)
        if self.original_dst is None or listener.passthrough is None or not detect(self, listener.passthrough):
            listener.report_open(self)

    def handshakeCompleted(self):
        """mTLS is up (chain verified by OpenSSL): learn who the caller is, and speak what ALPN chose."""
        self.peer, self.forward_headers = self.listener.tls_peer(self.transport)
        unbuffer_tls(self.transport)
        if self.transport.negotiatedProtocol == b"h2":
            self._speak_h2(b"")

    def dataReceived(self, data):
        self.last_activity = self.listener.reactor.seconds()
        self.bytes_received += len(data)
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.upgrade_buffer is not None:
            self.upgrade_buffer.append(data)
            return
        if self.closing:
            return
        while True:  # more than once only after a declined upgrade
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                data = data[upgrade.args[0]:]
                if self.queue and self.queue[-1].upgrade:  # a WebSocket handshake, forwarded as one
                    self.upgrade_buffer = [data]
                    self._pause("upgrade")
                elif self._continue_http() and data:
                    continue  # an upgrade the proxy declined: what follows goes to the fresh parser
            except httptools.HttpParserCallbackError as error:
                reject = error.__context__
                if isinstance(reject, (_Reject, LocalReply)):  # LocalReply: a path refused (mesh.proxy.paths)
                    self.reject(reject.status, reject.message)
                else:
                    log.failure("request handling failed")
                    self.reject(500, "internal proxy error; see the proxy log")
            except httptools.HttpParserError as error:
                message = str(error)
                if message == "Invalid HTTP version":  # llhttp knows only 0.9, 1.0, 1.1 and 2.0
                    self.reject(505, "this HTTP version is not supported on this port; use HTTP/1.1")
                elif message == _H2_PREFACE_READ and not self.requests:
                    self._speak_h2(data)
                else:
                    self.reject(400, f"malformed HTTP request: {error}")
            return

    def connectionLost(self, reason=None):
        self.closing = True
        listener = self.listener
        listener.connection_closed(self)
        self.deadlines.stop()
        if self.tunnel is not None:
            self._client_bytes_ended()
            self.tunnel.loseConnection()
            self.tunnel = None
        self._drop_queue()
        if self.protocol != "tcp":  # a TCP tunnel reports when it ends (mesh.proxy.passthrough)
            listener.report_complete(self)

    def readConnectionLost(self):
        """The client half-closed: answer what it sent, then close."""
        self.read_closed = True
        if self.tunnel is not None:
            self._client_bytes_ended()
            self.tunnel.loseConnection()
            return
        if self.reading is not None:
            self._drop_queue()  # a request body was cut short
        if not self.queue:
            self.closing = True
            self.transport.loseConnection()

    def writeConnectionLost(self):
        if self.tunnel is None or self.read_closed:
            self.transport.loseConnection()
        # else: a TCP tunnel passed on the destination's FIN; the client may still send

    def _speak_h2(self, data):
        """The client speaks HTTP/2: the HTTP/2 codec takes the connection over (docs/protocols.md).

        ``data`` is the read that completed the preface (prior knowledge, the connection's first
        24 bytes); the frames after it in ``data`` go to the HTTP/2 codec with the preface.
        """
        from mesh.proxy.codec.h2_server import take_over  # imported here: h2_server imports this module

        take_over(self, H2_PREFACE + data[len(data) - (self.bytes_received - len(H2_PREFACE)):] if data else b"")

    def _drop_queue(self):
        queue = list(self.queue)
        self.queue.clear()
        for exchange in queue:
            exchange.downstream_lost()

    # -- httptools callbacks ----------------------------------------------------
    def on_message_begin(self):
        self.head_started = self.last_activity
        self._head_bytes = 0
        self._headers = []
        self._url = b""

    def on_url(self, url):
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            raise self._head_too_large()

    def on_header(self, name, value):
        if value and value[-1] <= 32:  # rare: trailing SP/HTAB (RFC 9110 5.5; llhttp drops only leading ones)
            value = value.rstrip(b" \t")  # so that policies match what the app reads (Host: "a.local ")
        headers = self._headers
        headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        limits = self.limits
        if self._head_bytes > limits.max_header_bytes or len(headers) > limits.max_headers:
            raise self._head_too_large()

    def _head_too_large(self) -> _Reject:
        """The 431 for a head over ``--max-header-bytes`` or ``--max-headers`` (checked inline: hot path)."""
        limits = self.limits
        if self._head_bytes > limits.max_header_bytes:
            return _Reject(431, f"request head larger than {limits.max_header_bytes} bytes")
        return _Reject(431, f"too many request headers (limit {limits.max_headers})")

    def on_headers_complete(self):
        self.head_started = None
        if self.closing:
            return
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Reject(505, f"HTTP/{version} is not supported on this port; use HTTP/1.1")
        exchange = self._exchange(parser, version)
        self.requests += 1
        queue = self.queue
        queue.append(exchange)
        if len(queue) == 1:
            exchange.start()
        elif len(queue) > self.limits.max_pipeline:
            self._pause("pipeline")

    def on_body(self, body):
        exchange = self.reading
        if exchange is not None:
            exchange.request_body(body)

    def on_message_complete(self):
        exchange = self.reading
        if exchange is not None:
            self.reading = None
            exchange.request_end()

    # -- building the context -------------------------------------------------
    def _exchange(self, parser, version):
        """The :class:`Exchange` of a parsed head; it becomes ``self.reading``, which gets the body."""
        fields = self._fields(_CONSUMED)
        connection = fields[0].get("connection")
        if connection is not None and connection.lower() not in _PLAIN_CONNECTION:
            # Rare: the Connection header names more headers not to forward
            # (RFC 9110 7.6.1); read the fields again without them.
            # Never the framing headers: the body must stay framed as it was parsed.
            listed = connection_tokens(connection.encode("latin-1")) - FRAMING
            if not listed <= _CONSUMED:
                fields = self._fields(_CONSUMED | listed)
        headers, raw, authority, expect_continue, framing, content_length = fields
        method = parser.get_method().decode("latin-1")
        if method == "CONNECT":
            raise _Reject(405, "CONNECT is not supported; send plain HTTP requests to the sidecar")
        target = self._url
        if 0x23 in target:  # "#" (an int test: a tenth of the cost of b"#" in target)
            raise _Reject(400, "a fragment ('#...') is not allowed in the request target; "
                               "send the path and query only")
        if not target.startswith(b"/"):
            target, authority = _origin_form(target)
        if authority is None:
            if version == "1.1":
                raise _Reject(400, "missing Host header (required by HTTP/1.1)")
            authority = b""
        if framing == "length" and self.limits.max_request_body and content_length > self.limits.max_request_body:
            raise _Reject(413, f"request body larger than {self.limits.max_request_body} bytes")
        listener = self.listener
        try:
            host = listener.host_of(authority)
        except _RootDot as dotted:  # rare: "a.local." is matched, routed and forwarded as "a.local"
            authority, host = dotted.authority, dotted.host
        upgrade = body_later = False
        if "upgrade" in headers and parser.should_upgrade():  # rare; llhttp leaves this request's body unread
            upgrade = headers["upgrade"].lower() == "websocket" and framing is None
            body_later = framing is not None and not upgrade  # see _continue_http
        ctx = RequestContext(
            listener.direction, method, target.decode("latin-1"), host,
            authority, headers, raw, version, headers.get("x-request-id") or new_request_id(),
            self.source_address, self.last_activity, self.peer, listener.normalize_path)
        if self.original_dst is not None:  # transparent capture (mesh.proxy.original_dst)
            ctx.extra["original_dst"] = self.original_dst
        exchange = Exchange(self, listener, ctx, framing, content_length, expect_continue, upgrade)
        if self._close_after is None and not (parser.should_keep_alive() and not self.draining):
            self._close_after = exchange
        self.reading = None if body_later else exchange
        return exchange

    def _continue_http(self) -> bool:
        """After an upgrade the proxy declined: a fresh parser for what follows.

        Only a WebSocket handshake without a body is forwarded as an upgrade
        (see :meth:`_exchange`).  Any other (``h2c``, unknown protocols, one
        with a body) went on as a plain request without Upgrade, Connection
        and HTTP2-Settings, as Envoy forwards h2c, so the app can never switch
        this connection to a protocol the proxy does not read.  llhttp takes
        all bytes after such a request's head for the new protocol, its body
        too: if the body is still to come, the fresh parser is first fed a
        head of our own with the request's framing, so that it frames the
        body exactly as declared and gives it to that request.  False if the
        connection is closing (the request was refused): nothing to read.
        """
        if self.closing:
            return False
        self.parser = parser = httptools.HttpRequestParser(self)
        exchange = self.queue[-1] if self.queue else None  # the declined request, if not yet answered
        if exchange is not None and not exchange.body_done:
            self.reading = exchange
            primer = (_LENGTH_PRIMER % exchange.content_length if exchange.framing == "length"
                      else _CHUNKED_PRIMER)
            self.closing = True  # the primer's head is ours: on_headers_complete ignores heads while closing
            try:
                parser.feed_data(primer)
            finally:
                self.closing = False
        return True

    def _fields(self, consumed):
        """Read the received header fields once, for the context and the forwarded head.

        Returns ``(headers, raw, authority, expect_continue, framing,
        content_length)``: ``headers`` maps lower-case names to values (``str``,
        repeats joined with ``", "``), ``raw`` holds the ``(name, value)`` pairs
        to forward, i.e. all but those named in ``consumed`` and Content-Length.
        """
        headers = {}
        raw = []
        authority = None
        expect_continue = False
        framing = None
        content_length = 0
        names = _HEADER_NAMES
        for pair in self._headers:
            name, value = pair
            lname, key = names.get(name) or _header_name(name)
            text = value.decode("latin-1")
            if key in headers:
                headers[key] += "," + text
            else:
                headers[key] = text
            if lname in consumed:
                if lname == b"host":
                    if authority is not None:
                        raise _Reject(400, "more than one Host header")
                    authority = value
                elif lname == b"expect":
                    if value.lower() != b"100-continue":
                        raise _Reject(417, "only 'Expect: 100-continue' is supported")
                    expect_continue = True
                elif lname == b"transfer-encoding":
                    if value.lower() != b"chunked":  # llhttp takes "gzip, chunked" as chunked
                        raise _Reject(501, f"Transfer-Encoding {value.decode('latin-1')!r} is not supported; "
                                           "send 'chunked' or a Content-Length")
                    framing = "chunked"
                continue
            if lname == b"content-length":
                if framing is None:
                    content_length = int(value)
                    framing = "length" if content_length else None
                continue
            raw.append(pair)
        return headers, raw, authority, expect_continue, framing, content_length

    # -- the downstream stream of the active exchange (mesh.proxy.streams.IDownstreamStream) --------
    def send_continue(self):
        """``100 Continue``: the client may send the body it holds back."""
        self.bytes_sent += len(_CONTINUE)
        self.transport.write(_CONTINUE)

    def send_head(self, exchange, status, reason, headers):
        """Serialize the response head and decide the response's framing.

        The head is held back until the first body bytes, so that a small
        response takes one write instead of two, or until the upstream data
        at hand is parsed (:meth:`flush`).  A 101 is written at once.
        """
        head, framing = response_head(status, reason, headers, exchange.action.response_headers,
                                      exchange.head_only, exchange.ctx.http_version,
                                      exchange is not self._close_after and not exchange.upgrade, status == 101)
        if status == 101:
            self.bytes_sent += len(head)
            self.transport.write(head)
            return
        self._chunked = framing is CHUNKED
        self._response_close = framing is CLOSE
        self._pending_head = head

    def flush(self):
        """Write a response head held back by :meth:`send_head`, if any."""
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            self.bytes_sent += len(head)
            self.transport.write(head)

    def send_body(self, data):
        """Response body bytes, chunk-framed if the response is chunked, after any held-back head."""
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            data = head + data
        self.bytes_sent += len(data)
        self.transport.write(data)

    def send_end(self):
        """The response is complete: any held-back head, and the last chunk of a chunked body."""
        head = self._pending_head  # flush(), inlined: once per request
        if head is not None:
            self._pending_head = None
            self.bytes_sent += len(head)
            self.transport.write(head)
        if self._chunked:
            self.bytes_sent += len(_CHUNK_END)
            self.transport.write(_CHUNK_END)

    def send_trailers(self, headers):
        """Response trailers, in the last chunk of a chunked response (:meth:`send_end`, which follows,
        then adds nothing); a response framed otherwise has no place for them: they are dropped."""
        if self._chunked:
            self._chunked = False
            self.send_body(b"0\r\n%s\r\n" % b"".join(b"%s: %s\r\n" % pair for pair in headers))

    def send_local(self, exchange, status, body, headers):
        """A proxy-generated response; the connection closes after it if the request body was not read."""
        if not exchange.body_done:
            self._response_close = True  # unread body left on the wire
        ctx = exchange.ctx
        data = local_response(status, ctx.response_flags, body, exchange.head_only, ctx.request_id, headers,
                              self._response_close or exchange is self._close_after or exchange.upgrade)
        self.bytes_sent += len(data)
        self.transport.write(data)

    def abort(self):
        """Cut the client off at once (no FIN after pending bytes: a reset)."""
        self.closing = True
        self.transport.abortConnection()

    def pause_reading(self):
        """Stop reading from the client until :meth:`resume_reading` (the upstream is behind)."""
        self._pause("upstream")

    def resume_reading(self):
        self._resume("upstream")

    def link_response(self, upstream):
        """From now on a full client buffer pauses reading from ``upstream``.

        An exchange links only a response larger than 64 KiB: a Twisted
        transport asks its producer to pause only when a write leaves more
        than that buffered, so for a small response the link would never be
        used.
        """
        self._response_link = link = Backpressure(upstream.pause_reading, upstream.resume_reading)
        self.transport.registerProducer(link, True)

    def unlink_response(self):
        """Undo :meth:`link_response`; the upstream is never left paused."""
        link = self._response_link
        if link is not None:
            self._response_link = None
            self.transport.unregisterProducer()
            link.release()

    def finished(self, exchange):
        """The active exchange has sent its whole response: answer the next request, or close."""
        keep_alive = (exchange is not self._close_after and not exchange.upgrade and not self._response_close
                      and exchange.body_done)
        self._response_close = False
        queue = self.queue
        if queue and queue[0] is exchange:
            queue.popleft()
        if not keep_alive or (self.read_closed and not queue):
            self.closing = True
            self._drop_queue()
            if self._final_words is not None and keep_alive:
                self.bytes_sent += len(self._final_words)
                self.transport.write(self._final_words)
            self.transport.loseConnection()
            return
        self.last_activity = exchange.ended  # the reactor time the exchange read as it finished
        if len(queue) <= self.limits.max_pipeline:
            self._resume("pipeline")
        if queue:
            queue[0].start()

    def start_tunnel(self, upstream, rest):
        """Splice this connection to an upgraded (101) upstream connection: a WebSocket."""
        self.splice(upstream, upstream.transport, rest, self.upgrade_buffer or ())

    # -- the connection as a whole ---------------------------------------------------------
    def drain(self):
        """The proxy is shutting down: end this connection as soon as nothing is in flight.

        Idle: closed now.  Busy: the last request received so far (and any
        that still arrives) is answered with ``connection: close``, and the
        connection closes after that response, so a keep-alive client learns
        not to reuse it instead of racing the close.
        """
        self.draining = True
        if self.closing:
            return
        if self.is_idle():
            self.closing = True
            self.transport.loseConnection()  # FIN, after any pending bytes
        elif self.queue and self._close_after is None:
            self._close_after = self.queue[-1]

    def is_idle(self) -> bool:
        """Nothing in flight: no request queued or arriving, no tunnel (and not closing already)."""
        return not (self.closing or self.queue or self.tunnel is not None or self.head_started is not None)

    def close(self):
        """Close after the pending bytes (FIN): the tunnel's upstream has gone, or it was never made."""
        self._upstream_bytes_ended()
        self.transport.loseConnection()

    def close_write(self):
        """Half-close: no more bytes to the client (a FIN; over mesh mTLS a close_notify, see
        :mod:`mesh.proxy.tls_transport`); it may still send."""
        self._upstream_bytes_ended()
        half_close = getattr(self.transport, "loseWriteConnection", None)
        (half_close or self.transport.loseConnection)()

    def _client_bytes_ended(self):
        """The client sends no more (its FIN, or it went): it stops being the producer of the spliced upstream.

        Twisted closes or half-closes a transport once its write buffer has drained, but not while
        a producer it paused is still registered: it resumes that producer instead, and the FIN
        waits for a write that never comes.  Over TLS a FIN (close_notify) is read in the same
        event as the bytes before it, which may just have filled the upstream's buffer.
        """
        consumer, self._tunnel_consumer = self._tunnel_consumer, None
        if consumer is not None:
            consumer.unregisterProducer()

    def _upstream_bytes_ended(self):
        """The tunnel's upstream sends no more: it stops being this transport's producer, before this
        transport closes or half-closes (see :meth:`_client_bytes_ended`)."""
        self.transport.unregisterProducer()

    def divert(self, receiver):
        """Until :meth:`resume_http` or :meth:`splice`, client bytes go to ``receiver`` instead of the parser.

        The detect stage (:mod:`mesh.proxy.detect`) uses it: ``receiver.write(data)``
        gets the bytes, ``receiver.loseConnection()`` is called when the client
        half-closes (``read_closed``) or goes away (``closing``).
        """
        self.tunnel = receiver

    def resume_http(self, data):
        """The detect stage decided HTTP: parse ``data`` (the bytes it held), then what follows."""
        self.tunnel = None
        self.listener.report_open(self)
        if data:
            self.bytes_received -= len(data)  # counted once already, when they arrived
            self.dataReceived(data)
        if self.read_closed:
            self.readConnectionLost()

    def pause_detection(self):
        """The detect stage holds too many bytes: stop reading until :meth:`splice`."""
        self._pause("upstream")

    def become_tunnel(self):
        """The detect stage decided TCP: from now on the tunnel (:mod:`mesh.proxy.passthrough`), not this
        codec, reports the connection to the connection hooks."""
        self.protocol = "tcp"

    def tunnel_state(self, cluster, flags, upstream, sent=None, received=None):
        """What the connection hooks see of a TCP tunnel: its ``cluster``, response ``flags``, the
        ``upstream`` it connected to and, when it ends, the bytes that went through it (``sent``:
        destination -> client, ``received``: client -> destination; none if it never opened)."""
        self.cluster = cluster
        self.response_flags = flags
        self.upstream = upstream
        if sent is not None:
            self.bytes_sent = sent
            self.bytes_received = received

    def splice(self, upstream, receiver, rest=b"", pending=()):
        """From now on this connection is a tunnel to ``upstream`` (a protocol with a ``tunnel`` slot).

        Client bytes go to ``receiver.write`` (the upstream's transport, or a
        TCP tunnel that counts them), ``pending`` client bytes already read
        go to the upstream's transport first, and ``rest`` (upstream bytes
        already read) to the client.  Producers are registered both ways,
        so each side's full buffer pauses the other; the idle timeout still
        applies (:meth:`check_timers`).
        """
        self.queue.clear()
        self.tunnel = receiver
        upstream.tunnel = _TunnelWriter(self)
        if rest:
            self.bytes_sent += len(rest)
            self.transport.write(rest)
        for data in pending:
            if data:
                upstream.transport.write(data)
        self.upgrade_buffer = None
        self.transport.registerProducer(upstream.transport, True)
        if not self.read_closed:  # the client may still send: the upstream's full buffer pauses it
            upstream.transport.registerProducer(self.transport, True)
            self._tunnel_consumer = upstream.transport
        self._pauses.clear()
        self.transport.resumeProducing()

    # -- errors and timers ----------------------------------------------------------
    def reject(self, status, message):
        """Answer a request we could not parse or accept, then close."""
        if self.closing or self._final_words is not None:
            return
        exchange = self.reading
        if exchange is None and self.queue:
            # The pipelined requests before the bad one arrived whole: answer them first,
            # in order, then the error, then close (RFC 9112, section 9.3.2).
            self._final_words = simple_response(status, "", message.encode() + b"\n")
            self.read_closed = True
            self._pause("rejected")
            return
        if (exchange is not None and self.queue and self.queue[0] is exchange
                and not exchange.response_started):
            # The body of the request being answered is malformed (a bad chunk): that
            # request gets the error; the exchange closes, as its body was not read.
            exchange.local_reply(status, "", message)
            return
        self.closing = True
        if not self.queue:
            data = simple_response(status, "", message.encode() + b"\n")
            self.bytes_sent += len(data)
            self.transport.write(data)
        else:
            self._drop_queue()
        self.transport.loseConnection()

    def set_idle_timeout(self, seconds):
        """Give this connection its own idle timeout instead of the listener's (a routed TCP tunnel's,
        :mod:`mesh.proxy.tcp_proxy`); 0: none."""
        self.limits = dataclasses.replace(self.limits, idle_timeout=seconds or math.inf)

    def check_timers(self, now):
        """Called about once a second: enforce the head timeout, and the idle timeout of a connection with no
        request in flight (kept alive, or a tunnel).

        A request in flight has no idle timeout, as Istio's sidecars (``stream_idle_timeout: 0s``): its
        upstream may answer or pause as long as it likes (a route timeout bounds that), its body may
        trickle in.  Only a client that takes none of a response held for it (the link to the upstream
        paused on its full buffer, :meth:`link_response`) for the idle timeout is cut.
        """
        limits = self.limits
        if self.head_started is not None and now - self.head_started > limits.header_timeout:
            self.reject(408, f"request head not received within {limits.header_timeout:g}s")
        elif now - self.last_activity > limits.idle_timeout:
            if self.queue:
                link = self._response_link
                if link is None or not link.paused:
                    return
                exchange = self.queue[0]
                moved = exchange.ctx.bytes_sent
                if (exchange, moved) != self._progress_seen:
                    self._progress_seen = (exchange, moved)
                    self.last_activity = now
                    return
                self.abort()
            elif self.tunnel is not None:
                self.abort()
            else:
                self.closing = True
                self.transport.loseConnection()

    def _pause(self, reason):
        if not self._pauses:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def _resume(self, reason):
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses:
                self.transport.resumeProducing()


class _TunnelWriter:
    """The client side of a tunnel as the upstream writes to it: bytes the
    server pushes count as activity, so a push-only WebSocket is not idle."""

    __slots__ = ("_conn",)

    def __init__(self, conn):
        self._conn = conn

    def write(self, data):
        conn = self._conn
        conn.last_activity = conn.listener.reactor.seconds()
        conn.bytes_sent += len(data)
        conn.transport.write(data)

    def loseConnection(self):
        self._conn.close()


def _origin_form(target: bytes):
    """Absolute-form ``http://host/path`` -> (``/path``, ``host``).

    The target's host replaces any Host header (RFC 9112 section 3.2.2, and
    Envoy), so the host a policy matches is the one the app is sent.
    """
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise _Reject(400, "invalid request target") from None
    if url.host is None:
        raise _Reject(400, "invalid request target")
    host = b"[%s]" % url.host if b":" in url.host else url.host
    if url.port:
        host += b":%d" % url.port
    path = (url.path or b"/") + (b"?" + url.query if url.query else b"")
    return path, host


class _RootDot(Exception):
    """Raised by :func:`normalise_host` for a host with a trailing dot: the request is for
    ``authority`` and ``host``, without it (never cached, so the usual host costs nothing more).

    One trailing dot (the DNS root) is dropped from what is matched, routed
    and forwarded, as Envoy's ``strip_trailing_host_dot`` and nginx do, so
    ``a.local.`` cannot pass a policy on ``a.local`` and still reach its app.
    """

    def __init__(self, authority: bytes, host: str):
        super().__init__(authority)
        self.authority = authority
        self.host = host


class DownstreamFactory(ServerFactory):
    """Builds a :class:`DownstreamConnection` (or the subclass ``protocol``) per accepted socket the listener
    admits (:meth:`Listener.admit`)."""

    noisy = False
    protocol = DownstreamConnection

    def __init__(self, listener):
        self.listener = listener

    def buildProtocol(self, addr):
        if not self.listener.admit():
            return None  # Twisted closes the socket
        return self.protocol(self.listener)
