"""A bounded fuzz run of the sidecar's HTTP/1 front end (hypothesis), against a real proxy process.

Hypothesis builds pipelines of one to three requests from parts that matter for framing and authorization
(methods, targets, Host, Content-Length, Transfer-Encoding, Connection, Upgrade and Expect values, bodies
that hide a request) and then mutates their bytes (insert, replace or delete CR, LF, NUL, VT, SP, HTAB,
comma, colon, digits). Each input goes to the inbound listener in front of a :class:`RecordingApp`, the
client half-closes, and reads every response until the proxy closes. What must hold for every input:

- every response is well-formed HTTP with a status from :data:`EXPECTED`, and every 200 comes from the app;
- a response from the app never answers an earlier input's request (no response reaches another client);
- the app has never received more requests than the proxy sent it (the proxy's own try counter on the
  app's endpoint): no body, no byte after a request is ever read by the app as a request of its own;
- what the app got is clean: no Upgrade but WebSocket, no HTTP2-Settings, no trailing whitespace in a
  value, one Host without space, tab, comma or userinfo; and nothing it could not parse;
- the proxy never logs a traceback (checked after each test).

CI runs :data:`CI_EXAMPLES` inputs, derandomized (the same each run), in well under 20 s. A longer,
random run (``--timeout=0`` lifts the per-test timeout; the failing input, if any, is printed shrunk)::

    HTTP1_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/integration/test_fuzz_http1.py -q --timeout=0
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import free_port
from tests.integration.test_hostile_http1_support import RecordingApp, send_and_close
from tests.integration.test_proxy_support import write_config

CI_EXAMPLES = 600
EXAMPLES = int(os.environ.get("HTTP1_FUZZ_EXAMPLES", CI_EXAMPLES))

#: Statuses a client may get: the proxy's errors, 100 (Expect), and the app's 200 and 101 (WebSocket).
EXPECTED = {100, 101, 200, 400, 405, 413, 417, 431, 501, 505}

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: target\r\n\r\n"

METHODS = [b"GET", b"GET", b"POST", b"PUT", b"OPTIONS", b"CONNECT", b"PRI", b"get", b"G\x00T"]
TARGETS = [b"/", b"/a?b=1", b"/admin", b"/%2e%2e/x", b"//x", b"*", b"http://target/x", b"http://a@b:1/x",
           b"/x#f", b"/a b", b"/\xff", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.1 "]
HOSTS = [b"target", b"target", b"target \t", b"secret.local.", b"a, b", b"a b", b"[::1]:80", b"h:99999", b"",
         b"TARGET:8080", None]
BODIES = [b"", b"hello", SMUGGLED, b"x" * 30 + SMUGGLED]
#: How the body is framed: Content-Length as a format for its length, and/or a Transfer-Encoding value.
LENGTHS = [b"%d", b"%d", b" %d\t", b"+%d", b"%d, %d", b"0", b"99999999999999999999", None]
ENCODINGS = [b"chunked", b"chunked", b"Chunked", b"chunked, identity", b"gzip, chunked", b"identity", None]
HEADERS = [
    b"Connection: close", b"Connection: keep-alive", b"Connection: content-length", b"Connection: upgrade",
    b"Connection: transfer-encoding, host", b"Connection: Upgrade, HTTP2-Settings", b"Connection: x-a, content-length",
    b"Upgrade: h2c", b"Upgrade: websocket", b"Upgrade: foo", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    b"Expect: 100-continue", b"Expect: nope", b"X-A: v \t", b"X-A: a\x00b", b"Transfer-Encoding: chunked",
    b"Content-Length: 5",
]
MUTATION_BYTES = [b"\r", b"\n", b"\r\n", b"\x00", b"\x0b", b" ", b"\t", b",", b":", b"0", b"9", b"a"]


@st.composite
def requests(draw, fuzz_id: bytes) -> bytes:
    """One request: a request line, Host, the fuzz id, framing and other headers in any order, a body."""
    line_end = draw(st.sampled_from([b"\r\n"] * 9 + [b"\n"]))
    line = b"%s %s %s" % (draw(st.sampled_from(METHODS)), draw(st.sampled_from(TARGETS)),
                          draw(st.sampled_from(VERSIONS)))
    headers = [b"X-Fuzz-Id: " + fuzz_id]
    host = draw(st.sampled_from(HOSTS))
    if host is not None:
        headers.append(b"Host: " + host)
    body = draw(st.sampled_from(BODIES))
    length, encoding = draw(st.sampled_from(LENGTHS)), draw(st.sampled_from(ENCODINGS))
    if length is not None:
        headers.append(b"Content-Length: " + (length % ((len(body),) * length.count(b"%d"))))
    if encoding is not None:
        headers.append(b"Transfer-Encoding: " + encoding)
        body = (b"%x%s\r\n%s\r\n" % (len(body), draw(st.sampled_from([b"", b";e=1"])), body) if body else b"")
        body += b"0\r\n\r\n"
    headers += draw(st.lists(st.sampled_from(HEADERS), max_size=3))
    headers = draw(st.permutations(headers))
    return line_end.join([line, *headers]) + line_end + line_end + body


@st.composite
def inputs(draw) -> tuple:
    """``(fuzz id, bytes)``: one to three requests, then up to four byte mutations."""
    fuzz_id = uuid.uuid4().hex.encode()
    data = bytearray(b"".join(draw(st.lists(requests(fuzz_id), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data)))
        piece = draw(st.sampled_from(MUTATION_BYTES))
        operation = draw(st.sampled_from(["insert", "replace", "delete"]))
        if operation == "insert":
            data[position:position] = piece
        elif operation == "replace":
            data[position:position + len(piece)] = piece
        else:
            del data[position:position + 1]
    return fuzz_id, bytes(data)


class _Ids(set):
    """The fuzz ids sent so far (a set that prints short in hypothesis's report)."""

    def __repr__(self):
        return f"<{len(self)} fuzz ids>"


@pytest.fixture(scope="module")
def target(proxy_factory, tmp_path_factory):
    """``(proxy, app, ids)``: the sidecar, its recording app, and the fuzz ids of the inputs sent so far."""
    app = RecordingApp()
    proxy = proxy_factory(write_config(tmp_path_factory.mktemp("fuzz-config")), "target", app_port=app.port,
                          inbound_port=free_port())
    yield proxy, app, _Ids()
    app.close()


def sent_to_app(proxy, app) -> int:
    """Requests the proxy has sent to the app's endpoint (its try counter), from the admin page."""
    rows = [row for name, cluster in proxy.admin("/clusters").items() if name.startswith("inbound|")
            for row in cluster["endpoints"] if row["address"] == f"127.0.0.1:{app.port}"]
    assert rows, f"no inbound endpoint 127.0.0.1:{app.port} in /clusters"
    return sum(row["total_requests"] for row in rows)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == CI_EXAMPLES, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=inputs())
def test_http1_front_end_survives_hostile_bytes(target, case):
    proxy, app, earlier_ids = target
    fuzz_id, data = case
    already = len(app.snapshot()[0])
    for response in send_and_close(proxy.inbound_port, data, timeout=5):
        assert response.status in EXPECTED, (response.status, response.body[:200])
        if response.status == 200:
            assert response.headers.get("x-recorded-by") == "app", response
            echoed = dict(json.loads(response.body)["headers"]).get("x-fuzz-id", "").strip().encode()
            assert echoed not in earlier_ids, "a response to an earlier client's request"
    earlier_ids.add(fuzz_id)
    requests, _, unparsable = app.snapshot()  # read first: the proxy's counter only grows
    assert len(requests) <= sent_to_app(proxy, app), "the app read more requests than the proxy sent it"
    assert unparsable == [], "the app got bytes it could not parse as HTTP/1.1"
    for request in requests[already:]:
        assert_forwarded_cleanly(request)


def assert_forwarded_cleanly(request) -> None:
    """What the proxy may forward: no upgrade but WebSocket, no h2c settings, values without trailing
    whitespace, one valid Host."""
    assert request.header("upgrade") in (None, "websocket"), request
    assert "http2-settings" not in request.names(), request
    assert all(value == value.rstrip(" \t") for _, value in request.headers), request
    host = request.header("host") or ""
    assert not set(host) & set(" ,\t@") and request.header("host") is not None, request


def test_the_app_got_no_request_the_proxy_did_not_count(target):
    proxy, app, _ = target
    assert len(app.snapshot()[0]) <= sent_to_app(proxy, app)
