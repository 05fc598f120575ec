"""The sidecar's HTTP/1.1 codec: headers it adds and drops, malformed and hostile input, timers and limits,
keep-alive, pipelining, WebSocket.

Two proxies over one config: ``proxy`` with default limits, and ``strict`` started with
``--header-timeout 1 --idle-timeout 1 --max-request-body 1k``.  Malformed requests are written byte by byte with
:class:`RawConnection`; each must get the right status AND a closed connection, and no traceback in the log.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid

import pytest

from tests.harness import RawConnection, ThreadedSocketServer, wait_for
from tests.integration.test_proxy_support import (
    cluster_name,
    curl_many,
    endpoint,
    endpoint_stats,
    service_entry,
    write_config,
)

MAX_HEADER_BYTES = 60 * 1024


class _HopByHopServer(ThreadedSocketServer):
    """An upstream whose every response carries hop-by-hop headers, to see what the proxy forwards."""

    RESPONSE = (b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Hop\r\nX-Resp-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Authenticate: Basic\r\nTrailer: X-Checksum\r\nX-Resp-End: kept\r\n"
                b"Content-Length: 3\r\n\r\nok\n")

    def answer(self, connection):
        with connection:
            buffer = b""
            while True:
                data = connection.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, _, buffer = buffer.partition(b"\r\n\r\n")
                    connection.sendall(self.RESPONSE)


@pytest.fixture(scope="module")
def hop_server():
    server = _HopByHopServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def mesh(backend_factory, proxy_factory, tmp_path_factory, hop_server):
    echo, ka = backend_factory("echo"), backend_factory("ka")
    config = write_config(
        tmp_path_factory.mktemp("http-config"),
        service_entry("echo", [endpoint(echo)]),
        service_entry("ka", [endpoint(ka)]),
        service_entry("hop", [endpoint(hop_server.address)]),
    )
    proxy = proxy_factory(config, "client")
    strict = proxy_factory(config, "client", extra_args=[
        "--header-timeout", "1", "--idle-timeout", "1", "--max-request-body", "1k"])
    return proxy, strict, ka


@pytest.fixture
def proxy(mesh):
    return mesh[0]


@pytest.fixture
def strict(mesh):
    return mesh[1]


def raw(proxy) -> RawConnection:
    return RawConnection("127.0.0.1", proxy.outbound_port, timeout=10)


# -- headers added and dropped -------------------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_not_forwarded(proxy):
    result = proxy.curl("echo", "/", headers=[
        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("Proxy-Authorization", "Basic eA=="),
        ("X-End", "kept")])
    assert result.status == 200, result
    seen = result.json()["headers"]
    for name in ("x-hop", "keep-alive", "proxy-connection", "te", "proxy-authorization", "connection"):
        assert name not in seen, f"{name} was forwarded: {seen}"
    assert seen["x-end"] == "kept"


def test_hop_by_hop_response_headers_are_not_forwarded(proxy):
    result = proxy.curl("hop", "/")
    assert result.status == 200 and result.body == b"ok\n", result
    for name in ("x-resp-hop", "keep-alive", "proxy-authenticate", "trailer"):
        assert name not in result.headers, f"{name} reached the client: {result.headers}"
    assert result.headers["x-resp-end"] == "kept"


def test_x_request_id_is_added_and_no_x_forwarded_for(proxy):
    """A sidecar appends nothing to x-forwarded-for (Istio's sidecars: Envoy without ``use_remote_address``)."""
    seen = proxy.curl("echo", "/").json()["headers"]
    assert "x-forwarded-for" not in seen, seen
    assert uuid.UUID(seen["x-request-id"]), seen
    assert proxy.curl("echo", "/").json()["headers"]["x-request-id"] != seen["x-request-id"]


def test_x_forwarded_for_and_x_request_id_are_kept(proxy):
    seen = proxy.curl("echo", "/", headers={"X-Forwarded-For": "10.1.2.3", "X-Request-Id": "abc-123"}).json()["headers"]
    assert seen["x-forwarded-for"] == "10.1.2.3"
    assert seen["x-request-id"] == "abc-123"


def test_x_forwarded_proto_is_added_when_absent_and_the_clients_kept(proxy):
    """As Envoy on Istio's sidecars (no ``use_remote_address``): the scheme of the app's connection, ``http``, when
    the request has none; an x-forwarded-proto the app sent (it is behind a proxy of its own) goes on unchanged."""
    assert proxy.curl("echo", "/").json()["headers"]["x-forwarded-proto"] == "http"
    kept = proxy.curl("echo", "/", headers={"X-Forwarded-Proto": "https"}).json()["headers"]
    assert kept["x-forwarded-proto"] == "https", kept


def test_http_1_0_client_gets_a_response_and_a_close(proxy):
    with raw(proxy) as conn:
        conn.send(b"GET /ten HTTP/1.0\r\nHost: echo\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200 and b'"/ten"' in response.body
        assert conn.at_eof()


def test_head_response_has_no_body(proxy):
    with raw(proxy) as conn:
        conn.send(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: echo\r\n\r\nGET /after HTTP/1.1\r\nHost: echo\r\n\r\n")
        head = conn.read_response(head_only=True)
        assert head.status == 200 and head.headers["content-length"] == "5000"
        after = conn.read_response()   # would be garbled if the proxy had sent a HEAD body
        assert after.status == 200 and b'"/after"' in after.body


# -- malformed and hostile input -----------------------------------------------------------------------------

MALFORMED = {
    "content-length-and-transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "duplicate-content-length": (
        b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
    "different-content-lengths": (
        b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: echo\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    "http-2.0-request-line": (b"GET / HTTP/2.0\r\nHost: echo\r\n\r\n", 505),
    "http-3.0-request-line": (b"GET / HTTP/3.0\r\nHost: echo\r\n\r\n", 505),
    "http-1.2-request-line": (b"GET / HTTP/1.2\r\nHost: echo\r\n\r\n", 505),
    "too-many-headers": (b"GET / HTTP/1.1\r\nHost: echo\r\n"
                         + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    "too-large-head": (b"GET / HTTP/1.1\r\nHost: echo\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n", 431),
    "too-large-url": (b"GET /" + b"a" * (MAX_HEADER_BYTES + 10) + b" HTTP/1.1\r\nHost: echo\r\n\r\n", 431),
    "missing-host": (b"GET / HTTP/1.1\r\nUser-Agent: test\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: echo\r\nHost: other\r\n\r\n", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n", 400),
    "space-in-header-name": (b"GET / HTTP/1.1\r\nHost: echo\r\nBad Header: x\r\n\r\n", 400),
    "bad-chunk-size": (b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nhello\r\n0\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_gets_status_and_close(proxy, name):
    data, status = MALFORMED[name]
    with raw(proxy) as conn:
        conn.send(data)
        response = conn.read_response()
        assert response.status == status, (response.status, response.body)
        assert response.headers.get("connection") == "close"
        assert response.body.strip(), "the error body should say what was wrong"
        assert conn.at_eof(), "the connection must be closed after a framing error"


def test_malformed_request_after_a_good_one_on_the_same_connection(proxy):
    with raw(proxy) as conn:
        conn.send(b"GET /first HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert conn.read_response().status == 200
        conn.send(b"GET / HTTP/1.1\r\nHost: echo\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        assert conn.read_response().status == 400
        assert conn.at_eof()


def test_malformed_request_pipelined_behind_good_ones_is_answered_in_order(proxy):
    with raw(proxy) as conn:
        conn.send(b"GET /first HTTP/1.1\r\nHost: echo\r\n\r\n" b"GET /second HTTP/1.1\r\nHost: echo\r\n\r\n"
                  b"GET / HTTP/1.1\r\nHost: echo\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
        assert [conn.read_response().status for _ in range(3)] == [200, 200, 400]
        assert conn.at_eof()


def test_declared_body_over_the_limit_is_413(strict):
    with raw(strict) as conn:
        conn.send(b"POST / HTTP/1.1\r\nHost: echo\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000)
        response = conn.read_response()
        assert response.status == 413 and b"1024" in response.body, response
        assert conn.at_eof()


def test_chunked_body_over_the_limit_is_413(strict):
    with raw(strict) as conn:
        conn.send(b"POST / HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.send(b"400\r\n" + b"x" * 1024 + b"\r\n")     # exactly the limit: fine so far
        conn.send(b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n")
        response = conn.read_response()
        assert response.status == 413, response
        assert conn.at_eof()


def test_body_at_the_limit_passes(strict):
    result = strict.curl("echo", "/", data=b"z" * 1024)
    assert result.status == 200 and result.json()["body_bytes"] == 1024


def test_slow_client_gets_408(strict):
    with raw(strict) as conn:
        started = time.monotonic()
        conn.send(b"GET / HTTP/1.1\r\nHost: echo\r\n")   # the head never ends
        response = conn.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408, response
        assert 1.0 <= elapsed < 3.5, elapsed   # --header-timeout 1, checked once a second
        assert conn.at_eof()


def test_slow_client_dribbling_bytes_still_gets_408(strict):
    """Sending a byte now and then must not reset the head deadline (slowloris)."""
    with raw(strict) as conn:
        started = time.monotonic()
        conn.send(b"GET / HTTP/1.1\r\nHost: echo\r\nX-Slow: ")
        while not select.select([conn.sock], [], [], 0.2)[0]:   # until the proxy says something
            assert time.monotonic() - started < 5, "no answer to a head dribbled for 5 s"
            conn.send(b"x")
        response = conn.read_response()
        assert response.status == 408, response
        assert 1.0 <= time.monotonic() - started < 3.5
        assert conn.at_eof()


def test_idle_keep_alive_connection_is_closed(strict):
    with raw(strict) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
        assert conn.read_response().status == 200
        idle_since = time.monotonic()
        assert conn.at_eof()   # blocks until the proxy closes (socket timeout 10 s)
        assert 1.0 <= time.monotonic() - idle_since < 3.0   # --idle-timeout 1, checked once a second


def test_an_active_connection_is_not_idle(strict):
    """Requests back to back for 2.5 s on one connection: past --idle-timeout 1 in total, never idle that long."""
    with raw(strict) as conn:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            conn.send(b"GET /delay/300 HTTP/1.1\r\nHost: echo\r\n\r\n")
            assert conn.read_response().status == 200


def test_a_response_streaming_longer_than_the_idle_timeout_is_not_cut(strict):
    """The client sends nothing while it reads a 16 MiB body slowly for about 3 s: the bytes flowing to it are
    activity.  (The proxy once counted only bytes from the client, and reset such downloads.)"""
    size, piece, pace = 16 * 1024 * 1024, 256 * 1024, 0.05
    with raw(strict) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.send(b"GET /bytes/%d HTTP/1.1\r\nHost: echo\r\n\r\n" % size)
        head = conn.read_response(head_only=True)
        assert head.status == 200
        started, received = time.monotonic(), 0
        while received < size:
            data = conn.rfile.read(min(piece, size - received))
            assert data, f"connection closed after {received} of {size} bytes, {time.monotonic() - started:.1f} s"
            received += len(data)
            time.sleep(pace)   # the slow client under test: about 5 MiB/s
        assert time.monotonic() - started > 2.5, "too fast to span two idle sweeps"



def test_a_request_in_flight_has_no_idle_timeout(strict):
    """--idle-timeout 1, no route timeout: an upstream that answers after 3 s is waited for, and a request body
    paused for as long is not cut either, as in Istio (``stream_idle_timeout: 0s``).  Once the response is
    sent, the connection, idle, is closed at the idle timeout.  (The proxy once answered 504 UT instead.)"""
    with raw(strict) as slow, raw(strict) as paused:
        paused.send(b"POST /upload HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhe")
        started = time.monotonic()
        slow.send(b"GET /delay/3000 HTTP/1.1\r\nHost: echo\r\n\r\n")
        response = slow.read_response()
        assert response.status == 200, (response.status, response.headers, response.body)
        assert time.monotonic() - started >= 3.0
        idle_since = time.monotonic()
        paused.send(b"llo")   # 3 s after the first bytes of the body
        posted = paused.read_response()
        assert posted.status == 200 and json.loads(posted.body)["body_bytes"] == 5, posted.body
        assert slow.at_eof()   # blocks until the proxy closes (socket timeout 10 s)
        assert 0.9 <= time.monotonic() - idle_since < 3.0


def test_a_client_that_reads_nothing_is_cut_at_the_idle_timeout(strict):
    """A response held for a client that takes none of it (its buffers full, the upstream paused) is not a request
    waiting for its upstream: after --idle-timeout 1 without a byte taken, the connection is cut, the request ends."""
    def in_flight():
        return sum(row["active_requests"] for row in strict.admin("/clusters")[cluster_name("echo")]["endpoints"])

    size = 64 * 1024 * 1024
    with raw(strict) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        conn.send(b"GET /bytes/%d HTTP/1.1\r\nHost: echo\r\n\r\n" % size)
        wait_for(lambda: in_flight() == 1, timeout=5, what="the request in flight")
        started = time.monotonic()
        wait_for(lambda: in_flight() == 0, timeout=6, what="the stuck request to be cut")
        assert time.monotonic() - started >= 0.9
        received = 0
        try:
            while data := conn.sock.recv(1 << 20):
                received += len(data)
        except ConnectionResetError:
            pass
        assert received < size, "the whole response came: the connection was not cut"

# -- keep-alive and pipelining -------------------------------------------------------------------------------


def test_keep_alive_reuses_one_upstream_connection(mesh):
    proxy, _, ka = mesh
    cluster = cluster_name("ka")
    lines = curl_many(proxy.outbound_url + "/", 50, host="ka", write_out="%{http_code} %{num_connects}")
    assert lines == ["200 1"] + ["200 0"] * 49, "curl should have used one connection to the proxy"
    curl_many(proxy.outbound_url + "/", 50, host="ka", write_out="%{http_code}")   # a second client connection
    row = endpoint_stats(proxy, cluster, ka)
    assert row["total_requests"] == 100
    assert row["open_connections"] == 1 and row["idle_connections"] == 1, row


def test_pipelined_requests_are_answered_in_order(proxy):
    with raw(proxy) as conn:
        conn.send(b"GET /delay/300 HTTP/1.1\r\nHost: echo\r\n\r\n"
                  b"POST /second HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello"
                  b"GET /third HTTP/1.1\r\nHost: echo\r\n\r\n"
                  b"GET /fourth HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        responses = [conn.read_response() for _ in range(4)]
        paths = [json.loads(response.body)["path"] for response in responses]
        assert paths == ["/delay/300", "/second", "/third", "/fourth"]
        assert json.loads(responses[1].body)["body_bytes"] == 5
        assert conn.at_eof()


# -- WebSocket -------------------------------------------------------------------------------------------------


def test_websocket_upgrade_and_echo(proxy):
    with raw(proxy) as conn:
        response = conn.websocket_handshake("/ws", host="echo")
        assert response.status == 101, response
        assert response.headers["upgrade"].lower() == "websocket"
        conn.send_frame(0x1, b"hello through the mesh")
        assert conn.read_frame() == (True, 0x1, b"hello through the mesh")
        big = bytes(range(256)) * 400   # 100 KiB: a 64-bit length
        conn.send_frame(0x2, big)
        assert conn.read_frame() == (True, 0x2, big)
        conn.send_frame(0x9, b"ping")
        assert conn.read_frame() == (True, 0xA, b"ping")
        conn.send_frame(0x8, (1000).to_bytes(2, "big"))
        fin, opcode, payload = conn.read_frame()
        assert (opcode, payload[:2]) == (0x8, (1000).to_bytes(2, "big"))
        assert conn.at_eof(), "the app closed the WebSocket: the proxy must close the client side"


def test_upgrade_declined_by_the_app_is_an_ordinary_response(proxy):
    with raw(proxy) as conn:
        response = conn.websocket_handshake("/not-ws-path", host="echo")
        assert response.status == 200, response   # the demo app only upgrades /ws
        assert conn.at_eof()
