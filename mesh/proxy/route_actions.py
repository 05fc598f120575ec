"""The route-actions stage: what a route does besides forwarding, between routing and the first try.

The exchange hands a request here only when its route has :class:`~mesh.config.route_extras.RouteExtras`
(``RouteAction.extras`` is not None); every other request pays that one test.  The stage applies
them in the order Istio's sidecar runs Envoy's HTTP filters (fault, then CORS, then the router):

1. **Fault** (``fault``): a delay, on a fraction of the requests: the exchange waits on a reactor
   timer (:meth:`Exchange.wait`), which ends early if the client goes away; flag ``DI``.  The route's
   timeout starts after it, as Envoy's router starts its timer only when the fault filter lets the
   request through.  Then an abort, on a fraction of the requests: answered locally with the
   HTTP status, or for ``grpcStatus`` with that gRPC status (a gRPC request gets a Trailers-Only
   reply, any other request HTTP 200, as Envoy answers it); flag ``FI``.
2. **CORS** (``corsPolicy``): a preflight (``OPTIONS`` with ``Origin`` and
   ``Access-Control-Request-Method``) is answered locally, 200 with the allow headers; from an origin
   not allowed it goes on to the app unless ``unmatchedPreflights: IGNORE``.  Any other request from
   an allowed origin gets ``Access-Control-Allow-Origin`` (and the credentials and expose headers) on
   its response.
3. **Router**: a ``redirect`` or ``directResponse`` is answered locally (with the route's response
   ``headers``); else the request is forwarded with the action of its destination (per-destination
   ``headers``) and its path rewritten per request (``uriRegexRewrite``, or ``rewrite.uri`` replacing
   the whole path of a regex match).  Once forwarded, a route's ``mirror``/``mirrors`` send their
   copies (:mod:`mesh.proxy.mirror`).
"""

from __future__ import annotations

import dataclasses
import random

from mesh.config.route_extras import replacement_pairs, request_url, sequence_ops
from mesh.config.tables import HeaderOps
from mesh.proxy import mirror

_NO_CONTENT_TYPE = (b"content-type", None)
_TEXT = (b"content-type", b"text/plain")


def start(exchange, action, cluster) -> None:
    """Apply ``action.extras`` to the request of ``exchange`` (routed to ``cluster``; None for a route
    that answers locally), then forward it with :meth:`Exchange.forward` or answer it."""
    ctx = exchange.ctx
    ctx.route = action  # for the access log of a request answered here
    if cluster is not None:
        ctx.cluster = cluster.name
    fault = action.extras.fault
    if fault is not None and fault.delay_fraction and random.random() < fault.delay_fraction:
        ctx.add_flag("DI")
        exchange.wait(fault.delay, _after_delay, exchange, action, cluster)
        return
    _after_delay(exchange, action, cluster)


def _after_delay(exchange, action, cluster) -> None:
    extras = action.extras
    fault = extras.fault
    if fault is not None and fault.abort_fraction and random.random() < fault.abort_fraction:
        _abort(exchange, action, fault)
        return
    cors_ops = None
    if extras.cors is not None:
        origin = exchange.ctx.headers.get("origin")
        if origin:
            cors_ops = _cors(exchange, extras.cors, origin)
            if cors_ops is False:
                return
    if extras.redirect is not None:
        _redirect(exchange, action, extras.redirect, cors_ops)
    elif extras.direct_response is not None:
        _direct_response(exchange, action, extras.direct_response, cors_ops)
    else:
        forwarded = _forwarded(exchange.ctx, action, cluster, cors_ops)
        exchange.forward(forwarded, cluster)
        if extras.mirrors and not exchange.response_started:  # unless forward answered it locally
            mirror.start(exchange, forwarded, extras.mirrors)


def _abort(exchange, action, fault) -> None:
    """Envoy's fault abort, flag ``FI``: the HTTP status, or HTTP 200 with the gRPC status."""
    message = f"fault filter abort: injected by the fault.abort of {action.name}"
    status = 200 if fault.abort_status is None else fault.abort_status
    exchange.local_reply(status, "FI", message, "fault_filter_abort", grpc_status=fault.abort_grpc)


def _cors(exchange, cors, origin: str):
    """Envoy's CORS filter on a request with an ``Origin``: False when it answered a preflight, else
    the response headers the request gets (None when its origin is not allowed)."""
    ctx = exchange.ctx
    allowed = cors.allows(origin)
    method = ctx.headers.get("access-control-request-method")
    if ctx.method == "OPTIONS" and method and (allowed or not cors.forward_unmatched_preflights):
        _preflight(exchange, cors, origin.encode("latin-1") if allowed else None, method)
        return False
    return cors.response_ops(origin.encode("latin-1")) if allowed else None


def _preflight(exchange, cors, origin: bytes | None, method: str) -> None:
    """Answer a CORS preflight: 200, no body, the allow headers (``*`` echoes what the request asks)."""
    requested = exchange.ctx.headers
    pairs = [_NO_CONTENT_TYPE]
    if origin is not None:
        pairs.append((b"access-control-allow-origin", origin))
    if cors.allow_credentials:
        pairs.append((b"access-control-allow-credentials", b"true"))
    if cors.allow_methods:
        pairs.append((b"access-control-allow-methods",
                      method.encode("latin-1") if cors.allow_methods == b"*" else cors.allow_methods))
    if cors.allow_headers:
        pairs.append((b"access-control-allow-headers",
                      requested.get("access-control-request-headers", "").encode("latin-1")
                      if cors.allow_headers == b"*" else cors.allow_headers))
    if cors.max_age:
        pairs.append((b"access-control-max-age", cors.max_age))
    if origin is not None and cors.expose_headers:  # the filter's encodeHeaders sees its own reply too
        pairs.append((b"access-control-expose-headers", cors.expose_headers))
    exchange.respond(200, b"", pairs, "cors_response")


def _redirect(exchange, action, redirect, cors_ops) -> None:
    ctx = exchange.ctx
    if ctx.grpc is not None:
        exchange.local_reply(redirect.status, "", "", "direct_response")
        return
    location = redirect.location(ctx.authority, ctx.path.encode("latin-1"), ctx.request_port())
    _answer(exchange, action, redirect.status, b"", [_NO_CONTENT_TYPE, (b"location", location)], cors_ops)


def _direct_response(exchange, action, direct, cors_ops) -> None:
    ctx = exchange.ctx
    status, body = direct.status, direct.body
    if ctx.grpc is not None:
        exchange.local_reply(status, "", body.decode("utf-8", "replace"), "direct_response")
        return
    pairs = [_TEXT if body else _NO_CONTENT_TYPE]
    if status == 201 or 300 <= status < 400:  # Envoy's router adds the request's own URL
        pairs.append((b"location", request_url(ctx.authority, ctx.path.encode("latin-1"))))
    _answer(exchange, action, status, body, pairs, cors_ops)


def _answer(exchange, action, status, body, pairs, cors_ops) -> None:
    """Send the router's local answer: ``pairs``, then the route's response ``headers``, then CORS."""
    ops = sequence_ops(HeaderOps(set=tuple(pair for pair in pairs if pair[1] is not None),
                                 remove=tuple(name for name, value in pairs if value is None)),
                       action.response_headers, cors_ops)
    exchange.respond(status, body, replacement_pairs(ops), "direct_response")


def _forwarded(ctx, action, cluster, cors_ops):
    """The action the request is forwarded with: its destination's, with the path rewritten for this
    request and the CORS headers added to the response."""
    extras = action.extras
    forwarded = extras.by_cluster.get(cluster.name, action) if extras.by_cluster else action
    if extras.uri_regex is not None or extras.whole_path is not None:
        path = ctx.uri_path
        new = extras.whole_path if extras.uri_regex is None else extras.uri_regex.apply(path).encode("latin-1")
        forwarded = _replace(forwarded, rewrite_prefix=new, rewrite_strip=len(path.encode("latin-1")))
    if cors_ops is not None:
        forwarded = _replace(forwarded, response_headers=sequence_ops(forwarded.response_headers, cors_ops))
    return forwarded


def _replace(action, **changes):
    """A copy of ``action`` for this request only (its ``extras`` are applied: none left)."""
    return dataclasses.replace(action, extras=None, **changes)
