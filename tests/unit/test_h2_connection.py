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
