"""Hostile HTTP/1 input against real sidecars: request smuggling, authorization bypass, upgrades.

Each case asserts what the app received (a :class:`RecordingApp` behind the sidecar records every request
as it was forwarded, and every byte after a protocol switch), not only the status the client got.

Two sidecars over one config, as in a mesh (plaintext between them: the codec is the same over mTLS):

- ``server``: the app's sidecar; its inbound listener forwards to the recording app and enforces two DENY
  AuthorizationPolicies: paths ``/admin*``, and hosts ``secret.local`` (with any port);
- ``client``: another workload's sidecar, whose outbound listener routes host ``target`` to ``server``'s
  inbound port, so a request crosses two codecs and a pooled connection between them.
"""

from __future__ import annotations

import base64
import os

import pytest

from tests.harness import RawConnection, free_port
from tests.integration.test_hostile_http1_support import RecordingApp, send_and_close
from tests.integration.test_identity_support import authorization_policy
from tests.integration.test_proxy_support import service_entry, write_config

SELECTOR = {"app": "target"}
H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture(scope="module")
def recorder():
    app = RecordingApp()
    yield app
    app.close()


@pytest.fixture(scope="module")
def sidecars(proxy_factory, tmp_path_factory, recorder):
    inbound = free_port()
    config = write_config(
        tmp_path_factory.mktemp("hostile-config"),
        service_entry("target", [{"address": "127.0.0.1", "ports": {"http": inbound}}]),
        authorization_policy("no-admin", "default", selector=SELECTOR, action="DENY", rules=[
            {"to": [{"operation": {"paths": ["/admin*"]}}]}]),
        authorization_policy("no-secret", "default", selector=SELECTOR, action="DENY", rules=[
            {"to": [{"operation": {"hosts": ["secret.local", "secret.local:*"]}}]}]),
    )
    server = proxy_factory(config, "target", app_port=recorder.port, inbound_port=inbound, labels=SELECTOR)
    client = proxy_factory(config, "client", labels={"app": "client"})
    return server, client


@pytest.fixture
def app(recorder):
    """The recording app, its records emptied for this test."""
    recorder.clear()
    return recorder


@pytest.fixture
def inbound(sidecars):
    return sidecars[0].inbound_port


def get(target: str = "/", host: bytes = b"target", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target.encode(), host, extra)


def statuses(responses) -> list:
    return [response.status for response in responses]


# -- 1. Connection naming a framing header --------------------------------------------------------------------

SMUGGLED = b"GET /admin/smuggled HTTP/1.1\r\nHost: target\r\n\r\n"


@pytest.mark.parametrize("connection", [
    b"content-length", b"Content-Length", b"keep-alive, content-length", b"content-length, x-other",
])
def test_connection_naming_content_length_keeps_the_body_framed(app, inbound, connection):
    """Issue #10 item 1: the body was forwarded unframed, and the app read it as a second request."""
    request = (b"POST /upload HTTP/1.1\r\nHost: target\r\nConnection: %s\r\nX-Other: o\r\nContent-Length: %d\r\n\r\n%s"
               % (connection, len(SMUGGLED), SMUGGLED))
    assert statuses(send_and_close(inbound, request)) == [200]
    send_and_close(inbound, get("/barrier"))
    requests = app.snapshot()[0]
    assert [r.target for r in requests] == ["/upload", "/barrier"], "the body became a request of its own"
    assert requests[0].body == SMUGGLED
    assert requests[0].header("content-length") == str(len(SMUGGLED))


def test_connection_naming_transfer_encoding_or_host_changes_no_framing(app, inbound):
    chunked = (b"POST /chunked HTTP/1.1\r\nHost: target\r\nConnection: transfer-encoding, host\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED))
    assert statuses(send_and_close(inbound, chunked)) == [200]
    send_and_close(inbound, get("/barrier"))
    requests = app.snapshot()[0]
    assert [r.target for r in requests] == ["/chunked", "/barrier"]
    assert requests[0].body == SMUGGLED and requests[0].header("host") == "target"


def test_smuggling_through_two_sidecars_reaches_no_app_and_no_other_client(app, sidecars):
    """Between two sidecars the unframed body desynchronised their pooled connection: the next client got
    the smuggled request's response."""
    _, client = sidecars
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: target\r\n\r\n"
    request = (b"POST /first HTTP/1.1\r\nHost: target\r\nConnection: content-length\r\nContent-Length: %d\r\n\r\n%s"
               % (len(smuggled), smuggled))
    assert statuses(send_and_close(client.outbound_port, request)) == [200]
    for number in range(3):  # later clients reuse the pooled connection between the sidecars
        later = send_and_close(client.outbound_port, get(f"/later/{number}"))
        assert statuses(later) == [200]
        assert f'"/later/{number}"'.encode() in later[0].body, f"a later client got another response: {later[0]}"
    assert "/smuggled" not in app.targets()


# -- classic smuggling: rejected before anything reaches the app ---------------------------------------------

REJECTED = {
    "cl-te": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\nG", 400),
    "te-cl": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
              b"1\r\nG\r\n0\r\n\r\n", 400),
    "te-chunked-identity": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
                            b"0\r\n\r\n", 400),
    "te-identity": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: identity\r\n\r\nabc", 501),
    "te-gzip-chunked": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                        b"3\r\nabc\r\n0\r\n\r\n", 501),
    "te-space-before-colon": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "te-vertical-tab": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    "te-xchunked": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    "te-twice": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n0\r\n\r\n", 400),
    "te-chunked-comma": (b"POST / HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: chunked,\r\n\r\n0\r\n\r\n", 400),
    "cl-duplicate": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "cl-different": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "cl-list": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    "cl-plus": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: +3\r\n\r\nabc", 400),
    "cl-minus": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: -3\r\n\r\nabc", 400),
    "cl-inner-space": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: 1 2\r\n\r\nabc", 400),
    "cl-overflow": (b"POST / HTTP/1.1\r\nHost: target\r\nContent-Length: 99999999999999999999999\r\n\r\nabc", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: target\n\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\rHost: target\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: target\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    "nul-in-value": (b"GET / HTTP/1.1\r\nHost: target\r\nX-A: a\x00b\r\n\r\n", 400),
    "nul-in-name": (b"GET / HTTP/1.1\r\nHost: target\r\nX\x00A: b\r\n\r\n", 400),
    "control-char-in-value": (b"GET / HTTP/1.1\r\nHost: target\r\nX-A: a\x01b\r\n\r\n", 400),
    "request-line-tab": (b"GET\t/ HTTP/1.1\r\nHost: target\r\n\r\n", 400),
    "request-line-trailing-space": (b"GET / HTTP/1.1 \r\nHost: target\r\n\r\n", 400),
    "space-in-target": (b"GET /a b HTTP/1.1\r\nHost: target\r\n\r\n", 400),
    "space-before-header": (b"GET / HTTP/1.1\r\n Host: target\r\n\r\n", 400),
    "fragment": (b"GET /public#/admin HTTP/1.1\r\nHost: target\r\n\r\n", 400),
    "fragment-absolute-form": (b"GET http://target/public#x HTTP/1.1\r\nHost: target\r\n\r\n", 400),
    "host-list": (get("/", b"a, b"), 400),
    "host-comma": (get("/", b"secret.local,public.local"), 400),
    "host-space": (get("/", b"a b"), 400),
    "host-userinfo": (get("/", b"user@secret.local"), 400),
    "host-bad-char": (get("/", b"secret.local/x"), 400),
    "host-bad-port": (get("/", b"secret.local:99999"), 400),
    "host-port-not-a-number": (get("/", b"secret.local:http"), 400),
    "host-empty-port": (get("/", b"secret.local:"), 400),
    "host-twice": (b"GET / HTTP/1.1\r\nHost: public.local\r\nHost: secret.local\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_hostile_request_is_rejected_and_reaches_no_app(app, inbound, name):
    data, status = REJECTED[name]
    responses = send_and_close(inbound, data)
    assert statuses(responses) == [status], [(r.status, r.body) for r in responses]
    assert responses[0].headers.get("connection") == "close"
    assert responses[0].body.strip(), "the error body should say what was wrong"
    send_and_close(inbound, get("/barrier"))
    assert app.targets() == ["/barrier"], "a rejected request reached the app"


CHUNK_BODY_ERRORS = {
    "chunk-size-overflow": b"FFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n",
    "chunk-bare-lf": b"3\nabc\n0\n\n",
    "chunk-bad-size": b"zz\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(CHUNK_BODY_ERRORS))
def test_malformed_chunked_body_never_completes_a_request_at_the_app(app, inbound, name):
    """The head may already be on its way to the app when the body turns out malformed: the app must then
    see the upstream connection cut, never a complete request."""
    head = b"POST /chunked HTTP/1.1\r\nHost: target\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert statuses(send_and_close(inbound, head + CHUNK_BODY_ERRORS[name])) == [400]
    send_and_close(inbound, get("/barrier"))
    assert app.targets() == ["/barrier"]


# -- what is forwarded: canonical request line, trimmed header values ---------------------------------------------

def test_header_values_reach_the_app_without_trailing_whitespace(app, inbound):
    request = (b"POST /ows HTTP/1.1\r\nHost: target \t\r\nX-Tab: v\t\r\nX-Spaces:   w  \r\nX-Inner: a  b\r\n"
               b"Content-Length: 3 \r\n\r\nabc")
    assert statuses(send_and_close(inbound, request)) == [200]
    (seen,) = app.snapshot()[0]
    raw = dict(seen.headers)
    assert (raw["host"], raw["x-tab"], raw["x-spaces"], raw["x-inner"]) == ("target", "v", "w", "a  b")
    assert raw["content-length"] == "3" and seen.body == b"abc"


def test_extra_spaces_in_the_request_line_reach_the_app_as_one(app, inbound):
    assert statuses(send_and_close(inbound, b"GET  /spaced HTTP/1.1\r\nHost: target\r\n\r\n")) == [200]
    (seen,) = app.snapshot()[0]
    assert (seen.method, seen.target, seen.version) == ("GET", "/spaced", "HTTP/1.1")


# -- authorization bypass by host and path tricks ------------------------------------------------------------

@pytest.mark.parametrize("host", [
    b"secret.local", b"SECRET.Local", b"secret.local ", b"secret.local\t", b"secret.local \t ",
    b"secret.local.", b"secret.local:8080", b"secret.local.:8080", b"secret.local:8080 ",
])
def test_denied_host_is_denied_in_every_spelling(app, inbound, host):
    responses = send_and_close(inbound, get("/", host))
    assert statuses(responses) == [403], responses
    send_and_close(inbound, get("/barrier"))
    assert app.targets() == ["/barrier"]


def test_host_trailing_dot_is_dropped_in_what_the_app_gets(app, inbound):
    assert statuses(send_and_close(inbound, get("/dot", b"public.local.:8080"))) == [200]
    assert app.snapshot()[0][0].header("host") == "public.local:8080"


def test_absolute_form_target_host_is_the_one_authorized_and_forwarded(app, inbound):
    """RFC 9112 section 3.2.2 (and Envoy): the target's host replaces the Host header."""
    denied = send_and_close(inbound, b"GET http://secret.local/x HTTP/1.1\r\nHost: public.local\r\n\r\n")
    assert statuses(denied) == [403]
    allowed = send_and_close(inbound, b"GET http://public.local:8080/y?q=1 HTTP/1.1\r\nHost: secret.local\r\n\r\n")
    assert statuses(allowed) == [200]
    (seen,) = app.snapshot()[0]
    assert (seen.target, seen.header("host")) == ("/y?q=1", "public.local:8080")


@pytest.mark.parametrize("path", ["/admin", "/admin/x", "/%61dmin", "/public/../admin", "/public/%2e%2e/admin",
                                  "/./admin", "/public/%2E%2E/admin/x"])
def test_denied_path_is_denied_in_every_spelling(app, inbound, path):
    assert statuses(send_and_close(inbound, get(path))) == [403]
    send_and_close(inbound, get("/barrier"))
    assert app.targets() == ["/barrier"]


@pytest.mark.parametrize("path", ["//admin", "/Admin", "/public/admin"])
def test_a_path_that_passes_reaches_the_app_as_it_was_matched(app, inbound, path):
    """Paths ``/admin*`` does not match (Istio's default BASE normalization keeps case and merges no
    slashes): the app must get exactly the path that was matched, never one that it would read as /admin."""
    responses = send_and_close(inbound, get(path))
    send_and_close(inbound, get("/barrier"))
    if statuses(responses) == [403]:  # a normalization that merges slashes (mesh.proxy.paths) denies "//admin"
        assert path == "//admin" and app.targets() == ["/barrier"]
    else:
        assert statuses(responses) == [200] and app.targets() == [path, "/barrier"]


# -- 2. upgrades: only WebSocket, authorized; h2c and others as plain requests -------------------------------

def test_h2c_upgrade_is_a_plain_request_and_the_connection_stays_http(app, inbound):
    """Issue #10 item 2: an h2c-capable app switched the connection, and what followed skipped authorization."""
    with RawConnection("127.0.0.1", inbound) as conn:
        conn.send(get("/h2c", extra=H2C))
        response = conn.read_response()
        assert response.status == 200, response
        conn.send(get("/next"))
        assert conn.read_response().status == 200
        conn.send(get("/admin/after-h2c"))
        assert conn.read_response().status == 403
    requests, tunnelled, _ = app.snapshot()
    assert tunnelled == [], "the app switched protocols"
    assert [r.target for r in requests] == ["/h2c", "/next"]
    assert not requests[0].names() & {"upgrade", "http2-settings", "connection"}, requests[0].headers


def test_h2c_preface_after_the_upgrade_is_parsed_as_http(app, inbound):
    """A client that goes on in HTTP/2 after asking for h2c gets an HTTP/1.1 error; the preface never reaches
    the app."""
    responses = send_and_close(inbound, get("/h2c", extra=H2C) + PREFACE)
    assert statuses(responses)[0] == 200 and len(responses) == 2 and responses[1].status in (400, 505)
    requests, tunnelled, unparsable = app.snapshot()
    assert [r.target for r in requests] == ["/h2c"] and tunnelled == [] and unparsable == []


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_h2c_upgrade_with_a_body_keeps_the_body_and_the_next_request(app, inbound, framing):
    body = b"x" * 70 + SMUGGLED
    if framing == "length":
        head = b"POST /h2c-body HTTP/1.1\r\nHost: target\r\n%sContent-Length: %d\r\n\r\n" % (H2C, len(body))
        data = head + body
    else:
        head = b"POST /h2c-body HTTP/1.1\r\nHost: target\r\n%sTransfer-Encoding: chunked\r\n\r\n" % H2C
        data = head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    responses = send_and_close(inbound, data + get("/after"))
    assert statuses(responses) == [200, 200]
    requests, tunnelled, _ = app.snapshot()
    assert [r.target for r in requests] == ["/h2c-body", "/after"] and tunnelled == []
    assert requests[0].body == body


def test_h2c_upgrade_with_a_body_in_pieces(app, inbound):
    """The body arrives after the head, in several writes: the fresh parser frames it as declared."""
    body = b"0123456789" * 10
    with RawConnection("127.0.0.1", inbound) as conn:
        conn.send(b"PUT /pieces HTTP/1.1\r\nHost: target\r\n%sContent-Length: %d\r\n\r\n" % (H2C, len(body)))
        for start in range(0, len(body), 30):
            conn.send(body[start:start + 30])
        assert conn.read_response().status == 200
        conn.send(get("/after"))
        assert conn.read_response().status == 200
    requests = app.snapshot()[0]
    assert [r.target for r in requests] == ["/pieces", "/after"] and requests[0].body == body


def test_many_pipelined_h2c_upgrades_in_one_write(app, inbound):
    """Each declined upgrade gets a fresh parser, without recursion: a thousand in one write are answered."""
    count = 1000
    data = b"".join(get(f"/h2c/{number}", extra=H2C) for number in range(count))
    responses = send_and_close(inbound, data, timeout=60)
    assert statuses(responses) == [200] * count
    assert app.targets() == [f"/h2c/{number}" for number in range(count)] and app.snapshot()[1] == []


@pytest.mark.parametrize("protocol", [b"foo/1", b"h2c, websocket", b"TLS/1.2"])
def test_unknown_upgrade_is_forwarded_as_a_plain_request(app, inbound, protocol):
    responses = send_and_close(inbound, get("/other", extra=b"Connection: upgrade\r\nUpgrade: %s\r\n" % protocol)
                               + get("/after"))
    assert statuses(responses) == [200, 200]
    requests, tunnelled, _ = app.snapshot()
    assert [r.target for r in requests] == ["/other", "/after"] and tunnelled == []
    assert "upgrade" not in requests[0].names()


def test_websocket_upgrade_with_a_body_is_a_plain_request(app, inbound):
    key = base64.b64encode(os.urandom(16))
    data = (b"POST /ws HTTP/1.1\r\nHost: target\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nContent-Length: 5\r\n\r\nhello" % key)
    assert statuses(send_and_close(inbound, data)) == [200]
    requests, tunnelled, _ = app.snapshot()
    assert [(r.target, r.body) for r in requests] == [("/ws", b"hello")] and tunnelled == []


def test_websocket_upgrade_is_forwarded_and_spliced(app, inbound):
    with RawConnection("127.0.0.1", inbound) as conn:
        response = conn.websocket_handshake("/ws", host="target")
        assert response.status == 101, response
        conn.send(b"raw bytes after the switch")
        assert conn.rfile.read(len(b"raw bytes after the switch")) == b"raw bytes after the switch"
    requests, tunnelled, _ = app.snapshot()
    assert [r.target for r in requests] == ["/ws"]
    assert requests[0].header("upgrade") == "websocket" and requests[0].header("connection") == "upgrade"
    assert b"".join(tunnelled) == b"raw bytes after the switch"


def test_websocket_upgrade_to_a_denied_path_is_refused_and_closed(app, inbound):
    with RawConnection("127.0.0.1", inbound) as conn:
        response = conn.websocket_handshake("/admin/ws", host="target")
        assert response.status == 403, response
        assert conn.at_eof(), "after a refused upgrade the connection must close"
    send_and_close(inbound, get("/barrier"))
    assert app.targets() == ["/barrier"] and app.snapshot()[1] == []


def test_websocket_upgrade_to_a_denied_host_is_refused(app, inbound):
    with RawConnection("127.0.0.1", inbound) as conn:
        assert conn.websocket_handshake("/ws", host="secret.local ").status == 403
    send_and_close(inbound, get("/barrier"))
    assert app.targets() == ["/barrier"]


def test_app_switching_protocols_unasked_gets_no_tunnel(app, inbound):
    """A 101 to a request that asked for no upgrade is an upstream error, never a tunnel."""
    with RawConnection("127.0.0.1", inbound) as conn:
        conn.send(get("/switch-anyway"))
        response = conn.read_response()
        assert response.status == 503, response
        assert b"101" in response.body
        conn.send(get("/after"))  # still HTTP: a request, not bytes spliced to the app
        assert conn.read_response().status == 200
    requests, tunnelled, _ = app.snapshot()
    assert tunnelled == [], "the client got a tunnel to the app"
    assert requests[-1].target == "/after"


def test_h2c_through_two_sidecars_is_a_plain_request(app, sidecars):
    _, client = sidecars
    responses = send_and_close(client.outbound_port, get("/h2c-chain", extra=H2C) + get("/after"))
    assert statuses(responses) == [200, 200]
    requests, tunnelled, _ = app.snapshot()
    assert [r.target for r in requests] == ["/h2c-chain", "/after"] and tunnelled == []
