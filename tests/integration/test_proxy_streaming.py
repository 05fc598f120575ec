"""Bodies stream through the sidecar with backpressure: 1 GiB each way with bounded memory, intact (sha256),
chunked and Content-Length framing, ``Expect: 100-continue``.

Memory is the proxy's peak RSS (VmHWM in /proc/PID/status, reset before each transfer).  The proxy holds at most
``--retry-buffer`` (1 MiB) of a request body for replays; everything else must flow, so the peak stays far
below the body size.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import subprocess
import time

import pytest

from mesh.demo.app import iter_pattern
from tests.harness import RawConnection, pattern_sha256, wait_for
from tests.integration.test_proxy_support import endpoint, service_entry, write_config

GiB = 1 << 30
MiB = 1 << 20
#: The proxy's peak RSS while a body of any size streams through it.
RSS_LIMIT_KIB = 150 * 1024


@pytest.fixture(scope="module")
def sink():
    """A socket that is listened on and never accepted: connections complete, nobody reads."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()
    sock.close()


@pytest.fixture(scope="module")
def proxy(backend_factory, proxy_factory, tmp_path_factory, sink):
    big = backend_factory("big")
    config = write_config(tmp_path_factory.mktemp("streaming-config"),
                          service_entry("big", [endpoint(big)]),
                          service_entry("sink", [endpoint(sink)]))
    return proxy_factory(config, "client")


def _peak_rss_mib(proxy) -> float:
    return proxy.status_kib("VmHWM") / 1024


def test_download_1_gib(proxy):
    expected = pattern_sha256(GiB)
    proxy.reset_peak_rss()
    curl = subprocess.Popen(["curl", "-sS", "--max-time", "120", "-H", "Host: big", "-o", "-",
                             proxy.outbound_url + f"/bytes/{GiB}"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    digest, size = hashlib.sha256(), 0
    while chunk := curl.stdout.read(MiB):
        digest.update(chunk)
        size += len(chunk)
    assert curl.wait() == 0
    assert size == GiB and digest.hexdigest() == expected
    assert proxy.status_kib("VmHWM") < RSS_LIMIT_KIB, f"peak RSS {_peak_rss_mib(proxy):.0f} MiB"


def _upload(proxy, size: int, content_length: bool) -> tuple[dict, str]:
    """PUT ``size`` pattern bytes with ``curl -T -`` (chunked, or with a Content-Length); return the echo
    document and curl's verbose log."""
    argv = ["curl", "-sS", "-v", "--max-time", "120", "-H", "Host: big", "-T", "-"]
    if content_length:   # a stated length, and no chunked framing
        argv += ["-H", f"Content-Length: {size}", "-H", "Transfer-Encoding:"]
    argv.append(proxy.outbound_url + "/upload")
    curl = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for chunk in iter_pattern(size):
        curl.stdin.write(chunk)
    curl.stdin.close()
    body, log = curl.stdout.read(), curl.stderr.read().decode("latin-1")
    assert curl.wait() == 0, log[-2000:]
    return json.loads(body), log


def test_upload_1_gib_chunked_with_100_continue(proxy):
    expected = pattern_sha256(GiB)
    proxy.reset_peak_rss()
    started = time.monotonic()
    doc, log = _upload(proxy, GiB, content_length=False)
    assert "> Transfer-Encoding: chunked" in log and "> Expect: 100-continue" in log
    assert "< HTTP/1.1 100 Continue" in log, "the proxy should answer Expect: 100-continue itself"
    assert doc["headers"].get("transfer-encoding") == "chunked"
    assert (doc["body_bytes"], doc["body_sha256"]) == (GiB, expected)
    assert proxy.status_kib("VmHWM") < RSS_LIMIT_KIB, f"peak RSS {_peak_rss_mib(proxy):.0f} MiB"
    assert time.monotonic() - started < 60


def test_upload_with_content_length(proxy):
    size = 256 * MiB + 7
    proxy.reset_peak_rss()
    doc, log = _upload(proxy, size, content_length=True)
    assert f"> Content-Length: {size}" in log and "Transfer-Encoding" not in log
    assert "< HTTP/1.1 100 Continue" in log
    assert doc["headers"]["content-length"] == str(size)
    assert (doc["body_bytes"], doc["body_sha256"]) == (size, pattern_sha256(size))
    assert proxy.status_kib("VmHWM") < RSS_LIMIT_KIB, f"peak RSS {_peak_rss_mib(proxy):.0f} MiB"


def test_chunked_download_is_rechunked_intact(proxy):
    size = 64 * MiB + 3
    with RawConnection("127.0.0.1", proxy.outbound_port) as conn:
        conn.send(f"GET /bytes/{size}?chunked=1 HTTP/1.1\r\nHost: big\r\n\r\n".encode())
        response = conn.read_response()
        assert response.headers.get("transfer-encoding") == "chunked"
        assert len(response.body) == size and hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)
        conn.send(b"GET / HTTP/1.1\r\nHost: big\r\n\r\n")   # the connection is still usable
        assert conn.read_response().status == 200


def test_expect_100_continue_by_hand(proxy):
    with RawConnection("127.0.0.1", proxy.outbound_port) as conn:
        conn.send(b"POST /form HTTP/1.1\r\nHost: big\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        interim = conn.read_response()
        assert interim.status == 100, interim
        conn.send(b"hello world")
        final = conn.read_response()
        assert final.status == 200
        assert b'"body_bytes": 11' in final.body
        assert b"expect" not in final.body.lower(), "Expect is hop-to-hop here: the proxy answered it"


def test_expect_100_continue_refused_before_the_body(proxy):
    """No route: the client gets the 404 instead of 100 Continue, and never has to send the body."""
    with RawConnection("127.0.0.1", proxy.outbound_port) as conn:
        conn.send(b"PUT /x HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
        response = conn.read_response()
        assert response.status == 404 and response.headers.get("x-mesh-flags") == "NR"
        assert response.headers.get("connection") == "close"
        assert conn.at_eof()


def test_slow_reader_backpressure(proxy):
    """A client that stops reading: the proxy must stop reading the upstream, not buffer the body."""
    size = 256 * MiB
    proxy.reset_peak_rss()
    with RawConnection("127.0.0.1", proxy.outbound_port, timeout=30) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        conn.send(f"GET /bytes/{size} HTTP/1.1\r\nHost: big\r\n\r\n".encode())
        wait_for(lambda: select.select([conn.sock], [], [], 0)[0], 5, what="the response to start")
        # Stalled for 1.5 s: unthrottled, the app sends 256 MiB to the proxy in well under that.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert proxy.status_kib("VmRSS") < RSS_LIMIT_KIB, "the proxy buffers what the client does not read"
            time.sleep(0.05)   # sampling the RSS of a stalled transfer, not waiting for an event
        response = conn.read_response()
        assert len(response.body) == size and hashlib.sha256(response.body).hexdigest() == pattern_sha256(size)
    assert proxy.status_kib("VmHWM") < RSS_LIMIT_KIB


def test_slow_upstream_backpressure(proxy):
    """An upstream that never reads: the proxy must stop reading the client's upload."""
    proxy.reset_peak_rss()
    with RawConnection("127.0.0.1", proxy.outbound_port) as conn:
        conn.send(b"PUT /upload HTTP/1.1\r\nHost: sink\r\nContent-Length: %d\r\n\r\n" % GiB)
        conn.sock.settimeout(2)
        block, sent = b"u" * MiB, 0
        with pytest.raises((TimeoutError, socket.timeout)):
            while sent < GiB:
                sent += conn.sock.send(block)
        assert sent < 32 * MiB, f"{sent / MiB:.0f} MiB accepted by a proxy whose upstream reads nothing"
        assert proxy.status_kib("VmHWM") < RSS_LIMIT_KIB, f"peak RSS {_peak_rss_mib(proxy):.0f} MiB"
