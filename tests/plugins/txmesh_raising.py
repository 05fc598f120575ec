"""A third-party plugin that fails on purpose, for tests/integration/test_plugin_errors.py.

It is loaded exactly as a third-party plugin is: through a ``mesh.plugins`` entry point of an
installed distribution (the test writes the distribution's metadata, ``txmesh_raising-1.0.dist-info``,
and puts it and this directory on the proxy's ``PYTHONPATH``).  Every hook defers (returns None) unless
the request's ``x-raise-in`` header names it: then that hook raises, with the request id in the
message, as a real bug with per-request values would.  ``tryfirst``: it runs before the other
plugins, which could otherwise answer a *firstresult* hook first.
"""

from __future__ import annotations

from mesh import hookimpl


def _maybe_raise(ctx, hook: str) -> None:
    if ctx.headers.get("x-raise-in") == hook:
        raise RuntimeError(f"txmesh_raising fails in {hook} on purpose (request {ctx.request_id})")


@hookimpl(tryfirst=True)
def mesh_route(ctx, table):
    _maybe_raise(ctx, "mesh_route")


@hookimpl(tryfirst=True)
def mesh_request_headers(ctx):
    _maybe_raise(ctx, "mesh_request_headers")


@hookimpl(tryfirst=True)
def mesh_pick_endpoint(ctx, cluster, endpoints):
    _maybe_raise(ctx, "mesh_pick_endpoint")


@hookimpl(tryfirst=True)
def mesh_retry_decision(ctx, attempt, outcome, policy):
    _maybe_raise(ctx, "mesh_retry_decision")


@hookimpl(tryfirst=True)
def mesh_authorize(ctx, peer, policies):
    _maybe_raise(ctx, "mesh_authorize")


@hookimpl(tryfirst=True)
def mesh_request_complete(ctx, outcome):
    _maybe_raise(ctx, "mesh_request_complete")
