"""The built-in CA with two CA worker processes (``--ca builtin --ca-workers 2``): one per CPU of this host."""

from __future__ import annotations

import contextlib

from bench.ca_backends import CABackend

WORKERS = 2


@contextlib.contextmanager
def backend(ws):
    """mesh-control checks CSRs and signs with its state directory's CA in ``WORKERS`` worker processes."""
    yield CABackend(args=["--ca", "builtin", "--ca-workers", str(WORKERS)])
