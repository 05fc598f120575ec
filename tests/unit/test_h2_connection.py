"""MeshH2Connection._receive_frame is h2's, minus the trace line's repr (for the installed h2)."""

import ast
import inspect
import io
import textwrap

from h2.config import H2Configuration, OutputLogger
from h2.connection import H2Connection

from mesh.proxy.codec.h2_connection import MeshH2Connection


def _body(function) -> list:
    """The statements of ``function``, without its docstring."""
    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body


def test_receive_frame_is_h2s_minus_the_trace_line():
    """If h2 changes its _receive_frame, this fails: the override must follow it."""
    theirs = [s for s in _body(H2Connection._receive_frame) if not isinstance(s, ast.AnnAssign)]
    trace, *theirs = theirs
    assert "logger.trace" in ast.unparse(trace)
    guard, *ours = _body(MeshH2Connection._receive_frame)
    assert "DummyLogger" in ast.unparse(guard)
    assert [ast.dump(s) for s in ours] == [ast.dump(s) for s in theirs]


def test_a_real_logger_still_gets_every_frame():
    """With a logger that writes, h2's own method formats each received frame."""
    out = io.StringIO()
    client = MeshH2Connection(config=H2Configuration(client_side=True, logger=OutputLogger(out, trace_level=True)))
    server = H2Connection(config=H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    assert "Received frame: SettingsFrame" in out.getvalue()


_REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.example"), (b":path", b"/x"),
            (b"accept", b"*/*")]
_RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]
_BLOCKS = [
    _REQUEST, _RESPONSE, [(b"grpc-status", b"0")], [],
    [*_REQUEST, (b"cookie", b"a=1"), (b"x", b""), (b"cookie", b"b=2 ")],
    [(b"cookie", b"a=1"), *_REQUEST], [*_REQUEST, (b"cookie", b" a")], [*_REQUEST, (b"Cookie", b"a")],
    [*_REQUEST, (b"X-Up", b"1")], [*_REQUEST, (b"x y", b"1")], [*_REQUEST, (b"x\x7f", b"1")],
    [*_REQUEST, (b"x\xff", b"1")], [*_REQUEST, (b"x:y", b"1")], [*_REQUEST, (b"", b"1")], [*_REQUEST, (b":", b"1")],
    [*_REQUEST, (b"x", b"a\r\nb: c")], [*_REQUEST, (b"x", b"a\nb")], [*_REQUEST, (b"x", b"a\x00")],
    [*_REQUEST, (b"x", b" a")], [*_REQUEST, (b"x", b"a\t")], [*_REQUEST, (b"x", b"a b")],
    [*_REQUEST, (b"te", b"trailers")], [*_REQUEST, (b"te", b"TRAILERS")], [*_REQUEST, (b"te", b"gzip")],
    *([*_REQUEST, (name, b"x")] for name in (b"connection", b"keep-alive", b"proxy-connection",
                                              b"transfer-encoding", b"upgrade")),
    [*_REQUEST, (b":method", b"POST")], [(b"accept", b"*/*"), *_REQUEST], [*_REQUEST, (b":custom", b"1")],
    [*_REQUEST[1:]], [_REQUEST[0], *_REQUEST[2:]], [*_REQUEST[:3], *_REQUEST[4:]], [*_REQUEST[:2], *_REQUEST[3:]],
    [*_REQUEST[:3], (b":path", b"")], [*_REQUEST, (b"host", b"a.example")], [*_REQUEST, (b"host", b"b.example")],
    [*_REQUEST[:2], *_REQUEST[3:], (b"host", b"a.example")], [*_REQUEST[:2], *_REQUEST[3:], (b"host", b"a"),
                                                             (b"host", b"a")],
    [*_REQUEST, (b":status", b"200")], [*_REQUEST, (b":protocol", b"websocket")],
    [(b":method", b"CONNECT"), (b":authority", b"a:443")], [(b":method", b"CONNECT"), (b":authority", b"a:443"),
                                                            (b":path", b"/")],
    [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/"),
     (b":authority", b"a")],
    [*_RESPONSE, (b":path", b"/")], [(b"content-type", b"x")], [(b":status", b"200"), (b":status", b"204")],
]


def _outcome(validate, block, flags):
    from hpack import HeaderTuple

    try:
        return [(type(h), tuple(h)) for h in validate([HeaderTuple(*h) for h in block], flags)]
    except Exception as exc:  # the type and message are compared
        return type(exc), str(exc)


def test_received_headers_is_h2s_normalization_and_validation():
    """Every block, as a request, a response and trailers, on both sides: h2's result or h2's error."""
    from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers

    from mesh.proxy.codec.h2_connection import received_headers

    def h2s(block, flags):
        return validate_headers(normalize_inbound_headers(block, flags), flags)

    errors = 0
    for block in _BLOCKS:
        for is_client in (False, True):
            for is_trailer, is_response in ((False, False), (False, True), (True, False)):
                flags = HeaderValidationFlags(is_client, is_trailer, is_response, False)
                theirs = _outcome(lambda b, f: list(h2s(b, f)), block, flags)
                assert _outcome(received_headers, block, flags) == theirs, (block, flags)
                errors += isinstance(theirs, tuple)
    assert errors > len(_BLOCKS)  # the corpus does reach h2's errors


def test_h2s_stages_are_the_ones_received_headers_follows():
    """h2 4.x validates in these stages; a new one must be added to received_headers too."""
    from h2.utilities import normalize_inbound_headers, validate_headers

    stages = [n for n in validate_headers.__code__.co_names if n.startswith("_")]
    assert stages == ["_reject_illegal_characters", "_reject_empty_header_names", "_reject_te",
                      "_reject_connection_header", "_reject_pseudo_header_fields", "_check_host_authority_header",
                      "_check_path_header"]
    assert [n for n in normalize_inbound_headers.__code__.co_names if n.startswith("_")] == ["_combine_cookie_fields"]
