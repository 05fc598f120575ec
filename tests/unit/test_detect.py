"""Protocol detection of captured connections (mesh.proxy.detect): HTTP/1.x request lines, the HTTP/2
preface (h2c with prior knowledge), or TCP."""

import pytest

from mesh.proxy.detect import HTTP, MAX_SNIFF_BYTES, TCP, classify, classify_at_timeout


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /a?b=1 HTTP/1.0\r\n",
    b"GET http://api.example.com/x HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"PROPFIND /dav HTTP/1.1\n",  # bare LF, as llhttp accepts
    b"GET / HTTP/1.2\r\n",  # an HTTP/1.x line; the codec answers 505
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 with prior knowledge: the codec switches to HTTP/2
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00",  # ... and its first SETTINGS frame
])
def test_request_lines_are_http(data):
    assert classify(data) == HTTP


@pytest.mark.parametrize("data", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS ClientHello
    b"*1\r\n$4\r\nPING\r\n",  # Redis RESP
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",  # not quite the HTTP/2 preface
    b"EHLO client.example\r\n",  # SMTP: no target and version
    b"GET key\r\n",  # Redis inline command
    b"hello world\n",
    b"GET  / HTTP/1.1\r\n",  # two spaces
    b"G\x00",
    b"A" * 25,  # longer than any method
])
def test_everything_else_is_tcp(data):
    assert classify(data) == TCP


@pytest.mark.parametrize("data", [b"", b"G", b"GET", b"GET ", b"GET /index", b"GET / ", b"GET / HTTP/1.",
                                  b"GET / HTTP/1.1", b"GET / HTTP/1.1\r",
                                  b"PRI * HTTP/2", b"PRI * HTTP/2.0\r\n\r\nSM"])
def test_short_reads_wait_for_more(data):
    assert classify(data) is None


def test_a_huge_request_target_goes_to_the_codec():
    data = b"GET /" + b"a" * MAX_SNIFF_BYTES
    assert classify(data) == HTTP


@pytest.mark.parametrize("data, kind", [
    (b"", TCP),  # the client waits for the server: MySQL, SMTP
    (b"GET", TCP),
    (b"GET ", HTTP),  # a slow HTTP client
    (b"GET /slow", HTTP),
])
def test_timeout_decisions(data, kind):
    assert classify_at_timeout(data) == kind
