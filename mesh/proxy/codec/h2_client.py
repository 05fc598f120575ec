"""The HTTP/2 client codec: one connection to an upstream, many exchanges at once.

An :class:`H2UpstreamConnection` is one HTTP/2 connection (libnghttp2's session,
:mod:`mesh.proxy.codec.nghttp2_session`, or the ``h2`` library, as ``--http2-engine``
says; client side) to one endpoint.  Each try that uses it gets an :class:`H2Stream`,
the :class:`mesh.proxy.streams.IUpstreamStream` of one HTTP/2 stream: the
request goes out as HEADERS (built from the exchange as the HTTP/1 client
builds its head, :func:`mesh.proxy.codec.heads.forwarded`) and DATA, the
response comes back through the owner's callbacks.  The connections of an
endpoint are handed out by its :class:`mesh.proxy.pool.H2Pool`.

Flow control, both ways:

- request body: a stream sends what the peer's windows allow and keeps the
  rest; while it keeps bytes, the downstream is paused (``link_body``), and a
  WINDOW_UPDATE sends them and resumes it;
- response body: DATA goes to the owner as it arrives, but while the owner has
  paused the stream (``pause_reading``: the client's buffer is full) the bytes
  are not acknowledged, so the peer can send at most one stream window more.

Failures: an RST_STREAM fails only its stream (REFUSED_STREAM as *refused*:
never processed, so the exchange replays it at once); a GOAWAY stops new
streams on the connection and fails the streams above its last stream id as
refused, as Envoy does, while the streams below it complete; losing the
connection fails every stream, with the retry rules of a lost HTTP/1.1
connection (:func:`mesh.proxy.retry.free_retry`).
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from mesh.proxy.codec import hpack_c, nghttp2_session
from mesh.proxy.codec.h2_connection import MeshH2Connection
from mesh.proxy.codec.heads import HOP_BY_HOP, forwarded
from mesh.proxy.mtls import setup_failure
from mesh.proxy.sockets import after_event, set_nodelay, unbuffer_tls, write_through
from mesh.proxy.streams import Backpressure, IUpstreamStream

#: The receive window of each stream: what the peer may send ahead of the client (at most
#: this much of a response waits in the downstream buffer while the client is paused).
STREAM_WINDOW = 256 * 1024
#: The receive window of the whole connection, shared by its streams.
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Tries that wait for a connection being set up, before its peer's SETTINGS say how many
#: streams it allows (more wait for another connection).
FIRST_STREAMS = 100
#: The receive window every HTTP/2 connection starts with (RFC 9113 section 6.9.2).
_DEFAULT_WINDOW = 65535
#: Stream ids are 31 bits: a connection takes no new stream past this id and closes when idle.
_RETIRE_AFTER_ID = 2 ** 31 - 1 - 2 * 1024 * 1024
#: Headers RFC 9113 section 8.2.2 forbids in HTTP/2 (TE is sent as "trailers" only).
_CONNECTION_SPECIFIC = HOP_BY_HOP | {b"host", b"http2-settings"}

_CONFIG = H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                          normalize_outbound_headers=False, validate_inbound_headers=True)


class _GracefulGoaway(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY received leaves the connection open.

    RFC 9113 section 6.8: streams up to the GOAWAY's last stream id may still
    complete.  h2 closes the whole connection on a GOAWAY (python-hyper/h2
    issue #1181), so those streams would fail; :class:`H2UpstreamConnection`
    itself opens no stream after one.
    """

    def process_input(self, input_):
        if input_ is ConnectionInputs.RECV_GOAWAY and self.state is ConnectionState.CLIENT_OPEN:
            return []
        return super().process_input(input_)


def _new_connection():
    """A client connection on the HTTP/2 engine (:mod:`mesh.proxy.codec.nghttp2_session`, or h2's)."""
    # No MAX_CONCURRENT_STREAMS of 0 (ENABLE_PUSH 0 already forbids server streams): h2 checks it
    # before it sees that a HEADERS frame is for a stream this side reset (a late response), and
    # would end the whole connection for it.
    settings = Settings(client=True, initial_values={
        SettingCodes.ENABLE_PUSH: 0,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE})
    if nghttp2_session.enabled():  # a GOAWAY received leaves its streams able to finish, as _GracefulGoaway
        return nghttp2_session.Connection(True, settings, H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE)
    h2 = MeshH2Connection(config=_CONFIG)
    h2.state_machine = _GracefulGoaway()
    hpack_c.install(h2, huffman=False)  # HPACK in C; in Python without Huffman (too costly)
    h2.local_settings = settings
    return h2


def request_headers(exchange) -> list:
    """The HEADERS of the request of ``exchange``: what the HTTP/1 client's head carries, as HTTP/2 fields.

    Connection-specific headers are left out (RFC 9113 section 8.2.2); a TE
    asking for trailers (gRPC) goes on as ``te: trailers``.
    """
    ctx = exchange.ctx
    path, authority, headers = forwarded(ctx, exchange.action)
    out = [(b":method", ctx.method.encode()), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]
    for name, value in headers:
        name = name.lower()
        if name not in _CONNECTION_SPECIFIC:
            out.append((name, value))
    for name, value in exchange.extra_headers:
        out.append((name.lower(), value))
    te = ctx.headers.get("te")
    if te is not None and "trailers" in te.lower():
        out.append((b"te", b"trailers"))
    if "x-request-id" not in ctx.headers:
        out.append((b"x-request-id", ctx.request_id.encode()))
    if exchange.framing == "length":
        out.append((b"content-length", b"%d" % exchange.content_length))
    return out


def _response_fields(headers) -> tuple:
    """``(status, headers without pseudo-headers)`` of a response HEADERS frame (h2 has validated it)."""
    status = 0
    out = []
    for pair in headers:
        name = pair[0]
        if name[0] == 58:  # b":"
            if name == b":status":
                status = int(pair[1])
        else:
            out.append(pair)
    return status, out


@implementer(IHandshakeListener)
class H2UpstreamConnection(Protocol):
    """One HTTP/2 connection to an endpoint, shared by the streams of many tries.

    ``pool`` is the endpoint's :class:`mesh.proxy.pool.H2Pool`.  Over TLS
    (``verify_peer`` set: the pool's check) the connection is usable only after the
    handshake, once the peer passed that check (over mTLS: its SPIFFE id) and it selected
    ALPN ``h2`` (if it selected HTTP/1.1, the pool turns the connection into
    an HTTP/1.1 one).  ``active`` counts the streams handed out and not done;
    ``capacity`` is how many it may have at once (the peer's
    SETTINGS_MAX_CONCURRENT_STREAMS, capped by ``max_streams``, the
    DestinationRule's ``maxConcurrentStreams``); after ``max_requests``
    streams (``maxRequestsPerConnection``; 0: no limit) and on GOAWAY it is
    *draining*: it takes no new stream and closes when its last one is done.
    """

    def __init__(self, pool, verify_peer=None, max_streams=0, max_requests=0):
        self.pool = pool
        self.verify_peer = verify_peer
        self.max_streams = max_streams
        self.max_requests = max_requests
        self.h2 = _new_connection()
        self.streams = {}  # stream id -> H2Stream
        self.active = 0
        self.capacity = min(FIRST_STREAMS, max_streams or FIRST_STREAMS)
        self.connected_ok = False
        self.draining = False
        self.requests_sent = 0
        self.last_used = 0.0
        self.session_kept = False  # over mTLS: the TLS session is kept for resumption (by the pool)
        self.flush_queued = False  # a flush_soon waits for the end of the event
        self.waiters = []  # Deferreds of tries waiting for this connection to come up (the pool's)
        self._handlers = {
            ResponseReceived: self._response, DataReceived: self._data, TrailersReceived: self._trailers,
            StreamEnded: self._ended, StreamReset: self._reset, WindowUpdated: self._window,
            RemoteSettingsChanged: self._settings, ConnectionTerminated: self._goaway,
        }

    # -- Twisted Protocol -------------------------------------------------
    def connectionMade(self):
        set_nodelay(self.transport)
        write_through(self.transport)
        unbuffer_tls(self.transport)
        if self.verify_peer is None:
            self._start()

    def handshakeCompleted(self):
        """TLS is up: check who the peer is and which protocol it chose."""
        problem = self.verify_peer(self.transport)
        if problem is not None:
            self.pool.connection_failed(self, problem)
            self.transport.abortConnection()
        elif self.transport.negotiatedProtocol != b"h2":
            self.pool.alpn_declined(self)
        else:
            self._start()

    def _start(self):
        """Send the connection preface; the connection is usable once the peer's SETTINGS arrive."""
        h2 = self.h2
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()

    def dataReceived(self, data):
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as error:
            self._fail(f"upstream sent malformed HTTP/2: {error}")
            return
        handlers = self._handlers
        heads = None  # streams that got their response head
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None and handler(event):
                if heads is None:
                    heads = [event.stream_id]
                else:
                    heads.append(event.stream_id)
        self.flush()
        if heads is not None:
            for stream_id in heads:  # a head not followed by body bytes yet: let the owner write it now
                stream = self.streams.get(stream_id)
                if stream is not None and stream.listener is not None:
                    stream.listener.upstream_flush()

    def connectionLost(self, reason=None):
        if not self.connected_ok:
            self.pool.connection_failed(self, setup_failure(reason, self.transport))
        self.connected_ok = False
        self.draining = True
        self.pool.connection_lost(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:  # whether the peer processed them is unknown: the HTTP/1 rules apply
            stream.lost("upstream connection closed", refused=None)

    # -- streams ----------------------------------------------------------
    def open_stream(self) -> H2Stream:
        """A new stream for one try (the caller checked that ``active < capacity``)."""
        self.active += 1
        return H2Stream(self)

    def has_room(self) -> bool:
        """Whether the connection takes another stream now."""
        return self.active < self.capacity and not self.draining

    def stream_done(self, stream) -> None:
        """``stream`` is finished (response complete, reset or abandoned): free its place."""
        if stream.connection is None:
            return
        stream.connection = None
        self.active -= 1
        if stream.stream_id is not None:
            self.streams.pop(stream.stream_id, None)
            if stream.unacknowledged:  # held back while the client was paused: the connection's window wants it
                self.h2.acknowledge_received_data(stream.unacknowledged, stream.stream_id)
                stream.unacknowledged = 0
                self.flush()
        self.last_used = self.pool.reactor.seconds()
        if self.draining and self.active == 0:
            self.close()

    def retire(self) -> None:
        """Take no new stream; close once the streams in flight are done."""
        self._stop_new_streams()
        if self.active == 0:
            self.close()

    def _stop_new_streams(self):
        if not self.draining:
            self.draining = True
            self.pool.connection_retired(self)

    def close(self) -> None:
        """Say GOAWAY and close (the streams in flight are lost)."""
        self.draining = True
        if self.transport is not None and self.connected_ok:
            self.h2.close_connection()
            self.flush()
            self.transport.loseConnection()

    def flush(self) -> None:
        """Write what h2 has queued (frames are written once per event, not per frame)."""
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def flush_soon(self) -> None:
        """:meth:`flush` once the I/O event being handled is over (at once outside one): the requests
        of one downstream read leave in one write (:func:`mesh.proxy.sockets.after_event`)."""
        if not self.flush_queued:
            if after_event(self._flush_queued):
                self.flush_queued = True
            else:
                self.flush()

    def _flush_queued(self) -> None:
        self.flush_queued = False
        self.flush()

    def _fail(self, message):
        """The connection is broken: close it, every stream fails with ``message``."""
        self._stop_new_streams()  # off the pool's list before a failed stream is replayed
        streams = list(self.streams.values())
        self.streams.clear()
        try:
            self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self.flush()
        except ProtocolError:
            pass  # h2 has already given up on the connection
        self.transport.abortConnection()
        for stream in streams:
            stream.lost(message, refused=None)

    # -- h2 events (each returns True when it was a response head) ----------------
    def _response(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.head(event.headers)
        return True

    def _data(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.data(event.data, event.flow_controlled_length)
        else:  # an abandoned stream: give the window back at once
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _trailers(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.listener is not None:
            stream.listener.upstream_trailers(event.headers)

    def _ended(self, event):
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.ended()

    def _reset(self, event):
        stream = self.streams.pop(event.stream_id, None)
        if stream is not None:
            code = event.error_code
            name = getattr(code, "name", code)
            stream.lost(f"the upstream reset the stream ({name})", refused=code == ErrorCodes.REFUSED_STREAM)

    def _window(self, event):
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.pending:
                stream.send_pending()
        else:
            self._send_all_pending()

    def _settings(self, event):
        """The peer's SETTINGS: the first (its preface) makes the connection usable, with its stream limit."""
        changed = event.changed_settings
        if SettingCodes.MAX_CONCURRENT_STREAMS in changed:
            allowed = changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value
            self.capacity = min(allowed, self.max_streams) if self.max_streams else allowed
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._send_all_pending()
        if not self.connected_ok:
            self.connected_ok = True
            self.pool.connection_made(self)

    def _goaway(self, event):
        """The peer stops taking streams: those above ``last_stream_id`` were never processed."""
        last = event.last_stream_id
        self._stop_new_streams()
        refused = [stream for stream_id, stream in self.streams.items() if stream_id > last]
        code = getattr(event.error_code, "name", event.error_code)
        for stream in refused:
            self.streams.pop(stream.stream_id, None)
            stream.lost(f"the upstream sent GOAWAY ({code}) before processing the request", refused=True)
        if self.active == 0:
            self.close()

    def _send_all_pending(self):
        for stream in list(self.streams.values()):
            if stream.pending:
                stream.send_pending()


@implementer(IUpstreamStream)
class H2Stream:
    """One HTTP/2 stream: the :class:`mesh.proxy.streams.IUpstreamStream` of one try.

    ``listener`` is the owner (a :class:`mesh.proxy.exchange.Try`), ``pool``
    the :class:`mesh.proxy.pool.H2Pool` the stream came from (where the owner
    releases it), ``stream_id`` None until the request is sent.  ``pending``
    holds request body bytes the peer's windows do not allow yet.
    """

    __slots__ = ("connection", "pool", "listener", "stream_id", "pending", "end_pending", "trailers_pending",
                 "body_link", "paused", "unacknowledged")

    def __init__(self, connection):
        self.connection = connection
        self.pool = connection.pool
        self.listener = None
        self.stream_id = None
        self.pending = None  # a bytearray while the windows hold bytes back
        self.end_pending = False
        self.trailers_pending = None
        self.body_link = None
        self.paused = False
        self.unacknowledged = 0

    # -- IUpstreamStream ----------------------------------------------------
    def send_request(self, listener, exchange) -> None:
        """Take ownership for one request and send its HEADERS (END_STREAM when it has no body)."""
        self.listener = listener
        connection = self.connection
        h2 = connection.h2
        stream_id = self.stream_id = h2.get_next_available_stream_id()
        connection.streams[stream_id] = self
        connection.requests_sent += 1
        h2.send_headers(stream_id, request_headers(exchange), end_stream=exchange.framing is None)
        connection.flush_soon()
        limit = connection.max_requests
        if stream_id > _RETIRE_AFTER_ID or (limit and connection.requests_sent >= limit):
            connection.retire()

    def send_body(self, data: bytes) -> None:
        """Request body bytes: sent as the peer's windows allow, the rest kept (and the downstream paused)."""
        if self.connection is None or not data:
            return
        if self.pending is None:
            self.pending = bytearray(data)
        else:
            self.pending += data
        self.send_pending()

    def send_end(self) -> None:
        """The request body is complete."""
        connection = self.connection
        if connection is None or self.trailers_pending is not None:
            return
        if self.pending:
            self.end_pending = True
            return
        try:
            connection.h2.end_stream(self.stream_id)
        except StreamClosedError:
            return  # the peer reset it: its StreamReset event is on its way
        connection.flush_soon()

    def send_trailers(self, headers) -> None:
        """Request trailers: a HEADERS frame that ends the stream, after the body bytes still kept."""
        connection = self.connection
        if connection is None:
            return
        headers = [(name.lower(), value) for name, value in headers]
        if self.pending:
            self.trailers_pending = headers
            return
        self.trailers_pending = ()  # send_end, which follows, has nothing left to do
        try:
            connection.h2.send_headers(self.stream_id, headers, end_stream=True)
        except StreamClosedError:
            return
        connection.flush_soon()

    def send_pending(self) -> None:
        """Send the kept body bytes the windows allow; pause or resume the downstream accordingly."""
        connection = self.connection
        h2 = connection.h2
        stream_id = self.stream_id
        pending = self.pending
        frame = h2.max_outbound_frame_size
        sent = 0
        try:
            window = h2.local_flow_control_window(stream_id)
            while sent < len(pending) and window > 0:
                size = min(window, frame, len(pending) - sent)
                h2.send_data(stream_id, bytes(pending[sent:sent + size]))
                sent += size
                window -= size
        except StreamClosedError:
            return
        if sent:
            del pending[:sent]
            connection.flush_soon()
        link = self.body_link
        if pending:
            if link is not None:
                link.pauseProducing()
            return
        self.pending = None
        if self.trailers_pending:
            self.send_trailers(self.trailers_pending)
        elif self.end_pending:
            self.end_pending = False
            self.send_end()
        if link is not None:
            link.resumeProducing()

    def link_body(self, downstream) -> None:
        """From now on a closed window pauses reading the request body from ``downstream``."""
        self.body_link = link = Backpressure(downstream.pause_reading, downstream.resume_reading)
        if self.pending:
            link.pauseProducing()

    def unlink_body(self) -> None:
        """Undo :meth:`link_body`; the downstream is never left paused."""
        link = self.body_link
        if link is not None:
            self.body_link = None
            link.release()

    def pause_reading(self) -> None:
        """The client cannot take more: stop acknowledging this stream's DATA."""
        self.paused = True

    def resume_reading(self) -> None:
        """Acknowledge what arrived while paused, so the peer may send more."""
        self.paused = False
        connection = self.connection
        if self.unacknowledged and connection is not None:
            connection.h2.acknowledge_received_data(self.unacknowledged, self.stream_id)
            self.unacknowledged = 0
            connection.flush_soon()

    def detach(self) -> None:
        """The owner is gone (failed, timed out): RST_STREAM(CANCEL) this stream only."""
        self.listener = None
        connection = self.connection
        if connection is None:
            return
        if self.stream_id is not None:
            try:
                connection.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
            except StreamClosedError:
                pass  # both sides have ended it already
            else:
                connection.flush_soon()
        connection.stream_done(self)

    def hand_over(self) -> None:
        """HTTP/2 carries no protocol switch (the exchange sends upgrades over HTTP/1.1): end the stream."""
        self.detach()

    # -- what the connection reports ------------------------------------------
    def head(self, headers) -> None:
        listener = self.listener
        if listener is not None:
            status, fields = _response_fields(headers)
            listener.upstream_head(status, b"", fields, True)

    def data(self, data, flow_controlled_length) -> None:
        listener = self.listener
        if listener is not None and data:  # an empty DATA frame often just ends the stream
            listener.upstream_body(data)
        if self.paused and self.listener is not None:
            self.unacknowledged += flow_controlled_length
        elif self.connection is not None:
            self.connection.h2.acknowledge_received_data(flow_controlled_length, self.stream_id)

    def ended(self) -> None:
        """The response is complete: the owner finishes (and releases or detaches the stream)."""
        listener = self.listener
        if listener is None:
            self.connection.stream_done(self)
            return
        self.listener = None
        listener.upstream_end()

    def lost(self, reason_text, refused) -> None:
        """The stream failed; ``refused``: the upstream never processed it (True), may have (False),
        or who knows (None; see :meth:`mesh.proxy.exchange.Try.upstream_lost`)."""
        listener = self.listener
        self.listener = None
        if self.connection is not None:
            self.connection.stream_done(self)
        if listener is not None:
            listener.upstream_lost(reason_text, refused)

