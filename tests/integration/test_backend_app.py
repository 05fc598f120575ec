"""The demo app (mesh.demo.app) is a real HTTP/1.1 server: proven over real sockets with curl and raw bytes."""

from __future__ import annotations

import hashlib
import os
import select
import time

import pytest

from tests.harness import RawConnection, curl, pattern_sha256

MiB = 1024 * 1024
#: Peak RSS growth allowed while 100 MiB stream through the app: it must not buffer bodies.
RSS_GROWTH_LIMIT_KIB = 32 * 1024


@pytest.fixture(scope="module")
def backend(backend_factory):
    return backend_factory("user-service")


@pytest.fixture(scope="module")
def big_backend(backend_factory):
    """A backend of its own for the memory tests, so its peak RSS reflects only them."""
    return backend_factory("big-bodies")


def test_echo_describes_the_request(backend):
    result = curl(f"{backend.url}/some/path?q=1", headers={"X-Test": "yes"})
    assert result.status == 200, result
    assert result.headers["x-demo-service"] == "user-service"
    doc = result.json()
    assert doc["service"] == "user-service"
    assert (doc["method"], doc["path"], doc["version"]) == ("GET", "/some/path?q=1", "1.1")
    assert doc["headers"]["x-test"] == "yes"
    assert (doc["body_bytes"], doc["body_sha256"]) == (0, hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_body_is_counted_and_hashed(backend, framing):
    body = os.urandom(300_000)
    headers = {"Transfer-Encoding": "chunked"} if framing == "chunked" else {}
    result = curl(f"{backend.url}/upload", method="PUT", data=body, headers=headers)
    doc = result.json()
    assert doc["method"] == "PUT"
    assert (doc["body_bytes"], doc["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize("code", [201, 204, 418, 503])
def test_status_path_sets_the_status(backend, code):
    result = curl(f"{backend.url}/status/{code}")
    assert result.status == code
    assert (result.body == b"") == (code == 204)


def test_flaky_fails_n_times_per_request_id(backend):
    statuses = [curl(f"{backend.url}/flaky/2", headers={"x-request-id": "flaky-a"}).status for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert curl(f"{backend.url}/flaky/2", headers={"x-request-id": "flaky-b"}).status == 503
    assert curl(f"{backend.url}/flaky/2").status == 400  # no x-request-id: the error says to send one


def test_delay_does_not_block_other_connections(backend):
    with RawConnection(backend.address, backend.port) as slow:
        started = time.monotonic()
        slow.send(b"GET /delay/1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        fast = curl(f"{backend.url}/fast")
        assert fast.status == 200 and fast.info["time_total"] < 1.0, fast
        assert select.select([slow.sock], [], [], 0)[0] == [], "the delayed response came too early"
        assert slow.read_response().status == 200
        assert time.monotonic() - started >= 1.5


@pytest.mark.parametrize("query", ["", "?chunked=1"])
def test_bytes_streams_the_pattern(backend, query):
    size = 1_000_003
    result = curl(f"{backend.url}/bytes/{size}{query}")
    assert result.status == 200
    assert hashlib.sha256(result.body).hexdigest() == pattern_sha256(size)
    if query:
        assert result.headers["transfer-encoding"] == "chunked"
    else:
        assert result.headers["content-length"] == str(size)


def test_keep_alive_and_pipelining_answer_in_order(backend):
    with RawConnection(backend.address, backend.port) as conn:
        conn.send(b"GET /delay/100 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /bytes/10?chunked=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second, third = conn.read_response(), conn.read_response(), conn.read_response()
        assert first.status == 200 and b"/delay/100" in first.body
        assert second.status == 200 and b'"body_bytes": 3' in second.body
        assert third.body == b"0123456789"
        conn.send(b"GET /still-open HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.read_response().status == 200


def test_http10_without_keep_alive_closes(backend):
    with RawConnection(backend.address, backend.port) as conn:
        conn.send(b"GET /old HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200 and response.headers["connection"] == "close"
        assert conn.at_eof()


def test_malformed_request_gets_400_and_close(backend):
    with RawConnection(backend.address, backend.port) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        assert conn.read_response().status == 400
        assert conn.at_eof()


def test_websocket_echo(backend):
    with RawConnection(backend.address, backend.port) as conn:
        assert conn.websocket_handshake("/ws").status == 101
        conn.send_frame(0x1, b"hello mesh")
        assert conn.read_frame() == (True, 0x1, b"hello mesh")
        big = os.urandom(70_000)
        conn.send_frame(0x2, big)
        assert conn.read_frame() == (True, 0x2, big)
        conn.send_frame(0x9, b"ping")
        assert conn.read_frame() == (True, 0xA, b"ping")
        conn.send_frame(0x8, (1000).to_bytes(2, "big"))
        assert conn.read_frame() == (True, 0x8, (1000).to_bytes(2, "big"))
        assert conn.at_eof()


def test_websocket_path_without_upgrade_is_400(backend):
    assert curl(f"{backend.url}/ws").status == 400


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_100_mib_upload_streams_with_flat_memory(big_backend, tmp_path, framing):
    size = 100 * MiB
    upload = tmp_path / "zeros"
    with upload.open("wb") as sparse:
        sparse.truncate(size)  # no disk blocks: reads as zeros
    headers = {"Transfer-Encoding": "chunked"} if framing == "chunked" else {}
    big_backend.reset_peak_rss()
    rss_before = big_backend.status_kib("VmRSS")
    result = curl(f"{big_backend.url}/upload", method="POST", headers=headers, timeout=60, extra_args=["-T", upload])
    doc = result.json()
    zeros = hashlib.sha256()
    for _ in range(size // MiB):
        zeros.update(bytes(MiB))
    assert (doc["body_bytes"], doc["body_sha256"]) == (size, zeros.hexdigest())
    growth = big_backend.status_kib("VmHWM") - rss_before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"peak RSS grew by {growth} KiB: the app buffers request bodies"


def test_100_mib_download_honours_backpressure(big_backend):
    size = 100 * MiB
    big_backend.reset_peak_rss()
    rss_before = big_backend.status_kib("VmRSS")
    result = curl(f"{big_backend.url}/bytes/{size}", output="/dev/null", timeout=60)
    assert (result.status, result.info["size_download"]) == (200, size)
    growth = big_backend.status_kib("VmHWM") - rss_before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"peak RSS grew by {growth} KiB: the app ignores backpressure"
