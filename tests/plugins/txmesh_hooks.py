"""A third-party plugin that records the response-header and connection hooks, for
tests/integration/test_connection_hooks.py and tests/e2e/test_netns_passthrough.py.

Loaded as a third-party plugin is: through a ``mesh.plugins`` entry point of an installed distribution
(the test writes ``txmesh_hooks-1.0.dist-info`` and puts it and this directory on the proxy's
``PYTHONPATH``).  ``mesh_response_headers`` adds ``x-hook: STATUS`` and removes ``content-type`` on
responses to requests that carry ``x-hook-test``; the connection hooks append one JSON line per call
(every attribute of :class:`mesh.api.ConnectionView`) to the file named by ``TXMESH_HOOKS_LOG``.
"""

from __future__ import annotations

import json
import os

from mesh import hookimpl

VIEW = ("direction", "protocol", "source_address", "destination", "upstream", "peer", "start", "duration",
        "bytes_received", "bytes_sent", "requests")


@hookimpl
def mesh_response_headers(ctx, status, headers):
    if "x-hook-test" not in ctx.headers:
        return None
    return [(b"x-hook", b"%d" % status), (b"content-type", None)]


def _record(event: str, connection) -> None:
    line = {"event": event, "id": id(connection), **{name: getattr(connection, name) for name in VIEW}}
    with open(os.environ["TXMESH_HOOKS_LOG"], "a") as log:
        log.write(json.dumps(line) + "\n")


@hookimpl
def mesh_connection_open(connection):
    _record("open", connection)


@hookimpl
def mesh_connection_complete(connection):
    _record("complete", connection)
