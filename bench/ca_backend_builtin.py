"""The built-in CA of mesh-control (``--ca builtin``, the default): nothing to start."""

from __future__ import annotations

import contextlib

from bench.ca_backends import CABackend


@contextlib.contextmanager
def backend(ws):
    """mesh-control signs with the CA in its own state directory."""
    yield CABackend(args=["--ca", "builtin"])
