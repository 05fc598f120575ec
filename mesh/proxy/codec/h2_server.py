"""The HTTP/2 server codec: clients that speak HTTP/2 to the sidecar, one exchange per stream.

Every connection starts in the HTTP/1 codec (:mod:`mesh.proxy.codec.http1_server`), which
hands it to :func:`take_over` when the client speaks HTTP/2 (docs/protocols.md): it sent the
HTTP/2 preface first (h2c with prior knowledge, detected for free: llhttp stops on it), or it
negotiated ALPN ``h2`` in the mTLS handshake of the inbound port.

An :class:`H2ServerConnection` wraps an HTTP/2 server connection: libnghttp2's session
(:mod:`mesh.proxy.codec.nghttp2_session`) or h2's, as ``--http2-engine`` says, behind h2's
interface.  Each request stream is an :class:`H2Stream`, the :class:`mesh.proxy.streams.IDownstreamStream` of one
:class:`mesh.proxy.exchange.Exchange`, with the same :class:`mesh.proxy.context.RequestContext`
fields as HTTP/1 (``http_version`` ``"2"``, which the access log shows as ``HTTP/2``).
A stream that fails is reset (RST_STREAM); the connection and its other streams go on.

Flow control, both ways:

- request bodies: DATA is acknowledged (WINDOW_UPDATE) only while the stream's exchange takes
  it; while its upstream's buffer is full (:meth:`H2Stream.pause_reading`) the bytes stay
  unacknowledged, so a slow upstream closes the client's window of that stream;
- responses: DATA goes out within the client's windows and while the transport has room
  (the connection is the transport's producer).  What waits is held per stream; beyond
  :data:`STREAM_BUFFER` the stream's upstream is paused (:meth:`H2Stream.link_response`), so a
  client that never opens its window pins a bounded amount of memory, and a stream that cannot
  move for ``--idle-timeout`` is reset.

Limits, as Envoy's (defaults in docs/protocols.md): SETTINGS_MAX_CONCURRENT_STREAMS (a stream
over it is refused, REFUSED_STREAM), the initial windows, SETTINGS_MAX_HEADER_LIST_SIZE
(``--max-header-bytes``: 431 beyond it, the connection ends beyond twice it, where an HPACK bomb
is stopped while it is decoded; with HPACK in libnghttp2 it ends too for one field over 64 KiB,
which its decoder refuses), ``--max-headers`` (431), SETTINGS_MAX_FRAME_SIZE.  What h2 does
not bound, :class:`FrameGuard` does from the frame headers before h2 parses a byte: the header
block across CONTINUATION frames, the frame size before the frame is buffered, floods of PING and
SETTINGS (more than 1000 a second), of empty frames, of PRIORITY and of WINDOW_UPDATE frames.  Rapid reset is
Envoy's premature-reset rule (:data:`PREMATURE_RESET_MIN_STREAMS`).  Each ends the connection
with GOAWAY ENHANCE_YOUR_CALM.

Drain (:meth:`H2ServerConnection.drain`) is Envoy's: a GOAWAY announcing the shutdown and a
PING, then, once the PING is answered, the GOAWAY naming the last stream that will be served;
the streams in flight finish, then the connection closes.  h2 itself closes a connection for
good when it sends GOAWAY (python-hyper/h2 issue 1181), so those two frames are written here.
"""

from __future__ import annotations

from collections import deque

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import NoSuchStreamError, ProtocolError
from h2.settings import SettingCodes, Settings
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mesh.proxy.codec import hpack_c, nghttp2_session
from mesh.proxy.codec.h2_connection import MeshH2Connection
from mesh.proxy.codec.heads import HOP_BY_HOP, _apply_ops, connection_tokens
from mesh.proxy.codec.http1_server import _CONSUMED, _Reject, _RootDot, new_request_id
from mesh.proxy.context import RequestContext
from mesh.proxy.deadline import Deadlines
from mesh.proxy.detect import H2_PREFACE
from mesh.proxy.exchange import DONE, Exchange
from mesh.proxy.outcome import LocalReply
from mesh.proxy.sockets import after_poll
from mesh.proxy.streams import IDownstreamStream

log = Logger()

#: SETTINGS_MAX_FRAME_SIZE: the protocol's default and Envoy's.
MAX_FRAME_SIZE = 16384
#: Response bytes held per stream (the client's window or the transport is full) before its upstream is paused.
STREAM_BUFFER = 64 * 1024
#: Envoy's ``max_outbound_control_frames``: PING and SETTINGS frames (each owed an acknowledgement)
#: a client may send per second.  Envoy counts acknowledgements queued and not yet written; the
#: proxy writes at once, so it counts what a client asks for, which bounds the CPU a flood costs.
MAX_OWED_ACKS = 1000
#: Envoy's ``max_consecutive_inbound_frames_with_empty_payload``: HEADERS, CONTINUATION or DATA
#: frames in a row with no payload and no END_STREAM.
MAX_EMPTY_FRAMES = 1
#: Envoy's ``max_inbound_priority_frames_per_stream``.
MAX_PRIORITY_FRAMES_PER_STREAM = 100
#: Envoy's ``max_inbound_window_update_frames_per_data_frame_sent``.
MAX_WINDOW_UPDATES_PER_DATA_FRAME = 10
#: Envoy's premature-reset rule (CVE-2023-44487, rapid reset): a stream reset within
#: :data:`PREMATURE_RESET_SECONDS` of its start is premature; once a connection has closed
#: :data:`PREMATURE_RESET_MIN_STREAMS` streams, more than half of them premature ends it.
PREMATURE_RESET_SECONDS = 1.0
PREMATURE_RESET_MIN_STREAMS = 500
#: Seconds a drain waits for the PING that follows its first GOAWAY before it sends the last one.
DRAIN_NOTICE_SECONDS = 1.0

_DATA, _HEADERS, _PRIORITY, _SETTINGS, _PING, _WINDOW_UPDATE, _CONTINUATION = 0x0, 0x1, 0x2, 0x4, 0x6, 0x8, 0x9
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_LAST_STREAM_ID = 2**31 - 1
_DRAIN_PING = b"txdrain!"

#: h2's settings for every server connection.  What comes in is validated (h2's checks of names,
#: values and pseudo-headers are part of the defence).  What goes out is neither validated nor
#: normalized by h2: it is the codec's own, or an upstream's headers its parser has validated
#: already, and :func:`_forwardable` and :func:`_local_headers` normalize them as h2 would (names
#: lower-cased, values stripped, connection-specific headers dropped, credentials never indexed) in
#: the one pass they make anyway; h2's five-stage pipeline per header cost about 3 % of a request.
_CONFIG = H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False,
                          normalize_outbound_headers=False)

#: Headers HPACK must never add to its table (h2's rule: a compression-context attack could guess them).
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})

#: Headers a local reply cannot lose or change: they frame it.
_LOCAL_FRAMING = frozenset({b"content-length", b"connection", b"transfer-encoding"})


class Abuse(Exception):
    """A client broke the protocol or a limit that protects the proxy: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: ErrorCodes, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameGuard:
    """Reads the frame headers of what a client sends, before h2 parses it, and raises :class:`Abuse`.

    h2 buffers a whole frame before it checks its length, keeps up to 64 CONTINUATION frames
    of any size, and answers every PING and SETTINGS frame; the guard bounds them (the limits
    are the module's constants and the two given here).  The connection calls :meth:`new_second`
    once a second (``owed_acks`` counts per second), and counts ``data_frames`` as it sends DATA
    (WINDOW_UPDATE frames are allowed in proportion).
    ``in_block`` says that a header block is open (its HEADERS came, its END_HEADERS not yet).
    """

    __slots__ = ("max_frame_size", "max_header_block", "preface", "skip", "head", "block", "owed_acks", "empty",
                 "priority", "window_updates", "streams", "data_frames")

    def __init__(self, max_frame_size: int, max_header_block: int):
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_block
        self.preface = 0  # bytes of the preface checked
        self.skip = 0  # bytes of the current frame's payload still to come
        self.head = b""  # the part of a frame header a read ended in
        self.block = -1  # bytes of the open header block, -1: none open
        self.owed_acks = 0
        self.empty = 0
        self.priority = 0
        self.window_updates = 0
        self.streams = 0
        self.data_frames = 0

    @property
    def in_block(self) -> bool:
        return self.block >= 0

    def new_second(self) -> None:
        """Start counting PING and SETTINGS frames again."""
        self.owed_acks = 0

    def feed(self, data: bytes) -> None:
        """Check the frame headers that ``data`` (the next bytes from the client) completes."""
        pos, size = 0, len(data)
        if self.preface < len(H2_PREFACE):
            pos = min(len(H2_PREFACE) - self.preface, size)
            if data[:pos] != H2_PREFACE[self.preface:self.preface + pos]:
                raise Abuse(ErrorCodes.PROTOCOL_ERROR, "the connection did not start with the HTTP/2 preface")
            self.preface += pos
        while pos < size:
            if self.skip:
                step = min(self.skip, size - pos)
                pos += step
                self.skip -= step
                continue
            need = 9 - len(self.head)
            if size - pos < need:
                self.head += data[pos:]
                return
            header = self.head + data[pos:pos + need] if self.head else data[pos:pos + 9]
            self.head = b""
            pos += need
            self._frame(int.from_bytes(header[:3], "big"), header[3], header[4])

    def _frame(self, length: int, kind: int, flags: int) -> None:
        if length > self.max_frame_size:
            raise Abuse(ErrorCodes.FRAME_SIZE_ERROR,
                        f"a frame of {length} bytes, over SETTINGS_MAX_FRAME_SIZE {self.max_frame_size}")
        self.skip = length
        if kind == _DATA or kind == _HEADERS or kind == _CONTINUATION:
            if length == 0 and not (kind != _CONTINUATION and flags & _END_STREAM):
                self.empty += 1
                if self.empty > MAX_EMPTY_FRAMES:
                    raise Abuse(ErrorCodes.ENHANCE_YOUR_CALM, "a flood of empty frames")
            else:
                self.empty = 0
            if kind == _HEADERS:
                self.streams += 1
                self.block = -1 if flags & _END_HEADERS else length
            elif kind == _CONTINUATION and self.block >= 0:
                self.block += length
                if self.block > self.max_header_block:
                    raise Abuse(ErrorCodes.ENHANCE_YOUR_CALM, f"a header block over {self.max_header_block} bytes "
                                "(HEADERS and CONTINUATION frames)")
                if flags & _END_HEADERS:
                    self.block = -1
        elif kind == _PING or kind == _SETTINGS:
            if not flags & _ACK:
                self.owed_acks += 1
                if self.owed_acks > MAX_OWED_ACKS:
                    raise Abuse(ErrorCodes.ENHANCE_YOUR_CALM, "a flood of PING or SETTINGS frames")
        elif kind == _PRIORITY:
            self.priority += 1
            if self.priority > MAX_PRIORITY_FRAMES_PER_STREAM * (1 + self.streams):
                raise Abuse(ErrorCodes.ENHANCE_YOUR_CALM, "a flood of PRIORITY frames")
        elif kind == _WINDOW_UPDATE:
            self.window_updates += 1
            if self.window_updates > 5 + 2 * (self.streams + MAX_WINDOW_UPDATES_PER_DATA_FRAME * self.data_frames):
                raise Abuse(ErrorCodes.ENHANCE_YOUR_CALM, "a flood of WINDOW_UPDATE frames")


class _H2(MeshH2Connection):
    """h2's connection, leaving the concurrent-stream limit to the codec.

    h2 ends the whole connection (GOAWAY PROTOCOL_ERROR) when a client opens more streams than
    SETTINGS_MAX_CONCURRENT_STREAMS allows.  RFC 9113 (section 5.1.2) makes it a stream error,
    and Envoy refuses just that stream; :meth:`H2ServerConnection._request` does the same.
    """

    @property
    def open_inbound_streams(self) -> int:
        """0, so that h2 never refuses a stream (it still counts: counting forgets closed streams)."""
        super().open_inbound_streams  # noqa: B018
        return 0


def _settings(limits) -> Settings:
    """The listener's SETTINGS (sent by ``initiate_connection``)."""
    return Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: limits.http2_max_concurrent_streams,
        SettingCodes.INITIAL_WINDOW_SIZE: limits.http2_initial_stream_window,
        SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
    })


def _new_connection(limits):
    """A server connection on the HTTP/2 engine (:mod:`mesh.proxy.codec.nghttp2_session`, or h2's).

    A header list over SETTINGS_MAX_HEADER_LIST_SIZE gets a 431; decoding stops (and the connection
    ends: the HPACK state is lost) at twice it, which defuses an HPACK bomb as it expands.
    """
    if nghttp2_session.enabled():
        return nghttp2_session.Connection(False, _settings(limits), 2 * limits.max_header_bytes)
    return _new_h2(limits)


def _new_h2(limits) -> H2Connection:
    """A server connection on h2 with the listener's SETTINGS."""
    h2 = _H2(config=_CONFIG)
    hpack_c.install(h2)
    h2.local_settings = _settings(limits)
    h2.max_inbound_frame_size = MAX_FRAME_SIZE
    h2.decoder.max_header_list_size = 2 * limits.max_header_bytes
    return h2


def take_over(conn, data: bytes = b"") -> H2ServerConnection:
    """Speak HTTP/2 on the connection of the HTTP/1 codec ``conn`` from now on.

    ``data``: the client's bytes read so far (from the preface on), parsed again here.  The
    new connection replaces ``conn`` in the listener's set and, for the connection hooks,
    as the connection's :class:`mesh.api.ConnectionView` (``protocol`` ``"h2"``).
    """
    listener = conn.listener
    new = H2ServerConnection(listener)
    for name in ("source_address", "original_dst", "peer", "forward_headers", "start", "last_activity",
                 "bytes_received", "bytes_sent", "reported"):
        setattr(new, name, getattr(conn, name))
    new.bytes_received -= len(data)  # counted once already; dataReceived counts them again
    conn.reported = False
    conn.closing = True
    listener.connection_closed(conn)
    transport = conn.transport
    _rewire(transport, conn, new)
    new.makeConnection(transport)
    if data:
        new.dataReceived(data)
    return new


def _rewire(transport, old, new) -> None:
    """Make ``transport`` deliver to ``new`` what it delivered to ``old``.

    ``old`` is the protocol of a TCP transport, or wrapped by TLS (Twisted's
    ``TLSMemoryBIOProtocol``: its ``wrappedProtocol``), or the ``inner`` protocol of the
    inbound port's first-byte sniffer (:class:`mesh.proxy.mtls.InboundFactory`).
    """
    if getattr(transport, "wrappedProtocol", None) is old:
        transport.wrappedProtocol = new
    elif transport.protocol is old:
        transport.protocol = new
    else:
        transport.protocol.inner = new


_abuse_logged = {}  # listener direction -> when _log_abuse last logged


def _log_abuse(direction: str, client: str, reason: str, now: float) -> None:
    """A log line for a connection ended for abuse or a protocol error; at most one a minute per listener."""
    if now - _abuse_logged.get(direction, -60.0) >= 60.0:
        _abuse_logged[direction] = now
        log.info("{direction} HTTP/2 connection from {client} ended (GOAWAY ENHANCE_YOUR_CALM or protocol "
                 "error): {reason}; further ones are not logged for a minute", direction=direction,
                 client=client, reason=reason)


@implementer(IPushProducer)
class H2ServerConnection(Protocol):
    """One client connection that speaks HTTP/2, and its streams.

    It is one of the listener's connections (``last_activity``, ``check_timers``, ``is_idle``,
    ``drain``, ``abort``), the producer registered on its transport (a full transport pauses
    the responses and the reading of the client), and the :class:`mesh.api.ConnectionView` the
    connection hooks see, as :class:`mesh.proxy.codec.http1_server.DownstreamConnection` is.
    ``streams`` are the streams in flight by id; ``waiting`` those with response bytes held back.
    """

    def __init__(self, listener):
        self.listener = listener
        self.limits = limits = listener.limits
        self.h2 = _new_connection(limits)
        self.guard = FrameGuard(MAX_FRAME_SIZE, 2 * limits.max_header_bytes)
        self.streams = {}
        self.waiting = {}  # H2Stream -> None: an ordered set
        self.deadlines = Deadlines(listener.reactor)  # the route deadlines of every stream's exchange
        self.paused = False  # the transport's buffer is full
        self.send_queued = False  # a send_soon waits for the end of the poll
        self.closing = False
        self.draining = False
        self.shutdown = None  # None, then "notice" (first GOAWAY of a drain sent), then "final"
        self.notice_at = 0.0
        self.last_stream_id = _LAST_STREAM_ID  # streams above it are refused (after the last GOAWAY)
        self.block_started = None  # when the open header block began (header timeout)
        self.closed_streams = 0
        self.premature_resets = 0
        self.last_activity = 0.0
        # -- the mesh.api.ConnectionView the connection hooks see (take_over copies the rest)
        self.direction = listener.direction
        self.protocol = "h2"
        self.source_address = ""
        self.original_dst = None
        self.peer = None
        self.forward_headers = ()
        self.upstream = None
        self.cluster = None
        self.response_flags = ""
        self.start = 0.0
        self.duration = 0.0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.requests = 0
        self.reported = False

    @property
    def destination(self):
        """The original destination ``(ip, port)`` of a captured connection, else None."""
        return self.original_dst

    # -- Twisted Protocol ---------------------------------------------------
    def connectionMade(self):
        self.listener.connection_opened(self)
        self.transport.registerProducer(self, True)
        h2 = self.h2
        h2.initiate_connection()
        extra = self.limits.http2_initial_connection_window - h2.local_settings.initial_window_size
        if extra > 0:  # the connection's window starts at 65535 bytes whatever SETTINGS say
            h2.increment_flow_control_window(extra)
        self.send()

    def dataReceived(self, data):
        self.last_activity = now = self.listener.reactor.seconds()
        self.bytes_received += len(data)
        if self.closing:
            return
        guard = self.guard
        try:
            guard.feed(data)
            events = self.h2.receive_data(data)
        except Abuse as abuse:
            self._end(abuse.code, abuse.reason)
            return
        except ProtocolError as error:  # h2 has queued its GOAWAY
            self._end(None, f"protocol error: {error}")
            return
        if guard.in_block:
            if self.block_started is None:
                self.block_started = now
        else:
            self.block_started = None
        handlers = _HANDLERS
        try:
            for event in events:
                handler = handlers.get(event.__class__)
                if handler is not None:
                    handler(self, event)
                    if self.closing:
                        return
        except Exception:
            log.failure("HTTP/2 request handling failed; the connection is closed")
            self._end(ErrorCodes.INTERNAL_ERROR, "")
            return
        self.send()

    def connectionLost(self, reason=None):
        self.closing = True
        self.listener.connection_closed(self)
        self._cut_streams()
        self.listener.report_complete(self)

    # -- the transport's producer (IPushProducer) ----------------------------------
    def pauseProducing(self):
        """The transport's buffer is full: hold responses back, and read no more from the client."""
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self):
        """Room again: send what waits, read again."""
        self.paused = False
        if not self.closing:
            self.transport.resumeProducing()
            self._flush_waiting()
            self.send()

    def stopProducing(self):
        """The transport is going away; connectionLost follows."""

    # -- h2 events ------------------------------------------------------------------
    def _request(self, event):
        stream_id = event.stream_id
        if stream_id > self.last_stream_id or len(self.streams) >= self.limits.http2_max_concurrent_streams:
            try:
                self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            except NoSuchStreamError:
                pass  # the client has reset it already
            self._stream_closed(premature=True)
            return
        stream = self.streams[stream_id] = H2Stream(self, stream_id)
        stream.request_done = ended = event.stream_ended is not None
        self.requests += 1
        try:
            exchange = self._exchange(stream, event.headers, ended)
        except (_Reject, LocalReply) as refusal:  # LocalReply: a path refused (mesh.proxy.paths)
            stream.refuse(refusal.status, refusal.message)
            return
        stream.exchange = exchange
        exchange.start()

    def _data(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.exchange is None or stream.exchange.state is DONE:
            self.acknowledge(event.stream_id, event.flow_controlled_length)  # nobody reads it
            return
        stream.request_data(event.data, event.flow_controlled_length)

    def _trailers(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.exchange is not None and stream.exchange.state is not DONE:
            stream.exchange.request_trailers(event.headers)

    def _stream_ended(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is None:
            return
        stream.request_done = True
        exchange = stream.exchange
        if exchange is not None and exchange.state is not DONE:
            exchange.request_end()

    def _reset(self, event):
        """The client reset a stream (or h2 did, for a flow-control error on it)."""
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        self.waiting.pop(stream, None)
        stream.lost()
        self._stream_closed(self.listener.reactor.seconds() - stream.opened < PREMATURE_RESET_SECONDS)

    def _window_updated(self, event):
        if event.stream_id == 0:
            self._flush_waiting()
        else:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream in self.waiting:
                stream.flush_held()

    def _settings_changed(self, event):
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._flush_waiting()

    def _terminated(self, event):
        """The client sent GOAWAY: it is done with the connection (h2 sends nothing after it)."""
        self._end(None, "")

    def _ping_ack(self, event):
        if event.ping_data == _DRAIN_PING and self.shutdown == "notice":
            self._final_goaway()

    # -- requests -------------------------------------------------------------------
    def _exchange(self, stream, pairs, ended):
        """The :class:`Exchange` of a request's HEADERS; raises :class:`_Reject` to refuse it.

        h2 has checked the pseudo-headers (present, known, first, once) and the header names
        (lower case, no connection-specific ones, ``te`` only ``trailers``).
        """
        method = path = authority = host_header = content_length = None
        headers = {}
        raw = []
        expect_continue = False
        size = count = 0
        for pair in pairs:
            name, value = pair
            size += len(name) + len(value) + 32  # as SETTINGS_MAX_HEADER_LIST_SIZE counts (RFC 9113 6.5.2)
            if name[0] == 58:  # ":"
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            count += 1
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            if key in headers:
                headers[key] += "," + text
            else:
                headers[key] = text
            if name in _CONSUMED:
                if name == b"host":
                    host_header = value
                elif name == b"expect":
                    if value.lower() != b"100-continue":
                        raise _Reject(417, "only 'expect: 100-continue' is supported")
                    expect_continue = True
                continue
            if name == b"content-length":
                content_length = int(value)  # h2 has checked it
                continue
            raw.append(pair)
        limits = self.limits
        if size > limits.max_header_bytes:
            raise _Reject(431, f"request headers larger than {limits.max_header_bytes} bytes (counted as "
                               "SETTINGS_MAX_HEADER_LIST_SIZE counts them)")
        if count > limits.max_headers:
            raise _Reject(431, f"too many request headers (limit {limits.max_headers})")
        method = method.decode("latin-1")
        if method == "CONNECT":
            raise _Reject(405, "CONNECT is not supported; send plain HTTP requests to the sidecar")
        if path is None or path[:1] != b"/":
            raise _Reject(400, "invalid :path: send an origin-form path such as /a?b=1")
        if 0x23 in path:
            raise _Reject(400, "a fragment ('#...') is not allowed in the request target; send the path and query only")
        if authority is None:
            authority = host_header
            if authority is None:
                raise _Reject(400, "missing :authority (and Host): say which host the request is for")
        if content_length and limits.max_request_body and content_length > limits.max_request_body:
            raise _Reject(413, f"request body larger than {limits.max_request_body} bytes")
        listener = self.listener
        try:
            host = listener.host_of(authority)
        except _RootDot as dotted:  # rare: "a.local." is matched, routed and forwarded as "a.local"
            authority, host = dotted.authority, dotted.host
        if host_header is None:
            headers["host"] = authority.decode("latin-1")
        if content_length:
            framing = "length"
        elif ended or content_length == 0:
            framing = None
        else:
            framing = "chunked"  # a body of unknown length: chunked to an HTTP/1.1 upstream
        ctx = RequestContext(
            listener.direction, method, path.decode("latin-1"), host, authority, headers, raw, "2",
            headers.get("x-request-id") or new_request_id(), self.source_address, self.last_activity, self.peer,
            listener.normalize_path)
        if self.original_dst is not None:  # transparent capture (mesh.proxy.original_dst)
            ctx.extra["original_dst"] = self.original_dst
        return Exchange(stream, listener, ctx, framing, content_length or 0, expect_continue, False)

    # -- what the streams use ----------------------------------------------------------
    def send(self):
        """Write what h2 has to send."""
        data = self.h2.data_to_send()
        if data:
            self.bytes_sent += len(data)
            self.transport.write(data)

    def send_soon(self):
        """:meth:`send` once the reactor's poll is handled (at once outside one): the frames of the streams
        answered in one poll, by one upstream read or by several upstream connections that were readable
        together, leave in one write (:func:`mesh.proxy.sockets.after_poll`)."""
        if not self.send_queued:
            if after_poll(self._send_queued):
                self.send_queued = True
            else:
                self.send()

    def _send_queued(self):
        self.send_queued = False
        if not self.closing:  # close() sends what is queued first
            self.send()

    def acknowledge(self, stream_id, size):
        """Give ``size`` received bytes of ``stream_id`` back to the client's windows."""
        if size:
            self.h2.acknowledge_received_data(size, stream_id)

    def retire(self, stream):
        """``stream`` is over on both sides: forget it (and close a draining connection left idle)."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        self.waiting.pop(stream, None)
        self.deadlines.clear(stream.exchange)
        stream.exchange = None  # the exchange keeps the stream (its ``down``): no cycle left to the collector
        if self.closing:
            return
        if stream.unacked:
            self.acknowledge(stream.stream_id, stream.unacked)  # the connection's window needs them back
        if not stream.request_done and not stream.closed:
            try:  # answered: the rest of the request body is not needed
                self.h2.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)
            except NoSuchStreamError:
                pass  # the client has ended or reset it meanwhile
        self.last_activity = self.listener.reactor.seconds()
        self._stream_closed(premature=False)
        if self.draining and not self.streams and not self.closing:
            self._final_goaway()
            self.close()

    def _stream_closed(self, premature):
        """Count a closed stream; end the connection if most of many were reset at once (rapid reset)."""
        self.closed_streams += 1
        if premature:
            self.premature_resets += 1
            if (self.closed_streams >= PREMATURE_RESET_MIN_STREAMS
                    and 2 * self.premature_resets > self.closed_streams):
                self._end(ErrorCodes.ENHANCE_YOUR_CALM,
                          f"{self.premature_resets} of {self.closed_streams} streams were reset within "
                          f"{PREMATURE_RESET_SECONDS:g}s of their start (rapid reset)")

    def _flush_waiting(self):
        for stream in list(self.waiting):
            if self.paused or self.closing:
                return
            stream.flush_held()

    # -- ending -----------------------------------------------------------------------
    def _end(self, code, reason):
        """End the connection now: GOAWAY ``code`` (None: h2 has queued its own), then close.

        The exchanges of its streams are cut off, as when a client goes away.
        """
        if self.closing:
            return
        self.closing = True
        if reason:
            _log_abuse(self.direction, self.source_address, reason, self.listener.reactor.seconds())
        if code is not None:
            self.h2.close_connection(code, additional_data=reason.encode("utf-8", "replace")[:256])
        self.send()
        self._cut_streams()
        self.close()

    def _cut_streams(self):
        streams = list(self.streams.values())
        self.streams.clear()
        self.waiting.clear()
        for stream in streams:
            stream.lost()
        self.deadlines.stop()

    def _write_goaway(self, last_stream_id, code=ErrorCodes.NO_ERROR):
        self.send()  # h2's frames first
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=code).serialize()
        self.bytes_sent += len(frame)
        self.transport.write(frame)

    def _final_goaway(self):
        """The last GOAWAY of a drain: streams up to the last one received are served, later ones refused."""
        if self.shutdown == "final":
            return
        self.shutdown = "final"
        self.last_stream_id = self.h2.highest_inbound_stream_id
        self._write_goaway(self.last_stream_id)

    # -- the connection as one of the listener's ------------------------------------------
    def drain(self):
        """The proxy is shutting down (or needs room): no new streams; close once the ones in flight end.

        Idle: the last GOAWAY, then close.  Busy: a GOAWAY announcing the shutdown and a PING; the
        PING's answer (or :data:`DRAIN_NOTICE_SECONDS`) brings the last GOAWAY; streams in flight
        finish (:meth:`retire` closes the connection after the last).
        """
        self.draining = True
        if self.closing:
            return
        if not self.streams:
            self._final_goaway()
            self.close()
        elif self.shutdown is None:
            self.shutdown = "notice"
            self.notice_at = self.listener.reactor.seconds()
            self._write_goaway(_LAST_STREAM_ID)
            self.h2.ping(_DRAIN_PING)
            self.send()
        elif self.shutdown == "notice" and self.listener.reactor.seconds() - self.notice_at > DRAIN_NOTICE_SECONDS:
            self._final_goaway()

    def is_idle(self) -> bool:
        """No stream in flight, no header block arriving (and not closing already)."""
        return not (self.closing or self.streams or self.guard.in_block)

    def abort(self):
        """Cut the connection at once."""
        self.closing = True
        self.transport.abortConnection()

    def close(self):
        """Close after the pending bytes (a TLS transport would wait for its producer to leave first)."""
        if self.send_queued and not self.closing:
            self.send()
        self.closing = True
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def check_timers(self, now):
        """Called about once a second: the header timeout, a stream whose client takes none of its response
        (:meth:`H2Stream.check_timers`; none for a request in flight), the idle timeout of a connection without
        streams."""
        if self.closing:
            return
        self.guard.new_second()
        limits = self.limits
        if self.block_started is not None and now - self.block_started > limits.header_timeout:
            self._end(ErrorCodes.ENHANCE_YOUR_CALM, f"request headers not received within {limits.header_timeout:g}s")
        elif self.streams:
            for stream in list(self.streams.values()):
                stream.check_timers(now, limits.idle_timeout)
            if self.shutdown == "notice" and now - self.notice_at > DRAIN_NOTICE_SECONDS:
                self._final_goaway()
        elif now - self.last_activity > limits.idle_timeout:
            self._final_goaway()
            self.close()


_HANDLERS = {
    RequestReceived: H2ServerConnection._request,
    DataReceived: H2ServerConnection._data,
    TrailersReceived: H2ServerConnection._trailers,
    StreamEnded: H2ServerConnection._stream_ended,
    StreamReset: H2ServerConnection._reset,
    WindowUpdated: H2ServerConnection._window_updated,
    RemoteSettingsChanged: H2ServerConnection._settings_changed,
    ConnectionTerminated: H2ServerConnection._terminated,
    PingAckReceived: H2ServerConnection._ping_ack,
}


@implementer(IDownstreamStream)
class H2Stream:
    """One request stream: the downstream stream of its exchange (``exchange``, None when the
    request was refused before one was made).

    The response head is held back until the first body bytes, so that a response without a
    body is one HEADERS frame with END_STREAM.  Body bytes the client's windows or the
    transport cannot take yet are held (``held``); the end of the response (END_STREAM or the
    trailers) waits behind them (``ending``).
    """

    __slots__ = ("conn", "stream_id", "exchange", "opened", "deadlines", "forward_headers", "head", "held",
                 "held_size", "ending", "upstream", "upstream_paused", "reading_paused", "unacked",
                 "request_done", "done", "closed", "exchange_over", "sent", "progress_seen", "progress_at")

    def __init__(self, conn, stream_id):
        self.conn = conn
        self.stream_id = stream_id
        self.exchange = None
        self.opened = self.progress_at = conn.listener.reactor.seconds()
        self.deadlines = conn.deadlines
        self.forward_headers = conn.forward_headers
        self.head = None
        self.held = deque()
        self.held_size = 0
        self.ending = None  # True (END_STREAM) or the trailers, waiting behind held bytes
        self.upstream = None  # the upstream linked by link_response
        self.upstream_paused = False
        self.reading_paused = False
        self.unacked = 0  # request bytes received but not given back to the client's windows
        self.request_done = False  # the client ended its side
        self.done = False  # our side is over: END_STREAM or RST_STREAM handed to h2
        self.closed = False  # the stream is gone (reset by either side): nothing more can be sent
        self.exchange_over = False
        self.sent = 0  # response body bytes handed to h2
        self.progress_seen = None

    # -- the downstream stream of the exchange (mesh.proxy.streams.IDownstreamStream) -----------
    def send_continue(self):
        """``100 Continue`` (an informational HEADERS frame)."""
        self._headers([(b":status", b"100")], False)
        self.conn.send_soon()

    def send_head(self, exchange, status, reason, headers):
        """Keep the response head (``reason`` has no place in HTTP/2) until the body or the end."""
        self.head = _response_headers(status, headers, exchange.action.response_headers)

    def flush(self):
        """Send a head held back by :meth:`send_head`."""
        if self.head is not None:
            self._send_head(False)
            self.conn.send_soon()

    def send_body(self, data):
        """Response body bytes: sent within the client's windows, the rest held."""
        if self.head is not None:
            self._send_head(False)
        if data:
            if self.held_size or self.conn.paused:
                self._hold(data)
            else:
                self._send_data(data)
        self.conn.send_soon()

    def send_trailers(self, headers):
        """Response trailers: a HEADERS frame that ends the stream, after any held bytes."""
        if self.head is not None:
            self._send_head(False)
        trailers = _forwardable(headers)
        if self.held_size:
            self.ending = trailers
        else:
            self._headers(trailers, True)
            self._ended()
        self.conn.send_soon()

    def send_end(self):
        """The response is complete: END_STREAM, with the head if nothing else was sent."""
        if self.done:
            return  # the trailers ended it
        if self.held_size:
            if self.ending is None:
                self.ending = True
        elif self.head is not None:
            self._send_head(True)
            self._ended()
        else:
            self._end_stream()
        self.conn.send_soon()

    def send_local(self, exchange, status, body, headers):
        """A proxy-generated response."""
        ctx = exchange.ctx
        self._local(_local_headers(status, ctx.response_flags, len(body), ctx.request_id, headers),
                    b"" if exchange.head_only else body)

    def abort(self):
        """The response cannot be completed: reset the stream (INTERNAL_ERROR); the connection goes on."""
        self.reset(ErrorCodes.INTERNAL_ERROR)

    def pause_reading(self):
        """The upstream cannot take more of the body: stop giving the client's window back."""
        self.reading_paused = True

    def resume_reading(self):
        self.reading_paused = False
        if self.unacked and not self.closed and not self.conn.closing:
            self.conn.acknowledge(self.stream_id, self.unacked)
            self.unacked = 0
            self.conn.send_soon()

    def link_response(self, upstream):
        """From now on holding more than :data:`STREAM_BUFFER` bytes pauses ``upstream``."""
        self.upstream = upstream
        if self.held_size > STREAM_BUFFER:
            self._pause_upstream()

    def unlink_response(self):
        """Undo :meth:`link_response`; the upstream is never left paused."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            if self.upstream_paused:
                self.upstream_paused = False
                upstream.resume_reading()

    def start_tunnel(self, upstream, rest):
        """Never called: no HTTP/2 request asks for a protocol switch (``Exchange.upgrade`` is False)."""
        self.abort()

    def finished(self, exchange):
        """The exchange has ended; the stream is forgotten once its response is out."""
        self.exchange_over = True
        if self.done:
            self.conn.retire(self)

    # -- what the connection calls ------------------------------------------------------
    def request_data(self, data, flow_controlled):
        """Request body bytes: to the exchange, and back to the client's windows unless it is paused."""
        self.exchange.request_body(data)
        if flow_controlled:
            if self.reading_paused:
                self.unacked += flow_controlled
            else:
                self.conn.acknowledge(self.stream_id, flow_controlled)

    def refuse(self, status, message):
        """Answer a request that gets no exchange (malformed, over a limit), then forget the stream."""
        body = message.encode("utf-8", "replace") + b"\n"
        self.exchange_over = True
        self._local(_local_headers(status, "", len(body), None, ()), body)

    def flush_held(self):
        """Send held bytes as far as the windows allow; then the end, if it waits."""
        conn = self.conn
        if self.closed or conn.closing:
            return
        h2 = conn.h2
        held = self.held
        try:
            while held and not conn.paused:
                window = h2.local_flow_control_window(self.stream_id)
                if window <= 0:
                    break
                chunk = held.popleft()
                if len(chunk) > window:
                    held.appendleft(chunk[window:])
                    chunk = chunk[:window]
                self.held_size -= len(chunk)
                self._frames(chunk)
        except NoSuchStreamError:
            self._gone()
            return
        if not held:
            conn.waiting.pop(self, None)
            ending = self.ending
            if ending is not None:
                self.ending = None
                if ending is True:
                    self._end_stream()
                else:
                    self._headers(ending, True)
                    self._ended()
        if self.upstream_paused and self.held_size <= STREAM_BUFFER // 2:
            self.upstream_paused = False
            self.upstream.resume_reading()

    def reset(self, code):
        """Reset the stream (RST_STREAM ``code``) unless it is over already."""
        if self.closed or self.done:
            return
        self.closed = True
        conn = self.conn
        if not conn.closing:
            try:
                conn.h2.reset_stream(self.stream_id, code)
            except NoSuchStreamError:
                pass
            conn.send()
        self._drop_held()
        self._ended()

    def lost(self):
        """The stream or the connection is gone: the exchange learns that the client left."""
        self.closed = True
        self._drop_held()
        self.deadlines.clear(self.exchange)
        exchange = self.exchange
        self.exchange = None  # as retire does: no cycle with the exchange
        if exchange is not None and exchange.state is not DONE:
            exchange.downstream_lost()

    def check_timers(self, now, idle_timeout):
        """No idle timeout for a stream, as Istio's sidecars (``stream_idle_timeout: 0s``): its upstream may
        answer or pause as long as it likes (a route timeout bounds that), its request body may trickle in.
        Only a stream holding response bytes its client takes none of (a window never opened, a transport
        not read) for ``idle_timeout`` is reset."""
        if not self.held_size:
            self.progress_seen = None
            return
        if self.sent != self.progress_seen:
            self.progress_seen = self.sent
            self.progress_at = now
            return
        if now - self.progress_at <= idle_timeout:
            return
        self.reset(ErrorCodes.CANCEL)
        self.lost()

    # -- sending ----------------------------------------------------------------------------
    def _local(self, head, body):
        self.head = head
        if body:
            self.send_body(body)
        self.send_end()

    def _send_head(self, end_stream):
        head, self.head = self.head, None
        self._headers(head, end_stream)

    def _headers(self, headers, end_stream):
        if self.closed or self.conn.closing:
            return
        try:
            self.conn.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except NoSuchStreamError:
            self._gone()
        except ProtocolError as error:  # headers h2 will not send (an upstream's, malformed)
            log.info("HTTP/2 stream {id}: response headers refused ({error}); the stream is reset",
                     id=self.stream_id, error=str(error))
            self.reset(ErrorCodes.INTERNAL_ERROR)

    def _send_data(self, data):
        if self.closed or self.conn.closing:
            return
        try:
            window = self.conn.h2.local_flow_control_window(self.stream_id)
            if window < len(data):
                self._hold(data[window:] if window > 0 else data)
                data = data[:window] if window > 0 else b""
            if data:
                self._frames(data)
        except NoSuchStreamError:
            self._gone()

    def _frames(self, data):
        h2 = self.conn.h2
        size = h2.max_outbound_frame_size
        stream_id = self.stream_id
        if len(data) <= size:
            h2.send_data(stream_id, data)
            frames = 1
        else:
            view = memoryview(data)
            frames = 0
            for start in range(0, len(data), size):
                h2.send_data(stream_id, view[start:start + size])
                frames += 1
        self.conn.guard.data_frames += frames
        self.sent += len(data)

    def _hold(self, data):
        self.held.append(data)
        self.held_size += len(data)
        self.conn.waiting[self] = None
        if self.held_size > STREAM_BUFFER and self.upstream is not None:
            self._pause_upstream()

    def _pause_upstream(self):
        if not self.upstream_paused:
            self.upstream_paused = True
            self.upstream.pause_reading()

    def _end_stream(self):
        if self.closed or self.conn.closing:
            return
        try:
            self.conn.h2.end_stream(self.stream_id)
        except NoSuchStreamError:
            self._gone()
            return
        self._ended()

    def _ended(self):
        """Our side of the stream is over (END_STREAM or RST_STREAM sent)."""
        self.done = True
        if self.exchange_over:
            self.conn.retire(self)

    def _gone(self):
        """h2 no longer knows the stream (the client reset it; its event is on its way)."""
        self.closed = True
        self._drop_held()

    def _drop_held(self):
        self.held.clear()
        self.held_size = 0
        self.ending = None
        self.conn.waiting.pop(self, None)


def _field(name, value):
    """One header as h2 sends it: ``name`` lower-case already, ``value`` stripped, credentials never indexed."""
    if name in _NEVER_INDEXED:
        return NeverIndexedHeaderTuple(name, value.strip())
    return name, value.strip()


def _forwardable(headers) -> list:
    """``headers`` (an upstream's) without the hop-by-hop ones and those its Connection header names,
    normalized for HTTP/2 (names lower-cased, values stripped, see :func:`_field`)."""
    kept = []
    listed = None
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                listed = connection_tokens(value)
            continue
        kept.append(_field(lname, value))
    if listed:
        kept = [pair for pair in kept if pair[0] not in listed]
    return kept


def _response_headers(status, headers, ops) -> list:
    """The HEADERS of a forwarded response: ``:status``, the upstream's forwardable headers and the
    route's ``ops`` (Istio ``headers.response``, or None)."""
    kept = _forwardable(headers)
    if ops is not None:
        kept = [_field(name, value) for name, value in _apply_ops(kept, ops)]
    return [(b":status", b"%d" % status), *kept]


def _local_headers(status, flags, length, request_id, extra) -> list:
    """The HEADERS of a local reply (as :func:`mesh.proxy.codec.heads.local_response` builds for HTTP/1):
    ``extra`` pairs from ``mesh_response_headers`` replace the generated headers of their names (a
    None value only removes), but never those that frame the reply."""
    pairs = [(b":status", b"%d" % status), (b"content-type", b"text/plain; charset=utf-8"),
             (b"content-length", b"%d" % length)]
    if flags:
        pairs.append((b"x-mesh-flags", flags.encode()))
    if request_id:
        pairs.append((b"x-request-id", request_id.encode()))
    if extra:
        extra = [(name.lower(), value) for name, value in extra]
        names = {name for name, _ in extra} - _LOCAL_FRAMING
        pairs = [pair for pair in pairs if pair[0] not in names]
        pairs += [_field(name, value) for name, value in extra if value is not None and name not in _LOCAL_FRAMING]
    return pairs
