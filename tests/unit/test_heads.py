"""The pure HTTP/1.1 head serializers (mesh.proxy.codec.heads): bytes out, nothing changed."""

from mesh.proxy.codec.heads import CHUNKED, CLOSE, local_response, response_head


def test_response_head_returns_the_head_and_its_framing_and_changes_nothing():
    headers = [(b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive, x-hop"), (b"X-Hop", b"1")]
    before = list(headers)
    head, framing = response_head(200, b"OK", headers, None, False, "1.1", True)
    assert headers == before
    assert (head, framing) == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n",
                               CHUNKED)
    head, framing = response_head(200, b"OK", headers, None, False, "1.0", True)
    assert framing == CLOSE and head.endswith(b"connection: close\r\n\r\n")
    head, framing = response_head(200, b"", [(b"content-length", b"2")], None, False, "1.0", True)
    assert framing is None and head == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\n"
    head, framing = response_head(204, b"", [], None, False, "1.1", False)
    assert framing is None and head == b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"


def test_a_local_response_takes_plugin_headers_but_keeps_its_framing():
    plain = local_response(503, "UF", b"down\n", False, "r1", (), True)
    assert plain == (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"content-length: 5\r\nx-mesh-flags: UF\r\nx-request-id: r1\r\nconnection: close\r\n\r\ndown\n")
    changed = local_response(503, "UF", b"down\n", True, "r1",
                             [(b"x-mesh-flags", None), (b"content-type", b"text/html"),
                              (b"content-length", b"0"), (b"connection", None)], False)
    assert changed == (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 5\r\nx-request-id: r1\r\n"
                       b"content-type: text/html\r\n\r\n")
