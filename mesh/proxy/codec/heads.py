"""Serializing HTTP/1.1 heads: requests to upstreams, responses to clients.

Pure functions: each returns bytes (and a framing decision) and changes nothing.

Hop-by-hop headers (RFC 9110 section 7.6.1) are never forwarded: the fixed
set below plus every header named in a ``Connection`` header, except the
:data:`FRAMING` ones.  Body framing is re-decided at each hop.
"""

from __future__ import annotations

from http import HTTPStatus

#: Lower-case hop-by-hop header names.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})

#: Lower-case names of the headers that frame a message.  A ``Connection``
#: header naming them does not remove them: dropping Content-Length would leave
#: a body unframed, which the next hop would read as another request.  (Envoy,
#: too, frames what it forwards from what it parsed, whatever Connection says.)
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})

REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}

_NO_BODY_STATUS = frozenset({204, 304})

#: Lower-case ``Connection`` values that name no header beyond :data:`HOP_BY_HOP`.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"upgrade"})


def connection_tokens(value: bytes) -> frozenset:
    """Header names listed in a ``Connection`` header, lower-case."""
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def _apply_ops(lines: list, ops) -> list:
    """Apply Istio ``headers`` set/add/remove to ``[(name, value)]``."""
    drop = set(ops.remove) | {name for name, _ in ops.set}
    kept = [(name, value) for name, value in lines if name.lower() not in drop]
    return kept + list(ops.set) + list(ops.add)


def forwarded(ctx, action) -> tuple:
    """``(path, authority, headers)`` of a forwarded request, whatever its protocol: the route's
    rewrites and header operations applied to what the client sent.  (x-forwarded-for and
    x-forwarded-proto come with the exchange's added headers: :func:`mesh.proxy.exchange._forwarded_headers`.)"""
    path = ctx.path.encode("latin-1")
    if action.rewrite_prefix is not None:
        path = action.rewrite_prefix + path[action.rewrite_strip:]
    headers = ctx.raw_headers
    if action.request_headers is not None:
        headers = _apply_ops(headers, action.request_headers)
    return path, action.rewrite_authority or ctx.authority, headers


def request_head(ctx, action, framing, content_length, upgrade, extra=()) -> bytes:
    """The head sent upstream for one request (built once, reused by retries).

    ``ctx.raw_headers`` arrive without hop-by-hop headers, Host, Expect and
    x-forwarded-for (the codec strips them); ``extra`` are the exchange's added
    ``(name, value)`` pairs: x-forwarded-client-cert, x-forwarded-for, x-forwarded-proto.
    """
    path, authority, headers = forwarded(ctx, action)
    out = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (ctx.method.encode(), path, authority)]
    for name, value in headers:
        out.append(b"%s: %s\r\n" % (name, value))
    for name, value in extra:
        out.append(b"%s: %s\r\n" % (name, value))
    if "x-request-id" not in ctx.headers:
        out.append(b"x-request-id: %s\r\n" % ctx.request_id.encode())
    if framing == "length":
        out.append(b"content-length: %d\r\n" % content_length)
    elif framing == "chunked":
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        out.append(b"connection: upgrade\r\nupgrade: %s\r\n" % ctx.headers["upgrade"].encode("latin-1"))
    out.append(b"\r\n")
    return b"".join(out)


#: How :func:`response_head` frames a response body: chunked, or delimited by closing the connection.
CHUNKED, CLOSE = "chunked", "close"


def response_head(status, reason, headers, ops, head_only, http_version, keep_alive, upgrade=False):
    """The head sent downstream for an upstream response, and its body framing; mutates nothing.

    ``headers`` are the upstream's pairs; hop-by-hop ones are dropped (but
    Upgrade and Connection of a 101, ``upgrade``) and the route's ``ops``
    (Istio ``headers.response``, or None) applied.  ``keep_alive`` is false
    when the connection closes after this response.  Returns ``(head,
    framing)``: ``framing`` is :data:`CHUNKED`, :data:`CLOSE` (an HTTP/1.0
    client and no Content-Length: the body ends with the connection) or None.
    """
    kept = []
    has_length = False
    connection = None
    for pair in headers:
        lname = pair[0].lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                connection = pair[1]  # as before, only the last Connection header is read
            if not (upgrade and (lname == b"upgrade" or lname == b"connection")):
                continue
        elif lname == b"content-length":
            has_length = True
        kept.append(pair)
    if connection is not None and connection.lower() not in _PLAIN_CONNECTION:
        # Rare: the Connection header names more hop-by-hop headers; strip them too.
        listed = connection_tokens(connection) - HOP_BY_HOP - FRAMING
        if listed:
            kept = [pair for pair in kept if pair[0].lower() not in listed]
    if ops is not None:
        kept = _apply_ops(kept, ops)
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Unknown"))]
    for pair in kept:
        out.append(b"%s: %s\r\n" % pair)
    framing = None
    if not upgrade:
        if not (head_only or status in _NO_BODY_STATUS or has_length):
            framing = CHUNKED if http_version == "1.1" else CLOSE
            if framing is CHUNKED:
                out.append(b"transfer-encoding: chunked\r\n")
        if framing is CLOSE or not keep_alive:
            out.append(b"connection: close\r\n")
        elif http_version == "1.0":
            out.append(b"connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), framing


def local_response(status, flags, body, head_only, request_id, headers, close) -> bytes:
    """A complete proxy-generated response (error page) with its body.

    ``headers`` are ``(name, value)`` pairs from ``mesh_response_headers``:
    each replaces the generated header of its name (but Content-Length and
    Connection, which frame the response); a None value only removes it.
    """
    return simple_response(status, flags, body, head_only, close, request_id, headers)


def simple_response(status, flags, body, head_only=False, close=True, request_id=None, headers=()) -> bytes:
    """A complete plain-text response; used before and during exchanges.

    ``headers``: extra pairs, as for :func:`local_response`.
    """
    out = [b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
           % (status, REASONS.get(status, b"Unknown"), len(body))]
    if flags:
        out.append(b"x-mesh-flags: %s\r\n" % flags.encode())
    if request_id:
        out.append(b"x-request-id: %s\r\n" % request_id.encode())
    if close:
        out.append(b"connection: close\r\n")
    if headers:
        out = _replace_lines(out, headers)
    out.append(b"\r\n")
    if not head_only:
        out.append(body)
    return b"".join(out)


def _replace_lines(out, headers) -> list:
    """``out`` (a status line, then header lines) with ``headers`` replacing the lines of their names."""
    names = {name for name, _ in headers} - _LOCAL_FRAMING
    status, *lines = b"".join(out).split(b"\r\n")[:-1]
    kept = [status + b"\r\n"]
    for line in lines:
        if line.split(b":", 1)[0].lower() not in names:
            kept.append(line + b"\r\n")
    kept.extend(b"%s: %s\r\n" % pair for pair in headers if pair[1] is not None and pair[0] not in _LOCAL_FRAMING)
    return kept


#: Headers of a local response that ``mesh_response_headers`` cannot change: they frame it.
_LOCAL_FRAMING = frozenset({b"content-length", b"connection", b"transfer-encoding"})
