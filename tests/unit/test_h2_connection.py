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
    # the edges of the values' joined scan: first and last value, a lone space or tab, empty values,
    # the separator byte inside a value, a cookie whose joined value ends with a space
    [(b":method", b" GET"), *_REQUEST[1:]], [*_REQUEST[:-1], (b"accept", b"*/* ")], [*_REQUEST, (b"x", b" ")],
    [*_REQUEST, (b"x", b"\t")], [*_REQUEST, (b"x", b""), (b"y", b"")], [*_REQUEST, (b"x", b"a\x01 b")],
    [*_REQUEST, (b"x", b"a \x01b")], [*_REQUEST, (b"x", b"\x01")], [*_REQUEST, (b"cookie", b"a=1"), (b"cookie", b"")],
    [*_REQUEST, (b"cookie", b""), (b"cookie", b"a=1")], [*_REQUEST, (b"cookie", b"a=1"), (b"x", b"a\rb")],
    [(b"cookie", b"a=1"), (b"X", b"1"), *_REQUEST], [*_REQUEST, (b"x", b"a "), (b"y", b"1")],
    [*_REQUEST, (b"x", b"a\t"), (b"y", b"1")], [*_REQUEST, (b"x", b" a"), (b"y", b"1")],
    [*_REQUEST, (b"x", b"\ta"), (b"y", b"1")], [*_REQUEST, (b"x", b"a\x00b"), (b"y", b"1")],
    [*_REQUEST, (b"x", b"a\nb"), (b"y", b"1")], [*_REQUEST, (b"x", b"a\rb"), (b"y", b"1")],
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

    from mesh.proxy.codec.h2_connection import VALUES_CHECKED, _values_pass, received_headers

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
                if _values_pass(block) and not any(name == b"cookie" for name, _ in block):
                    # what the HTTP/2 engine's C callbacks say of such a block: clean
                    clean = _outcome(lambda b, f: received_headers(b, f, VALUES_CHECKED), block, flags)
                    assert clean == theirs, (block, flags)
    assert errors > len(_BLOCKS)  # the corpus does reach h2's errors


def test_received_headers_takes_any_iterable_of_fields():
    """A block given as a generator (h2 types it ``Iterable``) gives what the same list gives, though the
    fast way reads it twice."""
    from h2.utilities import HeaderValidationFlags

    from mesh.proxy.codec.h2_connection import received_headers

    flags = HeaderValidationFlags(False, False, False, False)
    blocks = [*_REQUEST, (b"x", b"1")], [*_REQUEST, (b"cookie", b"a"), (b"cookie", b"b")], [*_REQUEST, (b"x", b" 1")]
    for block in blocks:
        assert (_outcome(lambda b, f: received_headers(iter(b), f), block, flags)
                == _outcome(received_headers, block, flags))
    assert received_headers(iter(_REQUEST), flags) == _REQUEST


def test_names_seen_valid_skip_only_the_rules_they_would_pass_again(monkeypatch):
    """The corpus twice on one cache of names seen valid (the second pass starts with every name the
    first saw valid): h2's result or h2's error each time; ``te``, ``host``, ``cookie`` and pseudo-header
    fields are never cached, a cached name with a bad value still fails, and the cache stops at its bound."""
    from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers

    from mesh.proxy.codec import h2_connection

    names = set()
    monkeypatch.setattr(h2_connection, "_PLAIN_NAMES", names)

    def h2s(block, flags):
        return list(validate_headers(normalize_inbound_headers(block, flags), flags))

    for _ in range(2):
        for block in _BLOCKS:
            for is_client in (False, True):
                for is_trailer, is_response in ((False, False), (False, True), (True, False)):
                    flags = HeaderValidationFlags(is_client, is_trailer, is_response, False)
                    assert _outcome(h2_connection.received_headers, block, flags) == _outcome(h2s, block, flags)
    assert names == {b"accept", b"x", b"y", b"content-type", b"grpc-status"}
    flags = HeaderValidationFlags(False, False, False, False)
    for bad in ((b"x", b"a\r\nb"), (b"x", b" a"), (b"te", b"gzip"), (b"host", b"b.example")):
        assert _outcome(h2_connection.received_headers, [*_REQUEST, bad], flags) == \
            _outcome(h2s, [*_REQUEST, bad], flags)
        assert isinstance(_outcome(h2_connection.received_headers, [*_REQUEST, bad], flags), tuple)
    monkeypatch.setattr(h2_connection, "_PLAIN_NAMES_BOUND", 7)
    block = [*_REQUEST, *((b"n%d" % i, b"v") for i in range(5))]
    assert _outcome(h2_connection.received_headers, block, flags) == _outcome(h2s, block, flags)
    assert len(names) == 7
    assert _outcome(h2_connection.received_headers, [*_REQUEST, (b"N4", b"v")], flags) == \
        _outcome(h2s, [*_REQUEST, (b"N4", b"v")], flags)


def test_h2s_stages_are_the_ones_received_headers_follows():
    """h2 4.x validates in these stages; a new one must be added to received_headers too."""
    from h2.utilities import normalize_inbound_headers, validate_headers

    stages = [n for n in validate_headers.__code__.co_names if n.startswith("_")]
    assert stages == ["_reject_illegal_characters", "_reject_empty_header_names", "_reject_te",
                      "_reject_connection_header", "_reject_pseudo_header_fields", "_check_host_authority_header",
                      "_check_path_header"]
    assert [n for n in normalize_inbound_headers.__code__.co_names if n.startswith("_")] == ["_combine_cookie_fields"]


class _AsSentByMesh(ast.NodeTransformer):
    """h2's ``H2Stream.send_headers`` as MeshH2Stream's fast path must read: no debug line, no copy into
    bytes (``bytes_headers`` is ``headers``), no validation flags (None), ``events`` not kept."""

    def visit_Expr(self, node):
        return None if "logger.debug" in ast.unparse(node) else self.generic_visit(node)

    def visit_Assign(self, node):
        target = ast.unparse(node.targets[0])
        if target == "bytes_headers":
            assert ast.unparse(node.value) == "utf8_encode_headers(headers)"
            return None
        if target == "hdr_validation_flags":
            return None
        if target == "events":
            return ast.Expr(self.visit(node.value))
        return self.generic_visit(node)

    def visit_Name(self, node):
        if node.id == "bytes_headers":
            return ast.Name("headers", node.ctx)
        if node.id == "hdr_validation_flags":
            return ast.Constant(None)
        return node


def test_send_headers_is_h2s_minus_the_bytes_copy():
    """If h2 changes H2Stream.send_headers, this fails: MeshH2Stream's fast path must follow it."""
    from h2.stream import H2Stream

    from mesh.proxy.codec.h2_connection import MeshH2Stream

    theirs = [s for s in (_AsSentByMesh().visit(s) for s in _body(H2Stream.send_headers)) if s is not None]
    guard, *ours = _body(MeshH2Stream.send_headers)
    assert "_sendable_as_is" in ast.unparse(guard)
    assert [ast.dump(s) for s in ours] == [ast.dump(ast.fix_missing_locations(s)) for s in theirs]


def _sent(connection_class, steps):
    """What a client and a server of ``connection_class`` send for each ``(block, end_stream)`` in turn
    (request, then response blocks), with pure-Python HPACK, and the stream's authority and request method."""
    from h2.config import H2Configuration

    client, server = (connection_class(config=H2Configuration(client_side=side, header_encoding=None,
                                                              normalize_outbound_headers=False,
                                                              validate_outbound_headers=False))
                      for side in (True, False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    out = []
    for index, (block, end_stream) in enumerate(steps):
        side, peer = (client, server) if index == 0 else (server, client)
        try:
            side.send_headers(1, block() if callable(block) else block, end_stream=end_stream)
            data = side.data_to_send()
            out.append(data)
            stream = side.streams[1]
            out.append((stream._authority, stream.request_method))
            out.append([type(e) for e in peer.receive_data(data)])
        except Exception as exc:  # the type and message are compared
            out.append((type(exc), str(exc)))
            break
    return out


def test_send_headers_sends_what_h2_sends():
    """Blocks of bytes pairs (the fast path) and everything else (h2's path: str, triples, generators),
    informational responses and trailers: the same bytes on the wire, and the same errors, as h2's."""
    from hpack import HeaderTuple, NeverIndexedHeaderTuple

    from mesh.proxy.codec.h2_connection import MeshH2Connection

    response = [(b":status", b"200"), (b"content-type", b"text/plain")]
    trailers = [(b"grpc-status", b"0")]
    cases = [
        [(_REQUEST, False), (response, False), (trailers, True)],
        [(_REQUEST, True), ([(b":status", b"100")], False), (response, True)],
        [(_REQUEST, True), ([(b":status", b"103"), (b"link", b"</a>")], False), (response, False), (trailers, True)],
        [([HeaderTuple(*h) for h in _REQUEST] + [NeverIndexedHeaderTuple(b"authorization", b"x")], True),
         ([*response, NeverIndexedHeaderTuple(b"set-cookie", b"a=1")], False), ([HeaderTuple(*trailers[0])], True)],
        [([(n.decode(), v.decode()) for n, v in _REQUEST], True), ([(":status", "200"), (b"x", "y")], False),
         ([("grpc-status", b"0")], True)],
        [([*_REQUEST, (b"authorization", b"x", True)], True), ([*response, (b"x", b"y", True)], True)],
        [(lambda: iter(_REQUEST), True), (lambda: (h for h in response), False), (lambda: iter(trailers), True)],
        [(_REQUEST, True), (response, False), (trailers, False)],  # trailers without END_STREAM: h2's error
        [(_REQUEST, True), ([(b":status", b"100")], True)],  # END_STREAM on 1xx: h2's error
        [(_REQUEST, True), (response, True), (trailers, True)],  # headers on a closed stream: h2's error
        [([(b":method", b"GET")], True)],  # a request the peer refuses
    ]
    for steps in cases:
        theirs = _sent(H2Connection, steps)
        assert _sent(MeshH2Connection, steps) == theirs, steps


def test_the_fast_path_is_taken_only_for_blocks_h2_would_send_unchanged():
    from h2.config import H2Configuration

    from mesh.proxy.codec.h2_connection import _sendable_as_is

    config = H2Configuration(normalize_outbound_headers=False, validate_outbound_headers=False)
    assert _sendable_as_is(list(_REQUEST), config)
    assert not _sendable_as_is(tuple(_REQUEST), config)
    assert not _sendable_as_is([*_REQUEST, (b"x", "y")], config)
    assert not _sendable_as_is([*_REQUEST, (b"x", b"y", True)], config)
    assert not _sendable_as_is([*_REQUEST, (bytearray(b"x"), b"y")], config)
    assert not _sendable_as_is(list(_REQUEST), H2Configuration(validate_outbound_headers=False))
    assert not _sendable_as_is(list(_REQUEST), H2Configuration(normalize_outbound_headers=False))
    assert not _sendable_as_is(list(_REQUEST), H2Configuration(normalize_outbound_headers=False,
                                                               validate_outbound_headers=False,
                                                               logger=OutputLogger(io.StringIO())))
