"""A response whose body ends when the app closes the connection, through a real sidecar.

An HTTP/1.0 server, or an HTTP/1.1 one that says ``Connection: close``, may send a body with neither a
Content-Length nor chunks: it ends when the server closes (RFC 9112 section 6.3). Envoy passes such a
body on whole (chunked to an HTTP/1.1 client, in DATA frames to an HTTP/2 one); so must the sidecar. A
server that resets the connection in the middle of such a body cut it short: that is a failure (UC).
"""

from __future__ import annotations

import socket

import pytest

from tests.harness import ThreadedSocketServer
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

BODY = b"0123456789abcdef" * 20_000  # 320,000 bytes: many reads and writes on the way


class _UntilCloseServer(ThreadedSocketServer):
    """Answers every request with ``BODY`` and no length, then closes (or resets, for ``/reset``)."""

    HEADS = {b"/http10": b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
             b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\n",
             b"/reset": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"}

    def answer(self, connection):
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = connection.recv(65536)
            if not data:
                connection.close()
                return
            buffer += data
        path = buffer.split(b" ", 2)[1]
        connection.sendall(self.HEADS.get(path, self.HEADS[b"/close"]))
        if path == b"/reset":
            connection.sendall(BODY[:1000])
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        else:
            connection.sendall(BODY)
        connection.close()


@pytest.fixture(scope="module")
def proxy(proxy_factory, tmp_path_factory):
    server = _UntilCloseServer()
    config = write_config(tmp_path_factory.mktemp("until-close"), service_entry("legacy", [endpoint(server.address)]))
    yield proxy_factory(config, "client")
    server.close()


@pytest.mark.parametrize("http2", [False, True], ids=["http1-client", "http2-client"])
@pytest.mark.parametrize("path", ["/http10", "/close"])
def test_a_body_that_ends_at_the_close_arrives_whole(proxy, path, http2):
    result = proxy.curl("legacy", path, extra_args=["--http2-prior-knowledge"] if http2 else [])
    assert (result.status, result.exit_code) == (200, 0), result
    assert result.body == BODY


def test_a_reset_in_the_middle_of_such_a_body_is_a_failure(proxy):
    result = proxy.curl("legacy", "/reset")
    assert result.exit_code != 0 and len(result.body) < len(BODY), result
