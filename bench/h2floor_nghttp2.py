"""The same HTTP/2 hop as :mod:`bench.h2floor`, on libnghttp2 (the C library Envoy used for years).

A measurement of the way forward for the HTTP/2 codecs (docs/performance.md, "The floor"), not a
codec: two nghttp2 sessions, a client and a server, driven from Python through cffi in ABI mode
(``ffi.dlopen`` of Debian's ``libnghttp2.so.14``, which curl and h2load already need: no headers,
no compiler), exchange the request and response of :mod:`bench.h2floor` (a fresh x-request-id each
time, nginx's response head as the proxy forwards it, a 1 KiB body).  What Python does per request
is what a codec on nghttp2 would have to do at least: build the header array, feed received bytes
in, take the bytes to send out, and take each received header, the end of a request, each DATA
chunk and the stream's close from a callback.  nghttp2's automatic flow control gives the windows
back (a proxy would consume by hand, for backpressure: one call more per DATA frame).

    .venv/bin/python -m bench.h2floor --codec nghttp2
"""

from __future__ import annotations

import struct
import uuid

from cffi import FFI

from bench.h2floor import BODY, REQUEST, RESPONSE

_FFI = FFI()
# The subset of nghttp2.h used here.  nghttp2_frame is a union whose every member starts with the
# frame header, the only part read: declared as that header alone, never allocated here.
_FFI.cdef("""
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct { size_t length; int32_t stream_id; uint8_t type; uint8_t flags; uint8_t reserved; } nghttp2_frame_hd;
typedef struct { nghttp2_frame_hd hd; } nghttp2_frame;
typedef struct { uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen; uint8_t flags; } nghttp2_nv;
typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *,
                                                     nghttp2_data_source *, void *);
typedef struct { nghttp2_data_source source; nghttp2_data_source_read_callback read_callback; } nghttp2_data_provider;
int nghttp2_session_callbacks_new(nghttp2_session_callbacks **);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t, const uint8_t *, size_t, uint8_t,
            void *));
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, const nghttp2_frame *, void *));
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *));
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
    int (*)(nghttp2_session *, int32_t, uint32_t, void *));
int nghttp2_session_server_new(nghttp2_session **, const nghttp2_session_callbacks *, void *);
int nghttp2_session_client_new(nghttp2_session **, const nghttp2_session_callbacks *, void *);
int nghttp2_submit_settings(nghttp2_session *, uint8_t, const void *, size_t);
ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t);
ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **);
int32_t nghttp2_submit_request(nghttp2_session *, const void *, const nghttp2_nv *, size_t,
                               const nghttp2_data_provider *, void *);
int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t, const nghttp2_data_provider *);
""")
_LIB = _FFI.dlopen("libnghttp2.so.14")
_END_STREAM = 0x1
_DATA, _HEADERS = 0x0, 0x1
_DATA_FLAG_EOF = 0x1
#: One nghttp2_nv on x86-64: two pointers, two lengths, the flags byte padded to 8.
_NV = struct.Struct("<QQQQQ")


class Session:
    """One end of the hop: an nghttp2 session and what its callbacks received, by stream."""

    def __init__(self, server: bool):
        self.headers: dict[int, list] = {}
        self.body: dict[int, list] = {}
        self.ended: list[int] = []
        callbacks = _FFI.new("nghttp2_session_callbacks **")
        _LIB.nghttp2_session_callbacks_new(callbacks)
        self._callbacks = (  # kept alive as long as the session
            _FFI.callback("int(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t, const uint8_t *,"
                          " size_t, uint8_t, void *)", self._on_header),
            _FFI.callback("int(nghttp2_session *, const nghttp2_frame *, void *)", self._on_frame),
            _FFI.callback("int(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t, void *)", self._on_data),
            _FFI.callback("int(nghttp2_session *, int32_t, uint32_t, void *)", self._on_close))
        _LIB.nghttp2_session_callbacks_set_on_header_callback(callbacks[0], self._callbacks[0])
        _LIB.nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks[0], self._callbacks[1])
        _LIB.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks[0], self._callbacks[2])
        _LIB.nghttp2_session_callbacks_set_on_stream_close_callback(callbacks[0], self._callbacks[3])
        session = _FFI.new("nghttp2_session **")
        new = _LIB.nghttp2_session_server_new if server else _LIB.nghttp2_session_client_new
        new(session, callbacks[0], _FFI.NULL)
        self.session = session[0]
        _LIB.nghttp2_submit_settings(self.session, 0, _FFI.NULL, 0)
        self._out = _FFI.new("const uint8_t **")

    def _on_header(self, session, frame, name, namelen, value, valuelen, flags, user_data):
        self.headers.setdefault(frame.hd.stream_id, []).append(
            (_FFI.buffer(name, namelen)[:], _FFI.buffer(value, valuelen)[:]))
        return 0

    def _on_frame(self, session, frame, user_data):
        header = frame.hd
        if header.flags & _END_STREAM and header.type in (_DATA, _HEADERS):
            self.ended.append(header.stream_id)
        return 0

    def _on_data(self, session, flags, stream_id, data, length, user_data):
        self.body.setdefault(stream_id, []).append(_FFI.buffer(data, length)[:])
        return 0

    def _on_close(self, session, stream_id, error_code, user_data):
        return 0

    def receive(self, data: bytes) -> None:
        """Feed the peer's bytes in (the callbacks run from here)."""
        _LIB.nghttp2_session_mem_recv(self.session, data, len(data))

    def data_to_send(self) -> bytes:
        """Every byte nghttp2 has to send now."""
        chunks = []
        while (size := _LIB.nghttp2_session_mem_send(self.session, self._out)) > 0:
            chunks.append(_FFI.buffer(self._out[0], size)[:])
        return b"".join(chunks)


def header_array(headers):
    """``(nghttp2_nv[], keep)``: the array for ``headers`` -- one blob of their bytes and the pointers
    into it packed in one go -- and the blob's C buffer, which must outlive the submit call."""
    blob = b"".join([part for pair in headers for part in pair])
    keep = _FFI.from_buffer(blob)
    at = int(_FFI.cast("uintptr_t", keep))
    packed = bytearray(_NV.size * len(headers))
    for index, (name, value) in enumerate(headers):
        _NV.pack_into(packed, _NV.size * index, at, at + len(name), len(name), len(value), 0)
        at += len(name) + len(value)
    return _FFI.from_buffer("nghttp2_nv[]", packed), keep


_BODIES: dict[int, bytes] = {}


@_FFI.callback("ssize_t(nghttp2_session *, int32_t, uint8_t *, size_t, uint32_t *, nghttp2_data_source *, void *)")
def _read_body(session, stream_id, buffer, length, data_flags, source, user_data):
    body = _BODIES.pop(stream_id)
    _FFI.memmove(buffer, body, len(body))
    data_flags[0] |= _DATA_FLAG_EOF
    return len(body)


_BODY_PROVIDER = _FFI.new("nghttp2_data_provider *")
_BODY_PROVIDER.read_callback = _read_body


def connections():
    """A (client, server) pair of sessions past their prefaces and SETTINGS."""
    client, server = Session(server=False), Session(server=True)
    for _ in range(2):
        server.receive(client.data_to_send())
        client.receive(server.data_to_send())
    return client, server


def exchange(client: Session, server: Session, count: int) -> None:
    """``count`` requests, one at a time, through the two sessions (checked, so the loop cannot cheat)."""
    from mesh.proxy.codec.h2_server import _response_headers

    response = _response_headers(200, RESPONSE, None)
    for _ in range(count):
        request, keep = header_array([*REQUEST, (b"x-request-id", str(uuid.uuid4()).encode())])
        stream_id = _LIB.nghttp2_submit_request(client.session, _FFI.NULL, request, len(request), _FFI.NULL, _FFI.NULL)
        server.receive(client.data_to_send())
        assert server.ended.pop() == stream_id and len(server.headers.pop(stream_id)) == len(request)
        answer, keep = header_array(response)
        _BODIES[stream_id] = BODY
        _LIB.nghttp2_submit_response(server.session, stream_id, answer, len(answer), _BODY_PROVIDER)
        client.receive(server.data_to_send())
        assert client.ended.pop() == stream_id and b"".join(client.body.pop(stream_id)) == BODY
        del client.headers[stream_id]
        server.receive(client.data_to_send())
