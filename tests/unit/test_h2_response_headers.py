"""Response headers of the HTTP/2 server codec (mesh.proxy.codec.h2_server).

h2 does not normalize what the codec sends (``normalize_outbound_headers`` is off, for speed): the
codec lower-cases names, strips values, drops connection-specific headers and keeps credentials out
of the HPACK table itself.  What it sends must be what a validating HTTP/2 client accepts.
"""

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived
from hpack import NeverIndexedHeaderTuple

from mesh.proxy.codec.h2_server import _CONFIG, _local_headers, _response_headers

#: An HTTP/1.1 upstream's response head as its parser gives it: names as sent, values with the
#: whitespace before the line end (llhttp keeps it).
UPSTREAM = [(b"Server", b"nginx  "), (b"Content-Type", b"text/plain\t"), (b"Connection", b"close, X-Hop"),
            (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"Set-Cookie", b"a=1"), (b"Authorization", b"Basic x")]


def test_forwarded_response_headers_are_normalized_by_the_codec():
    headers = _response_headers(200, UPSTREAM, None)
    assert headers == [(b":status", b"200"), (b"server", b"nginx"), (b"content-type", b"text/plain"),
                       (b"set-cookie", b"a=1"), (b"authorization", b"Basic x")]
    assert isinstance(headers[-1], NeverIndexedHeaderTuple)


def test_local_reply_extras_are_normalized_and_cannot_reframe_the_reply():
    headers = _local_headers(503, "UH", 5, "rid", [(b"X-Extra", b" v "), (b"Content-Length", b"99"),
                                                   (b"Content-Type", b"application/json")])
    assert (b"content-length", b"5") in headers and (b"x-extra", b"v") in headers
    assert (b"content-type", b"application/json") in headers
    assert [name for name, _ in headers].count(b"content-type") == 1


def test_a_validating_http2_client_accepts_them():
    server, client = H2Connection(config=_CONFIG), H2Connection(H2Configuration(client_side=True,
                                                                                header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
                        end_stream=True)
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.send_headers(1, _response_headers(200, UPSTREAM, None), end_stream=True)
    events = client.receive_data(server.data_to_send())
    response = next(event for event in events if isinstance(event, ResponseReceived))
    assert response.headers == _response_headers(200, UPSTREAM, None)
