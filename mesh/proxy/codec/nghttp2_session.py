"""An HTTP/2 connection on libnghttp2's session, behind the part of h2's ``H2Connection`` the codecs use.

The pure-Python ``h2`` library is most of what an HTTP/2 request costs the proxy (docs/performance.md,
"The same hop on libnghttp2": 1.28 M instructions per hop against 435 k on two nghttp2 sessions).
:class:`Connection` drives an ``nghttp2_session`` (Debian's ``libnghttp2.so.14``, through cffi in ABI
mode: no headers, no compiler), with the session's callbacks in C when the optional module
``_nghttp2_pump`` is built (``_nghttp2_pump.c``: one Python call per header block, frame or DATA chunk,
not per field, and no cffi callback; else the same methods are called from cffi callbacks), and
offers the codecs exactly what they call on h2's connection:
``initiate_connection``, ``receive_data`` (h2's event classes, with the attributes the codecs read),
``data_to_send``, ``send_headers``, ``send_data``, ``end_stream``, ``reset_stream``,
``acknowledge_received_data``, ``increment_flow_control_window``, ``local_flow_control_window``,
``ping``, ``close_connection``, ``get_next_available_stream_id``, ``max_outbound_frame_size``,
``highest_inbound_stream_id``, ``local_settings`` and ``decoder.max_header_list_size``; and h2's
exceptions where the codecs catch them (:class:`h2.exceptions.StreamClosedError` for a stream that is
gone, :class:`h2.exceptions.ProtocolError` for a connection error, after its GOAWAY is queued).

How h2's behaviour is kept:

- receive flow control is the codecs' (``nghttp2_option_set_no_auto_window_update``): received DATA is
  given back only by ``acknowledge_received_data`` (``nghttp2_session_consume``), so the codecs'
  backpressure works as with h2;
- ``send_data`` queues the bytes on the stream; nghttp2 takes them through the stream's data provider
  as its windows allow (deferred while the queue is empty, resumed by more bytes, the end or trailers),
  and ``local_flow_control_window`` subtracts what is queued, so the codecs never send more than h2
  would have let them;
- a received GOAWAY leaves the streams up to its last stream id able to finish (h2 needs the client
  codec's ``_GracefulGoaway`` for that); the codec fails those above it on the ConnectionTerminated
  event, as with h2 (nghttp2 closes them without a StreamReset event each);
- received header blocks are normalized and validated by h2's rules, with h2's messages
  (:func:`mesh.proxy.codec.h2_connection.received_headers`; nghttp2's own HTTP checks are off, they
  would drop a bad field or reset only its stream), and a body must match its content-length, as h2
  checks it: a malformed request or response ends the connection with PROTOCOL_ERROR, as with h2;
- a header list over ``decoder.max_header_list_size`` (name + value + 32 per field) ends the
  connection with ENHANCE_YOUR_CALM: in the block's last frame as soon as it passes the limit (an
  HPACK bomb is stopped as it expands), at the block's end when it passes it in an earlier frame
  (as h2, which decodes whole blocks; the fields are dropped meanwhile, and the server codec's
  FrameGuard bounds the block);
- a callback that raises is logged (never printed) and ends the connection (GOAWAY INTERNAL_ERROR,
  :class:`h2.exceptions.ProtocolError`).

What differs: nghttp2 refuses a stream itself (REFUSED_STREAM) when as many as its
SETTINGS_MAX_CONCURRENT_STREAMS are open in its own count, which closes a stream once END_STREAM
went both ways (the server codec refuses by the same rule on its own count first, so nghttp2's
rule only applies to a client that opens streams faster than the codec's count forgets them); it
answers PING and SETTINGS itself; HPACK is nghttp2's (as :mod:`mesh.proxy.codec.hpack_c` gives h2).
"""

from __future__ import annotations

import weakref
from functools import cache

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, ProtocolError, StreamClosedError
from h2.settings import ChangedSetting, _setting_code_from_int
from h2.utilities import HeaderValidationFlags
from hpack import NeverIndexedHeaderTuple
from twisted.logger import Logger
from twisted.python.failure import Failure

from mesh.proxy.codec import http2_engine
from mesh.proxy.codec.h2_connection import BLOCK_CHECKED, UNCHECKED, VALUES_CHECKED, received_headers
from mesh.proxy.codec.hpack_c import LIBRARY, HeaderArray, open_library

log = Logger()


# The part of nghttp2.h (1.52) used here.  Received names, values and DATA are declared ``char *``
# (``uint8_t *`` in nghttp2.h: the same layout), so that cffi's ``unpack`` gives bytes.  A received
# frame is read through the members of the nghttp2_frame union this module needs (never allocated here).
_CDEF = """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved; } nghttp2_frame_hd;
typedef struct { int32_t stream_id; int32_t weight; uint8_t exclusive; } nghttp2_priority_spec;
typedef struct { uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen; uint8_t flags; } nghttp2_nv;
typedef struct { nghttp2_frame_hd hd; size_t padlen; nghttp2_priority_spec pri_spec; nghttp2_nv *nva; size_t nvlen;
                 int cat; } nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct { nghttp2_frame_hd hd; size_t niv; nghttp2_settings_entry *iv; } nghttp2_settings;
typedef struct { nghttp2_frame_hd hd; uint8_t opaque_data[8]; } nghttp2_ping;
typedef struct { nghttp2_frame_hd hd; int32_t last_stream_id; uint32_t error_code; uint8_t *opaque_data;
                 size_t opaque_data_len; uint8_t reserved; } nghttp2_goaway;
typedef struct { nghttp2_frame_hd hd; int32_t window_size_increment; uint8_t reserved; } nghttp2_window_update;
typedef union { nghttp2_frame_hd hd; nghttp2_headers headers; nghttp2_rst_stream rst_stream;
                nghttp2_settings settings; nghttp2_ping ping; nghttp2_goaway goaway;
                nghttp2_window_update window_update; } nghttp2_frame;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *,
                                                     nghttp2_data_source *, void *);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; } nghttp2_data_provider;
typedef int (*frame_cb)(nghttp2_session *, const nghttp2_frame *, void *);
typedef int (*header_cb)(nghttp2_session *, const nghttp2_frame *, const char *, size_t, const char *, size_t,
                         uint8_t, void *);
typedef int (*data_chunk_cb)(nghttp2_session *, uint8_t, int32_t, const char *, size_t, void *);
typedef int (*stream_close_cb)(nghttp2_session *, int32_t, uint32_t, void *);
typedef int (*invalid_frame_cb)(nghttp2_session *, const nghttp2_frame *, int, void *);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *, frame_cb);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, header_cb);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, frame_cb);
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *, invalid_frame_cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *, data_chunk_cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *, stream_close_cb);

int nghttp2_option_new(nghttp2_option **);
void nghttp2_option_del(nghttp2_option *);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int);
void nghttp2_option_set_no_closed_streams(nghttp2_option *, int);
void nghttp2_option_set_no_http_messaging(nghttp2_option *, int);
void nghttp2_option_set_max_send_header_block_length(nghttp2_option *, size_t);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t);
void nghttp2_option_set_max_continuations(nghttp2_option *, size_t);

int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *, const nghttp2_option *);
int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *, const nghttp2_option *);
void nghttp2_session_del(nghttp2_session *);
ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
int nghttp2_session_consume(nghttp2_session *, int32_t, size_t);
int nghttp2_session_resume_data(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *, int32_t);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *);

int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t);
int32_t nghttp2_submit_request(nghttp2_session *, const nghttp2_priority_spec *, const nghttp2_nv *, size_t,
                               const nghttp2_data_provider *, void *);
int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t, const nghttp2_data_provider *);
int32_t nghttp2_submit_headers(nghttp2_session *, uint8_t, int32_t, const nghttp2_priority_spec *, const nghttp2_nv *,
                               size_t, void *);
int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t);
int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t);
int nghttp2_submit_ping(nghttp2_session *, uint8_t, const uint8_t *);
int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *, size_t);
int nghttp2_submit_window_update(nghttp2_session *, uint8_t, int32_t, int32_t);
"""

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
_END_STREAM = _ACK = 0x1
_END_HEADERS = 0x4
_HCAT_REQUEST = 0
_HCAT_RESPONSE = 1
#: The category of the heads a side receives: requests (server) or responses (client), by ``client``.
_HEAD_CATEGORY = {False: _HCAT_REQUEST, True: _HCAT_RESPONSE}
_DATA_FLAG_EOF, _DATA_FLAG_NO_END_STREAM = 0x1, 0x2
_NV_FLAG_NO_INDEX = 0x1
_ERR_DEFERRED = -508
_ERR_CALLBACK_FAILURE = -902
#: nghttp2's error codes for a stream it resets, as the RST_STREAM error codes it sends.
_STREAM_ERRORS = {-524: ErrorCodes.FLOW_CONTROL_ERROR, -533: ErrorCodes.REFUSED_STREAM,
                  -510: ErrorCodes.STREAM_CLOSED, -511: ErrorCodes.STREAM_CLOSED}
_SETTINGS_INITIAL_WINDOW_SIZE, _SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
_tuple = tuple.__new__  # a NeverIndexedHeaderTuple without its Python-level __new__
#: An h2 event without its dataclass ``__init__`` (a third of the time): the events made per request set
#: ``stream_id`` and their data, and read the other fields' defaults from the class.
_new = object.__new__


#: The engines (``--http2-engine``) that are this module's: with the C module's callbacks (when built), or cffi's.
_ENGINES = ("nghttp2", "nghttp2-cffi")


def enabled() -> bool:
    """Whether the codecs' connections are :class:`Connection` objects: the engine is nghttp2 and the library
    loads (if it does not, h2's connections, and one warning says why)."""
    return http2_engine.chosen() in _ENGINES and library() is not None


@cache
def library():
    """``(ffi, lib)`` of :data:`LIBRARY` with this module's declarations, or None when it cannot be
    loaded (logged once, with the reason)."""
    return open_library(LIBRARY, _CDEF, "nghttp2_option_set_no_http_messaging", "HTTP/2 on the h2 library", log)


class _Limits:
    """The ``decoder`` of a :class:`Connection`: only ``max_header_list_size``, as the codecs set it on h2's."""

    __slots__ = ("max_header_list_size",)

    def __init__(self, max_header_list_size):
        self.max_header_list_size = max_header_list_size


class _Stream:
    """What a :class:`Connection` keeps per stream: the header block being received, and what waits to be sent."""

    __slots__ = ("headers", "size", "oversized", "final", "head", "expected", "received", "out", "eof", "trailers",
                 "deferred", "submitted", "ended")

    def __init__(self, head=False):
        self.headers = []
        self.size = 0  # of the header list being received, as SETTINGS_MAX_HEADER_LIST_SIZE counts (cffi callbacks)
        self.oversized = False  # that header list passed the limit
        self.final = False  # a final response head was received (client side)
        self.head = head  # a HEAD request (client side): its response has no body
        self.expected = None  # the content-length received
        self.received = 0  # DATA bytes received
        self.out = bytearray()  # DATA bytes queued, not yet taken by nghttp2
        self.eof = False  # the end of our side is queued behind ``out``
        self.trailers = None  # the trailers queued behind ``out``
        self.deferred = False  # the data provider said "nothing yet": resume it on more
        self.submitted = False  # our headers went to nghttp2 with the data provider
        self.ended = False  # our side is over (END_STREAM or RST_STREAM queued)


class Connection:
    """One HTTP/2 connection on an nghttp2 session, for a codec written against h2's ``H2Connection``.

    ``client``: the client side (the upstream codec) or the server side; ``local_settings``: h2's
    :class:`h2.settings.Settings` of the SETTINGS to send (``initiate_connection`` sends them);
    ``max_header_list_size``: the largest received header list decoded (the codecs' ``decoder`` limit).
    """

    def __init__(self, client: bool, local_settings, max_header_list_size: int):
        ffi, lib = library()
        self._ffi, self._lib = ffi, lib
        self.client = client
        self.local_settings = local_settings
        self.decoder = _Limits(max_header_list_size)
        self.highest_inbound_stream_id = 0
        #: The peer's SETTINGS_MAX_FRAME_SIZE (RFC 9113's initial value until its SETTINGS say otherwise).
        self.max_outbound_frame_size = 16384
        self._next_stream_id = 1 if client else 2
        self._streams = {}
        self._buffered = 0  # DATA bytes queued on all streams
        self._events = []
        self._out = []  # bytes taken from nghttp2 (receive_data looks for its GOAWAY), not yet handed out
        self._error = None  # (code, message): a connection error found by a callback
        self._receiving = None  # the _Stream whose header block is being received
        self._header_limit = max_header_list_size
        self._goaway_ours = False  # the GOAWAY nghttp2 sends was submitted here
        # The pump drives the session and is (or holds) the user_data of its callbacks, which call this
        # connection's _on_* methods: the C module's when it is built, else cffi's.
        callbacks = _native(ffi, lib) if http2_engine.chosen() == "nghttp2" else None
        if callbacks is not None:
            pump = callbacks.module.Pump(self)
            user_data = ffi.cast("void *", id(pump))  # a Pump is the C struct its callbacks are given
        else:
            callbacks = _callbacks(ffi, lib)
            pump = _CffiPump(self, ffi, lib, callbacks.provider)
            user_data = pump.handle
        session = ffi.new("nghttp2_session **")
        new = lib.nghttp2_session_client_new2 if client else lib.nghttp2_session_server_new2
        if new(session, callbacks.callbacks, user_data, _options(ffi, lib)):
            raise MemoryError("nghttp2_session_new")
        self._session = ffi.gc(session[0], lib.nghttp2_session_del)
        pump.attach(int(ffi.cast("uintptr_t", self._session)))
        self._pump = pump

    # -- the connection --------------------------------------------------------------------
    def initiate_connection(self) -> None:
        """Queue the preface's SETTINGS (``local_settings``)."""
        items = list(self.local_settings.items())
        entries = self._ffi.new("nghttp2_settings_entry[]", len(items))
        for index, (code, value) in enumerate(items):
            entries[index].settings_id = code
            entries[index].value = value
        self._check(self._lib.nghttp2_submit_settings(self._session, 0, entries, len(items)), "submit_settings")

    def receive_data(self, data: bytes) -> list:
        """Feed the peer's bytes in; the h2 events they make.  Raises :class:`h2.exceptions.ProtocolError`
        on a connection error, its GOAWAY queued."""
        events = self._events = []
        used = self._pump.recv(data)
        if used < 0 and self._error is None:  # a callback raised (logged), or nghttp2 failed
            self._error = (ErrorCodes.INTERNAL_ERROR if used == _ERR_CALLBACK_FAILURE else ErrorCodes.PROTOCOL_ERROR,
                           f"nghttp2_session_mem_recv: {used}")
        if self._error is not None:
            code, message = self._error
            self._goaway(code, b"")
            self._take_output()
            raise (DenialOfServiceError if code == ErrorCodes.ENHANCE_YOUR_CALM else ProtocolError)(message)
        self._take_output()
        if self._error is not None:  # nghttp2 found a connection error and sent GOAWAY
            raise ProtocolError(self._error[1])
        return events

    def data_to_send(self) -> bytes:
        """Every byte queued to be sent."""
        self._events = []  # a stream closed meanwhile is not an event the caller waits for
        self._take_output()
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def _take_output(self) -> None:
        goaway = self._pump.send(self._out)
        if goaway is not None:
            if goaway.__class__ is int:
                raise ProtocolError(f"nghttp2_session_mem_send: {goaway}")
            if not self._goaway_ours and self._error is None:
                self._on_goaway_sent(goaway)

    def close_connection(self, error_code=ErrorCodes.NO_ERROR, additional_data=None, last_stream_id=None) -> None:
        """Queue GOAWAY ``error_code`` naming the last stream processed."""
        self._goaway(error_code, additional_data or b"", last_stream_id)

    def _goaway(self, code, data: bytes, last_stream_id=None) -> None:
        self._goaway_ours = True
        if last_stream_id is None:
            last_stream_id = self._lib.nghttp2_session_get_last_proc_stream_id(self._session)
        self._lib.nghttp2_submit_goaway(self._session, 0, last_stream_id, int(code), data, len(data))

    def ping(self, opaque_data: bytes) -> None:
        """Queue a PING with these 8 bytes."""
        self._check(self._lib.nghttp2_submit_ping(self._session, 0, opaque_data), "submit_ping")

    def increment_flow_control_window(self, increment: int, stream_id=None) -> None:
        """Open the receive window of the connection (``stream_id`` None) or of a stream by ``increment``."""
        self._check(self._lib.nghttp2_submit_window_update(self._session, 0, stream_id or 0, increment),
                    "submit_window_update")

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """Give ``acknowledged_size`` received bytes of ``stream_id`` back to the peer's windows."""
        self._pump.consume(stream_id, acknowledged_size)

    def get_next_available_stream_id(self) -> int:
        """The id the next request gets (client side): nghttp2 numbers requests 1, 3, 5, ... as they are
        submitted, and :meth:`send_headers` counts them the same."""
        return self._next_stream_id

    # -- streams -----------------------------------------------------------------------------
    def _open(self, stream_id) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            raise StreamClosedError(stream_id)
        return stream

    def local_flow_control_window(self, stream_id: int) -> int:
        """How many DATA bytes ``stream_id`` may still be given (the peer's windows less what is queued)."""
        stream = self._open(stream_id)
        window, shared = self._pump.windows(stream_id)
        window -= len(stream.out)
        shared -= self._buffered
        return window if window < shared else shared

    def send_headers(self, stream_id: int, headers, end_stream: bool = False) -> None:
        """A request (client side, on the next stream id), a response head (1xx ones included), or trailers
        (``end_stream`` required)."""
        stream = self._streams.get(stream_id)
        if stream is None and self.client:
            stream = _Stream(head=_is_head(headers))
            got = self._pump.submit(SUBMIT_REQUEST, stream_id, headers, not end_stream)
            if got != stream_id:
                raise ProtocolError(f"nghttp2_submit_request: {got} (stream {stream_id} expected)")
            self._next_stream_id = got + 2
            self._streams[stream_id] = stream
            stream.submitted = not end_stream
            stream.ended = end_stream
            return
        if stream is None or stream.ended:
            raise StreamClosedError(stream_id)
        if stream.submitted:  # trailers, behind the queued DATA
            if not end_stream:
                raise ProtocolError("Trailers must have END_STREAM set")
            stream.trailers = headers
            self._end(stream_id, stream)
            return
        first = headers[0]
        if first[0] == b":status" and first[1][:1] == b"1":  # informational: more heads follow
            self._check(self._pump.submit(SUBMIT_HEADERS, stream_id, headers, False), "submit_headers")
            return
        self._check(self._pump.submit(SUBMIT_RESPONSE, stream_id, headers, not end_stream), "submit_response")
        stream.submitted = not end_stream
        stream.ended = end_stream

    def send_data(self, stream_id: int, data) -> None:
        """Queue DATA bytes on ``stream_id`` (within :meth:`local_flow_control_window`, as with h2)."""
        stream = self._open(stream_id)
        stream.out += data
        self._buffered += len(data)
        if stream.deferred:
            stream.deferred = False
            self._pump.resume(stream_id)

    def end_stream(self, stream_id: int) -> None:
        """END_STREAM on ``stream_id``, after its queued DATA."""
        self._end(stream_id, self._open(stream_id))

    def _end(self, stream_id, stream) -> None:
        stream.ended = stream.eof = True
        if stream.deferred:
            stream.deferred = False
            self._pump.resume(stream_id)

    def reset_stream(self, stream_id: int, error_code=ErrorCodes.NO_ERROR) -> None:
        """RST_STREAM ``error_code``, after what was sent on the stream before it (h2 frames at once, so a
        reset never takes that back; nghttp2 drops the frames of a stream it has not written yet);
        :class:`h2.exceptions.StreamClosedError` if the stream is gone."""
        if stream_id in self._streams:
            self._take_output()  # which may close the stream: its END_STREAM went, the peer's had come
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            raise StreamClosedError(stream_id)
        self._buffered -= len(stream.out)
        stream.ended = True
        self._lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, int(error_code))

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _check(result: int, what: str) -> None:
        if result < 0:
            raise ProtocolError(f"nghttp2_{what}: {result}")

    def _fail(self, code, message) -> int:
        """A connection error found in a callback: nghttp2 stops, :meth:`receive_data` raises."""
        if self._error is None:
            self._error = (code, message)
        return _ERR_CALLBACK_FAILURE

    # -- what the callbacks call (the C module's, or cffi's in _callbacks) ------------------------
    def _on_begin_headers(self, stream_id: int):
        """A header block begins on ``stream_id``: the list its fields go into, or None to drop them."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if self.client:  # a stream this side has reset: its headers are not kept
                self._receiving = None
                return None
            stream = self._streams[stream_id] = _Stream()
            if stream_id > self.highest_inbound_stream_id:
                self.highest_inbound_stream_id = stream_id
        stream.headers = []
        stream.size = 0
        stream.oversized = False
        self._receiving = stream  # the header block being received (blocks never interleave)
        self._header_limit = self.decoder.max_header_list_size
        return stream.headers

    def _over_limit(self, end_headers: bool) -> int:
        """The header list being received passed ``decoder.max_header_list_size``.

        In the last frame of the block (``end_headers``: nghttp2 sets END_HEADERS on the HEADERS frame it
        gives for a CONTINUATION): stop decoding now.  Before it, as with h2 (which decodes a whole block),
        the error waits for the block's end, and the fields are dropped (FrameGuard bounds the block
        meanwhile).
        """
        stream = self._receiving
        stream.headers.clear()
        stream.oversized = True
        if end_headers:
            return self._oversized()
        return 0

    def _oversized(self) -> int:
        return self._fail(ErrorCodes.ENHANCE_YOUR_CALM,
                          f"A header list larger than {self.decoder.max_header_list_size} has been received")

    def _on_headers(self, stream_id: int, flags: int, category: int, checked: int) -> None:
        """A header block ended (``flags`` of its HEADERS frame; ``category``: nghttp2's, request or not;
        ``checked``: what the callbacks know of it, :data:`~mesh.proxy.codec.h2_connection.UNCHECKED`,
        ``VALUES_CHECKED`` or ``BLOCK_CHECKED``, see :func:`~mesh.proxy.codec.h2_connection.received_headers`)."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        if stream.oversized:
            self._oversized()
            return
        headers, stream.headers = stream.headers, None
        ended = flags & _END_STREAM
        client = self.client
        if not client:
            kind = RequestReceived if category == _HCAT_REQUEST else TrailersReceived
        elif stream.final:
            kind = TrailersReceived
        elif headers and headers[0][0] == b":status" and headers[0][1][:1] == b"1":
            kind = InformationalResponseReceived
        else:
            stream.final = True
            kind = ResponseReceived
        try:
            if kind is TrailersReceived:
                if not ended:
                    raise ProtocolError("Trailers must have END_STREAM set")
                flags = _TRAILER_FLAGS[client]
            else:
                flags = _HEAD_FLAGS[client]
                if kind is not InformationalResponseReceived:
                    stream.expected = 0 if stream.head else _content_length(headers)
                elif ended:  # RFC 9113 8.1: malformed (h2's stream state machine says so, in its words)
                    raise ProtocolError("Cannot set END_STREAM on informational responses")
            # the callbacks check a request's head as a request and a response's as a response: only
            # such a head, on the side that receives it, is taken as checked whole
            if checked == BLOCK_CHECKED and (kind is TrailersReceived or category != _HEAD_CATEGORY[client]):
                checked = VALUES_CHECKED
            headers = received_headers(headers, flags, checked)  # h2's normalization and validation
        except ProtocolError as error:
            self._fail(ErrorCodes.PROTOCOL_ERROR, str(error))
            return
        event = _new(kind)
        event.stream_id = stream_id
        event.headers = headers
        events = self._events
        events.append(event)
        if ended:
            end = _new(StreamEnded)
            end.stream_id = stream_id
            event.stream_ended = end
            events.append(end)

    def _on_end_stream(self, stream_id: int) -> None:
        """A DATA frame with END_STREAM: the body must have its content-length."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.expected is not None and stream.expected != stream.received:
            self._fail(ErrorCodes.PROTOCOL_ERROR, f"InvalidBodyLengthError: Expected {stream.expected} bytes, "
                                                  f"received {stream.received}")
            return
        end = _new(StreamEnded)
        end.stream_id = stream_id
        self._events.append(end)

    def _on_window_update(self, stream_id: int, delta: int) -> None:
        event = _new(WindowUpdated)
        event.stream_id = stream_id
        event.delta = delta
        self._events.append(event)

    def _on_settings(self, entries) -> None:
        """The peer's SETTINGS (not an ACK): ``entries``, (id, value) pairs, which nghttp2 has applied."""
        event = RemoteSettingsChanged()
        changed = event.changed_settings
        for setting, value in entries:
            code = _setting_code_from_int(setting)
            changed[code] = ChangedSetting(code, None, value)
            if setting == _SETTINGS_MAX_FRAME_SIZE:  # nghttp2 applied it before this callback
                self.max_outbound_frame_size = value
        self._events.append(event)

    def _on_rst_stream(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._buffered -= len(stream.out)
        self._events.append(StreamReset(stream_id=stream_id, error_code=_error_code(error_code)))

    def _on_ping_ack(self, data: bytes) -> None:
        self._events.append(PingAckReceived(ping_data=data))

    def _on_goaway(self, last_stream_id: int, error_code: int, data) -> None:
        """The peer's GOAWAY (``data``: its debug data, None without)."""
        if self.client:  # the streams above last_stream_id were never processed: nghttp2 closes them
            # next, and the codec learns it from this event (as with h2), not from a reset each
            for stream_id in [stream_id for stream_id in self._streams if stream_id > last_stream_id]:
                self._buffered -= len(self._streams.pop(stream_id).out)
        event = ConnectionTerminated()
        event.error_code = _error_code(error_code)
        event.last_stream_id = last_stream_id
        event.additional_data = data
        self._events.append(event)

    def _on_invalid_frame(self, stream_id: int, lib_error: int) -> None:
        if stream_id and stream_id in self._streams:  # nghttp2 resets this stream (its RST_STREAM is queued)
            stream = self._streams.pop(stream_id)
            self._buffered -= len(stream.out)
            self._events.append(StreamReset(stream_id=stream_id,
                                            error_code=_STREAM_ERRORS.get(lib_error, ErrorCodes.PROTOCOL_ERROR),
                                            remote_reset=False))

    def _on_data(self, stream_id: int, data: bytes) -> int:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.expected is not None:
            stream.received += len(data)
            if stream.received > stream.expected:
                return self._fail(ErrorCodes.PROTOCOL_ERROR, f"InvalidBodyLengthError: Expected {stream.expected} "
                                                             f"bytes, received {stream.received}")
        event = _new(DataReceived)
        event.stream_id = stream_id
        event.data = data
        event.flow_controlled_length = len(data)
        self._events.append(event)
        return 0

    def _on_close(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._buffered -= len(stream.out)
            if error_code:  # reset by nghttp2 itself (a body longer than its content-length, ...)
                self._events.append(StreamReset(stream_id=stream_id, error_code=_error_code(error_code),
                                                remote_reset=False))

    def _on_goaway_sent(self, frame: bytes) -> None:
        """nghttp2 sent a GOAWAY of its own (``frame``: its bytes): the connection error it found."""
        code = _error_code(int.from_bytes(frame[13:17], "big"))  # after the frame header and last stream id
        self._error = (code, f"nghttp2 ended the connection ({code!r})")

    def _take(self, stream_id: int, length: int):
        """The data provider's read: (at most ``length`` queued DATA bytes, nghttp2's data flags), or
        nghttp2's DEFERRED while nothing is queued and the stream goes on."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return b"", _DATA_FLAG_EOF
        out = stream.out
        data = out[:length]
        if data:
            del out[:length]
            self._buffered -= len(data)
        if not out and stream.eof:
            if stream.trailers is not None:
                trailers, stream.trailers = stream.trailers, None
                self._pump.submit(SUBMIT_TRAILER, stream_id, trailers, False)
                return data, _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
            return data, _DATA_FLAG_EOF
        if not data:
            stream.deferred = True
            return _ERR_DEFERRED
        return data, 0


#: h2's header validation flags, by side (client or server): a request or response head, and trailers.
_HEAD_FLAGS = {side: HeaderValidationFlags(is_client=side, is_trailer=False, is_response_header=side,
                                           is_push_promise=False) for side in (False, True)}
_TRAILER_FLAGS = {side: HeaderValidationFlags(is_client=side, is_trailer=True, is_response_header=False,
                                              is_push_promise=False) for side in (False, True)}


def _is_head(headers) -> bool:
    """Whether a request's headers (pseudo-header fields first) are a HEAD request's."""
    for header in headers:
        if header[0] == b":method":
            return header[1] == b"HEAD"
    return False


def _content_length(headers):
    """The content-length of a received head (None without one), as h2 checks it."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise ProtocolError(f"Invalid content-length header: {value!r}")
            if length is None:
                length = int(value, 10)
            elif int(value, 10) != length:
                raise ProtocolError(f"Conflicting content-length headers: {length} and {int(value, 10)}")
    return length


@cache
def _header_array(ffi) -> HeaderArray:
    """The header array every connection shares."""
    return HeaderArray(ffi)


def _error_code(code: int):
    """``code`` as h2 gives it: an :class:`h2.errors.ErrorCodes` when known, else the int."""
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


def _callback_failed(exception, value, traceback) -> int:
    """A callback raised: logged (never printed), and nghttp2 is told to stop (the connection ends)."""
    log.failure("HTTP/2 (nghttp2) callback failed; the connection is ended", Failure(value, exception, traceback))
    return _ERR_CALLBACK_FAILURE


class _Callbacks:
    """An ``nghttp2_session_callbacks`` every :class:`Connection` of one kind shares; ``module``: the C
    module when the callbacks are its own; ``provider``: the data provider of every stream (cffi's:
    the C module's ``submit`` has its own)."""

    def __init__(self, ffi, lib, functions: dict, module=None):
        pointer = ffi.new("nghttp2_session_callbacks **")
        if lib.nghttp2_session_callbacks_new(pointer):
            raise MemoryError("nghttp2_session_callbacks_new")
        self.callbacks = ffi.gc(pointer[0], lib.nghttp2_session_callbacks_del)
        for name in ("on_begin_headers", "on_header", "on_frame_recv", "on_invalid_frame_recv",
                     "on_data_chunk_recv", "on_stream_close"):
            getattr(lib, f"nghttp2_session_callbacks_set_{name}_callback")(self.callbacks, functions[name])
        self.module = module
        self.provider = None
        if "on_read" in functions:
            self.provider = ffi.new("nghttp2_data_provider *")
            self.provider.read_callback = functions["on_read"]
        self._functions = functions  # cffi's callback objects must stay alive


@cache
def _native(ffi, lib) -> _Callbacks | None:
    """The callbacks of the C module ``_nghttp2_pump`` (built from ``_nghttp2_pump.c`` when the package is
    installed, if a compiler is there), or None without it: then the cffi callbacks of :func:`_callbacks`.
    Both call the same ``_on_*`` methods of the connection."""
    try:
        from mesh.proxy.codec import _nghttp2_pump
    except ImportError as e:
        log.warn("HTTP/2 (nghttp2) callbacks in Python: the C module is not built ({error}); "
                 "reinstall txmesh with a C compiler and Python's headers to build it", error=e)
        return None
    _nghttp2_pump.bind({name: int(ffi.cast("uintptr_t", ffi.addressof(lib, name))) for name in _nghttp2_pump.FUNCTIONS},
                       NeverIndexedHeaderTuple, _callback_failed)
    kinds = {"on_begin_headers": "frame_cb", "on_header": "header_cb", "on_frame_recv": "frame_cb",
             "on_invalid_frame_recv": "invalid_frame_cb", "on_data_chunk_recv": "data_chunk_cb",
             "on_stream_close": "stream_close_cb"}
    functions = {name: ffi.cast(kinds[name], address) for name, address in _nghttp2_pump.callback_addresses().items()}
    return _Callbacks(ffi, lib, functions, _nghttp2_pump)


#: What :meth:`_CffiPump.submit` (and the C module's) sends, by ``kind``.
SUBMIT_REQUEST, SUBMIT_RESPONSE, SUBMIT_HEADERS, SUBMIT_TRAILER = range(4)


class _CffiPump:
    """What the C module's ``Pump`` does, through cffi: the session's user_data is a handle to a weak
    reference to the connection (so that the connection and its handle make no reference cycle)."""

    def __init__(self, conn, ffi, lib, provider):
        self.handle = ffi.new_handle(weakref.ref(conn))
        self._ffi, self._lib, self._provider = ffi, lib, provider
        self._sent = ffi.new("const uint8_t **")
        self._headers = _header_array(ffi)

    def submit(self, kind: int, stream_id: int, headers, with_data: bool) -> int:
        """Send a header block (``kind``: SUBMIT_*), with the data provider when ``with_data``; what
        the nghttp2_submit_* function returned."""
        lib, session, null = self._lib, self._session, self._ffi.NULL
        count = self._headers.build(headers)
        nva = self._headers.nva
        provider = self._provider if with_data else null
        if kind == SUBMIT_REQUEST:
            return lib.nghttp2_submit_request(session, null, nva, count, provider, null)
        if kind == SUBMIT_RESPONSE:
            return lib.nghttp2_submit_response(session, stream_id, nva, count, provider)
        if kind == SUBMIT_HEADERS:
            return lib.nghttp2_submit_headers(session, 0, stream_id, null, nva, count, null)
        return lib.nghttp2_submit_trailer(session, stream_id, nva, count)

    def attach(self, address: int) -> None:
        self._session = self._ffi.cast("nghttp2_session *", address)

    def windows(self, stream_id: int) -> tuple:
        """The peer's send windows: the stream's (its initial one before its HEADERS go), the connection's."""
        lib, session = self._lib, self._session
        window = lib.nghttp2_session_get_stream_remote_window_size(session, stream_id)
        if window < 0:  # a request whose HEADERS are not sent yet: nghttp2 opens the stream then
            window = lib.nghttp2_session_get_remote_settings(session, _SETTINGS_INITIAL_WINDOW_SIZE)
        return window, lib.nghttp2_session_get_remote_window_size(session)

    def consume(self, stream_id: int, size: int) -> int:
        return self._lib.nghttp2_session_consume(self._session, stream_id, size)

    def resume(self, stream_id: int) -> int:
        return self._lib.nghttp2_session_resume_data(self._session, stream_id)

    def recv(self, data: bytes) -> int:
        return self._lib.nghttp2_session_mem_recv(self._session, data, len(data))

    def send(self, out: list):
        """Append every frame nghttp2 gives to ``out``: the first GOAWAY among them, or mem_send's error."""
        ffi, send, session, sent = self._ffi, self._lib.nghttp2_session_mem_send, self._session, self._sent
        goaway = None
        while (size := send(session, sent)) > 0:
            frame = ffi.buffer(sent[0], size)[:]  # one frame (or the client preface) per call
            out.append(frame)
            if frame[3] == _GOAWAY and goaway is None:
                goaway = frame
        return size if size < 0 else goaway


@cache
def _callbacks(ffi, lib) -> _Callbacks:
    """The cffi callbacks; each finds its connection from the handle of the session's user_data."""
    backend = getattr(ffi, "_backend", None)  # cffi's functions without their Python-level wrappers
    from_handle = getattr(backend, "from_handle", ffi.from_handle)
    unpack = getattr(backend, "unpack", ffi.unpack)

    def callback(kind):
        return lambda function: ffi.callback(kind, function, error=_ERR_CALLBACK_FAILURE, onerror=_callback_failed)

    @callback("frame_cb")
    def on_begin_headers(session, frame, user_data):
        from_handle(user_data)()._on_begin_headers(frame.hd.stream_id)
        return 0

    @callback("header_cb")
    def on_header(session, frame, name, namelen, value, valuelen, flags, user_data):
        conn = from_handle(user_data)()
        stream = conn._receiving
        if stream is None:
            return 0
        size = stream.size = stream.size + namelen + valuelen + 32
        if size > conn._header_limit:
            return conn._over_limit(frame.hd.flags & _END_HEADERS)
        if flags & _NV_FLAG_NO_INDEX:
            stream.headers.append(_tuple(NeverIndexedHeaderTuple, (unpack(name, namelen), unpack(value, valuelen))))
        else:
            stream.headers.append((unpack(name, namelen), unpack(value, valuelen)))
        return 0

    @callback("frame_cb")
    def on_frame_recv(session, frame, user_data):
        conn = from_handle(user_data)()
        hd = frame.hd
        kind = hd.type
        if kind == _DATA:
            if hd.flags & _END_STREAM:
                conn._on_end_stream(hd.stream_id)
        elif kind == _HEADERS:
            conn._on_headers(hd.stream_id, hd.flags, frame.headers.cat, UNCHECKED)
        elif kind == _WINDOW_UPDATE:
            conn._on_window_update(hd.stream_id, frame.window_update.window_size_increment)
        elif kind == _SETTINGS:
            if not hd.flags & _ACK:
                settings = frame.settings
                conn._on_settings([(settings.iv[index].settings_id, settings.iv[index].value)
                                   for index in range(settings.niv)])
        elif kind == _RST_STREAM:
            conn._on_rst_stream(hd.stream_id, frame.rst_stream.error_code)
        elif kind == _PING:
            if hd.flags & _ACK:
                conn._on_ping_ack(bytes(frame.ping.opaque_data))
        elif kind == _GOAWAY:
            goaway = frame.goaway
            conn._on_goaway(goaway.last_stream_id, goaway.error_code,
                            ffi.buffer(goaway.opaque_data, goaway.opaque_data_len)[:]
                            if goaway.opaque_data_len else None)
        return 0

    @callback("invalid_frame_cb")
    def on_invalid_frame_recv(session, frame, lib_error, user_data):
        from_handle(user_data)()._on_invalid_frame(frame.hd.stream_id, lib_error)
        return 0

    @callback("data_chunk_cb")
    def on_data_chunk_recv(session, flags, stream_id, chunk, length, user_data):
        return from_handle(user_data)()._on_data(stream_id, unpack(chunk, length))

    @callback("stream_close_cb")
    def on_stream_close(session, stream_id, error_code, user_data):
        from_handle(user_data)()._on_close(stream_id, error_code)
        return 0

    @callback("nghttp2_data_source_read_callback")
    def on_read(session, stream_id, buffer, length, data_flags, source, user_data):
        taken = from_handle(user_data)()._take(stream_id, length)
        if taken.__class__ is int:
            return taken
        data, flags = taken
        ffi.memmove(buffer, data, len(data))
        data_flags[0] |= flags
        return len(data)

    return _Callbacks(ffi, lib, dict(on_begin_headers=on_begin_headers, on_header=on_header,
                                     on_frame_recv=on_frame_recv, on_invalid_frame_recv=on_invalid_frame_recv,
                                     on_data_chunk_recv=on_data_chunk_recv, on_stream_close=on_stream_close,
                                     on_read=on_read))


@cache
def _options(ffi, lib):
    """The session options every :class:`Connection` shares."""
    pointer = ffi.new("nghttp2_option **")
    if lib.nghttp2_option_new(pointer):
        raise MemoryError("nghttp2_option_new")
    options = ffi.gc(pointer[0], lib.nghttp2_option_del)
    lib.nghttp2_option_set_no_auto_window_update(options, 1)  # the codecs acknowledge what they took
    lib.nghttp2_option_set_no_http_messaging(options, 1)  # h2's validation instead (received_headers)
    lib.nghttp2_option_set_no_closed_streams(options, 1)  # no priority tree: closed streams are forgotten
    lib.nghttp2_option_set_max_send_header_block_length(options, 1 << 20)  # h2 has no limit; the peer's applies
    # The limits of Debian's backports (CVE-2023-44487, CVE-2024-28182), absent from older builds: the
    # server codec has its own rapid-reset rule (Envoy's, on premature resets), which nghttp2's (any 1000
    # resets, then 33 a second) must not overrule; CONTINUATION frames per block as h2 allows them (64;
    # nghttp2's default is 8), the server codec's FrameGuard bounding the block's bytes.
    for name, args in (("nghttp2_option_set_stream_reset_rate_limit", (1 << 62, 33)),
                       ("nghttp2_option_set_max_continuations", (64,))):
        try:
            setter = getattr(lib, name)
        except AttributeError:
            continue
        setter(options, *args)
    return options
